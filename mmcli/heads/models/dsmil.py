"""``dsmil``: dual-stream MIL (Li, Li & Eliceiri 2021, "Dual-stream multiple instance learning network for
whole slide image classification with self-supervised contrastive learning", CVPR 2021, 14318-14328).

Ported from the reference code, binli123/dsmil-wsi ``dsmil.py`` and ``train_tcga.py`` (commit 80465ed534ac,
2024-03-29). Stream 1 scores every instance (``i_classifier``, a linear layer) and takes, per class, the
instance with the highest score as the *critical instance*; its max score is that stream's bag score. Stream 2
(``BClassifier``) measures every instance against the critical one: queries ``q`` (Linear-ReLU-Linear-Tanh, or
one Linear without ``nonlinear``), attention ``softmax_n(<q_n, q_crit> / sqrt(d))`` over the bag, bag embedding
``A^T V`` (``V`` = the instances, or Dropout-Linear-ReLU of them with ``passing_v``) scored by the reference's
``Conv1d(C, C, kernel=hidden)``. Training minimises the dual-stream loss ``(1 - w) * loss(bag stream) +
w * loss(max stream)`` (reference: w = 0.5), here the task loss of stream 2 plus ``w / (1 - w)`` times that of
stream 1 (the same gradients up to a constant factor, to which Adam(W) steps are invariant). The prediction is the
average of the two streams (``test()``: the mean of their probabilities; survival and regression: of their risks or
values).

Where this port differs, and why:

* Fixed feature extractor: the reference trains a SimCLR tile encoder, freezes it and runs DSMIL on its
  features directly. Here the features come from stage 1's encoder (frozen too), and a trainable
  Linear-ReLU-Dropout embedding to ``hidden`` units comes first (:class:`~mmcli.heads.nn.modules.StandardisedEmbed`,
  which also carries the in-fold standardisation): the foundation-model features were not trained for this
  task and are often 1024-1536-d, and the other MIL heads embed the same way.
* Classes are C = the K softmax classes (binary: 2) with cross-entropy (the reference's multi-label sigmoid +
  BCE, with C = 1 for a binary task); survival has C = 1 stream of Cox risk, regression C = 1 stream of the
  standardised value.
* The reference's orthogonal initialisation (``apply_sparse_init``) is kept for its layers; the embedding has
  torch's default.
* Bags come in padded, masked mini-batches (the reference: one bag per step); AdamW for a fixed number of
  epochs (:class:`~mmcli.heads.nn.torch_base.TorchHead`) instead of Adam(0.5, 0.9) with cosine annealing.
* ``attention``: stream 2's attention of the predicted class (survival: the one stream) over the bag, i.e. the
  softmax of each instance's similarity to the critical instance.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmcli.heads.nn.bag import AUX, BagHead
from mmcli.heads.nn.modules import MASK_FILL, StandardisedEmbed
from mmcli.heads.nn.torch_base import TorchParams
from mmcli.heads.registry import register_head


class DSMILParams(TorchParams):
    """Parameters of ``dsmil``: the torch heads' and DSMIL's own."""

    attn_dim: int = Field(128, ge=1, le=8192, description="size of the queries q (units; the reference's 128), "
                          "1..8192")
    nonlinear: bool = Field(True, description="queries by Linear-ReLU-Linear-Tanh (the reference's "
                            "non_linearity 1) | false = one Linear")
    passing_v: bool = Field(False, description="values by Dropout-Linear-ReLU of the instances (the reference's "
                            "passing_v) | false = the instances themselves (its default)")
    max_weight: float = Field(0.5, ge=0.0, lt=1.0, description="weight w of the max-instance stream in the "
                              "dual-stream loss (1 - w) * bag + w * max (the reference's 0.5), 0 <= w < 1")


class DSMILNet(nn.Module):
    """DSMIL's network on raw instances.

    ``forward(x, mask, mean, scale) -> (logits (B, C), attention (B, N), {"bag": (B, C), "max": (B, C),
    "instances": (B, N, C), "A": (B, N, C)})``: logits combine the two streams (classification: the log of the
    mean of their softmax probabilities; survival and regression: the mean of the two); attention is ``A`` of the
    predicted class.
    """

    def __init__(self, in_dim: int, hidden: int, q_dim: int, n_out: int, dropout: float, nonlinear: bool,
                 passing_v: bool, scalar: bool) -> None:
        super().__init__()
        self.scalar = scalar  # one real output (Cox risk, standardised value): the streams' mean
        self.embed = StandardisedEmbed(in_dim, hidden, dropout)
        self.i_classifier = nn.Linear(hidden, n_out)
        self.q: nn.Module = (nn.Sequential(nn.Linear(hidden, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
                             if nonlinear else nn.Linear(hidden, q_dim))
        self.v: nn.Module = (nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
                             if passing_v else nn.Identity())
        self.fcc = nn.Conv1d(n_out, n_out, kernel_size=hidden)
        for m in (self.i_classifier, self.q, self.v, self.fcc):  # train_tcga.py's apply_sparse_init
            for layer in m.modules():
                if isinstance(layer, (nn.Linear, nn.Conv1d)):
                    nn.init.orthogonal_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.embed(x, mean, scale)  # (B, N, H)
        c = self.i_classifier(feats).masked_fill(~mask[..., None], MASK_FILL)  # (B, N, C) instance scores
        crit, m_idx = c.max(dim=1)  # (B, C): the max-instance stream's bag scores and critical instances
        m_feats = feats.gather(1, m_idx[..., None].expand(-1, -1, feats.shape[2]))  # (B, C, H)
        Q = self.q(feats)  # (B, N, Q)
        q_max = self.q(m_feats)  # (B, C, Q)
        A = torch.bmm(Q, q_max.transpose(1, 2)) / math.sqrt(Q.shape[2])  # (B, N, C)
        A = torch.softmax(A.masked_fill(~mask[..., None], MASK_FILL), dim=1)
        bag = self.fcc(torch.bmm(A.transpose(1, 2), self.v(feats))).squeeze(2)  # (B, C)
        if self.scalar:
            logits = 0.5 * (bag + crit)
        else:
            logits = torch.logaddexp(F.log_softmax(bag, 1), F.log_softmax(crit, 1)) - math.log(2.0)
        shown = A.gather(2, logits.argmax(1)[:, None, None].expand(-1, A.shape[1], 1))[..., 0]
        return logits, shown, {"bag": bag, "max": crit, "instances": c, "A": A}


@register_head("dsmil")
class DSMILHead(BagHead):
    """DSMIL (Li et al. 2021): max-instance critical instance and distance-based attention, dual-stream loss;
    parameters: :class:`DSMILParams`."""

    Params = DSMILParams
    nonlinear: bool
    passing_v: bool
    max_weight: float

    def _build(self) -> nn.Module:
        return DSMILNet(self.spec_[0].dim, self.hidden, self.attn_dim, self.n_out, self.dropout, self.nonlinear,
                        self.passing_v, scalar=self.is_survival or self.is_regression)

    def _forward(self, inputs: dict[str, torch.Tensor], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        out, extras = super()._forward(inputs, train)
        if train:  # the task loss is stream 2's (the bag stream); stream 1's is the auxiliary loss
            return extras[AUX]["bag"], extras
        return out, extras

    def _aux_loss(self, extras: dict[str, Any], y: Any, task_loss: Any) -> torch.Tensor | None:
        if self.max_weight <= 0.0:
            return None
        return self.max_weight / (1.0 - self.max_weight) * task_loss(extras[AUX]["max"])
