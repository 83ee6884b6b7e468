"""``clam_sb`` / ``clam_mb``: CLAM, clustering-constrained attention MIL (Lu et al. 2021, "Data-efficient and
weakly supervised computational pathology on whole-slide images", Nat. Biomed. Eng. 5:555-570).

Written from the paper's definitions with the tensor layout of the reference code, mahmoodlab/CLAM
``models/model_clam.py`` (commit 53e2409d4a81), whose GPL-3.0 code is not copied into this Apache-2.0 module:
instances are embedded (Linear-ReLU-Dropout), scored by gated attention (``attention_a`` tanh, ``attention_b``
sigmoid, ``attention_c``) with one branch (``clam_sb``: one attention map, one linear bag classifier) or one
branch per class (``clam_mb``: class ``c``'s attention pools its own bag embedding, scored by its own
``Linear(hidden, 1)``). Training adds CLAM's instance-level clustering loss: for the bag's class ``y``, the
``k_sample`` highest-attended instances are pseudo-labelled positive and the ``k_sample`` lowest negative for
the instance classifier of class ``y`` (a ``Linear(hidden, 2)`` per class); with ``subtyping`` the other classes'
classifiers also learn the top instances as negatives (``inst_eval_out``). The batch loss is
``bag_weight * bag loss + (1 - bag_weight) * clustering loss`` (``train_loop_clam``), applied here as the task
loss plus ``(1 - bag_weight) / bag_weight`` times the clustering loss (the same gradients up to the constant
factor ``1 / bag_weight``, to which Adam(W) steps are invariant).

Where this port differs, and why:

* Bags come in padded, masked mini-batches (the reference trains on one bag per step); the clustering loss is
  computed per bag on its real instances and averaged over the batch, like the bag loss.
* A bag with fewer than ``2 * k_sample`` instances uses ``k = n // 2`` (the reference's ``topk`` fails there, and
  overlapping top and bottom sets would get contradictory pseudo-labels); a one-instance bag adds no clustering term.
* The instance loss is cross-entropy (the reference's default; its smooth top-1 SVM option comes from the
  smooth-topk research code, which is not on PyPI).
* Instance classifiers exist for the K classes of a classification task (binary: 2, as in the reference).
  Survival (the Cox loss on one risk output, as ``attention_mil``) and regression (one standardised value) have
  no classes to cluster, so they train without the clustering loss; ``clam_mb`` then has one branch.
* The embedding and attention sizes are ``hidden`` / ``attn_dim`` (the reference's "small" is 512 / 256; the
  defaults here suit small cohorts on a CPU), the optimiser is AdamW for a fixed number of epochs
  (:class:`~mmcli.heads.nn.torch_base.TorchHead`).
* ``attention``: the softmax of the attention scores over the bag (the reference's heatmaps use the raw
  scores, which rank the same way); ``clam_mb`` reports the predicted class's branch (``A[Y_hat]`` as in
  ``create_heatmaps.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmcli.heads.nn.bag import AUX, BagHead
from mmcli.heads.nn.modules import MASK_FILL, StandardisedEmbed
from mmcli.heads.nn.torch_base import TorchParams
from mmcli.heads.registry import register_head


class CLAMParams(TorchParams):
    """Parameters of ``clam_sb`` and ``clam_mb``: the torch heads' and CLAM's own."""

    gate: bool = Field(True, description="true = gated attention (tanh * sigmoid, CLAM's Attn_Net_Gated, its default) "
                       "| false = plain tanh attention (Attn_Net)")
    k_sample: int = Field(8, ge=1, le=4096, description="instances per bag taken as the top-k (pseudo-positive) "
                          "and bottom-k (pseudo-negative) by attention for the clustering loss (CLAM's argument B), "
                          "1..4096; a bag with fewer than 2k instances uses k = its size // 2")
    bag_weight: float = Field(0.7, gt=0.0, le=1.0, description="weight c of the bag loss in c * bag + (1 - c) * "
                              "instance clustering loss (CLAM's bag_weight), 0 < c <= 1; 1 = no clustering loss")
    subtyping: bool = Field(False, description="classes are mutually exclusive subtypes (CLAM's subtyping option): the "
                            "other classes' instance classifiers also learn a bag's top-k instances as negatives")


class CLAMNet(nn.Module):
    """CLAM's network on raw instances (the in-fold standardisation folded into ``fc``).

    ``forward(x, mask, mean, scale) -> (logits (B, n_out), attention (B, N), {"scores": (B, K, N), "h": (B, N, H)})``
    with K = 1 (``multi_branch`` False, CLAM_SB) or n_out (CLAM_MB); attention is the softmax over the bag's real
    instances of branch 0 (SB) or of the predicted class's branch (MB).
    """

    def __init__(self, in_dim: int, hidden: int, attn_dim: int, n_out: int, n_inst: int, dropout: float,
                 gate: bool, multi_branch: bool) -> None:
        super().__init__()
        self.multi_branch = multi_branch
        k = n_out if multi_branch else 1
        self.fc = StandardisedEmbed(in_dim, hidden, dropout)
        drop = [nn.Dropout(dropout)] if dropout else []
        self.attention_a = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), *drop)
        self.attention_b = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), *drop) if gate else None
        self.attention_c = nn.Linear(attn_dim, k)
        if multi_branch:
            self.classifiers: nn.Module = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(n_out)])
        else:
            self.classifiers = nn.Linear(hidden, n_out)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(n_inst)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        h = self.fc(x, mean, scale)  # (B, N, H)
        a = self.attention_a(h)
        if self.attention_b is not None:
            a = a * self.attention_b(h)
        scores = self.attention_c(a).transpose(1, 2)  # (B, K, N), CLAM's A_raw
        att = torch.softmax(scores.masked_fill(~mask[:, None, :], MASK_FILL), dim=2)
        m = torch.bmm(att, h)  # (B, K, H)
        if self.multi_branch:
            logits = torch.cat([c(m[:, i]) for i, c in enumerate(self.classifiers)], dim=1)
            shown = att.gather(1, logits.argmax(1)[:, None, None].expand(-1, 1, att.shape[2]))[:, 0]
        else:
            logits, shown = self.classifiers(m[:, 0]), att[:, 0]
        return logits, shown, {"scores": scores, "h": h}


def clustering_loss(net: CLAMNet, scores: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
                    k_sample: int, subtyping: bool) -> torch.Tensor:
    """CLAM's instance clustering loss of each bag (B,): ``inst_eval`` for the bag's class (top-k of its branch's
    attention -> 1, bottom-k -> 0) and, with ``subtyping``, ``inst_eval_out`` for the other classes (their
    branch's top-k -> 0), averaged over the classes with ``subtyping`` (summed without, as in the reference).
    Real instances are the first ``mask.sum()`` of each row (:func:`~mmcli.heads.data.pad_bags`)."""
    n_cls = len(net.instance_classifiers)
    out = []
    for b in range(scores.shape[0]):
        n = int(mask[b].sum())
        k = min(k_sample, n // 2)
        total = scores.new_zeros(())
        if k >= 1:
            for i, clf in enumerate(net.instance_classifiers):
                a = scores[b, i if net.multi_branch else 0, :n]
                top = torch.topk(a, k)[1]
                if i == int(y[b]):  # in the class
                    idx = torch.cat([top, torch.topk(-a, k)[1]])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                elif subtyping:  # out of the class
                    idx, target = top, torch.zeros(k, dtype=torch.long, device=h.device)
                else:
                    continue
                total = total + F.cross_entropy(clf(h[b, idx]), target)
            if subtyping:
                total = total / n_cls
        out.append(total)
    return torch.stack(out)


class _CLAMHead(BagHead):
    Params = CLAMParams
    multi_branch = False
    gate: bool
    k_sample: int
    bag_weight: float
    subtyping: bool

    def _build(self) -> nn.Module:
        n_inst = 0 if self.is_survival or self.is_regression else self.n_classes  # clustering needs classes
        return CLAMNet(self.spec_[0].dim, self.hidden, self.attn_dim, self.n_out, n_inst, self.dropout, self.gate,
                       self.multi_branch)

    def _aux_loss(self, extras: dict[str, Any], y: Any, task_loss: Any) -> torch.Tensor | None:
        if self.is_survival or self.is_regression or self.bag_weight >= 1.0:
            return None
        aux = extras[AUX]
        inst = clustering_loss(self.module_, aux["scores"], aux["h"], extras["mask"], y, self.k_sample,
                               self.subtyping)
        return (1.0 - self.bag_weight) / self.bag_weight * inst.mean()


@register_head("clam_sb", aliases=("clam",))
class CLAMSBHead(_CLAMHead):
    """CLAM single-branch (Lu et al. 2021): gated attention MIL with instance-level clustering; parameters:
    :class:`CLAMParams`."""


@register_head("clam_mb")
class CLAMMBHead(_CLAMHead):
    """CLAM multi-branch (Lu et al. 2021): one attention branch and bag classifier per class, instance-level
    clustering; parameters: :class:`CLAMParams`."""

    multi_branch = True
