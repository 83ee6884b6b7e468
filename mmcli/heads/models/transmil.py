"""``transmil``: TransMIL, transformer-based correlated MIL (Shao et al. 2021, "TransMIL: Transformer based
correlated multiple instance learning for whole slide image classification", NeurIPS 34, 2136-2147).

Ported from the reference code, szc19990412/TransMIL ``models/TransMIL.py`` (commit 9d6aee57c7c7, 2023-06-14),
and STAMP's ``trans_mil.py`` (KatherLab/STAMP commit c54ce0673962, the same network with configurable sizes).
The TPT module: instances embedded (Linear-ReLU, ``fc1``), the sequence padded to a square by repeating its first
instances, a class token prepended, then a Nystrom-attention layer (``layer1``), the PPEG positional module
(depth-wise 7x7, 5x5 and 3x3 convolutions over the instances laid out on the square, plus identity;
``pos_layer``), a second Nystrom layer (``layer2``), LayerNorm, and a linear layer on the class token (``fc2``).
Each layer is ``x + NystromAttention(LayerNorm(x))``, lucidrains' module that the reference imports (ported in
:mod:`mmcli.heads.nn.nystrom` so that batched bags do not change each other's output): ``dim_head = hidden /
n_heads``, ``num_landmarks = n_landmarks`` (reference: hidden / 2), 6 Moore-Penrose iterations, the value
residual convolution, dropout on the output.

Where this port differs, and why:

* Sizes: ``hidden`` (reference 512, from 1024-d features) defaults to the other heads' size for small cohorts
  on a CPU; heads and landmarks are parameters (reference: 8 and hidden / 2).
* A mini-batch of bags is run at each bag's own length, bags of equal length together (the reference trains
  with one bag per step): the square padding and the PPEG grid depend on the bag's length, so padding bags to
  a common length would change the model. Training bags longer than ``max_instances`` are all sampled to that
  length, so on whole slides a training batch runs as one. AdamW for a fixed number of epochs
  (:class:`~mmcli.heads.nn.torch_base.TorchHead`) instead of the reference's RAdam + Lookahead.
* Survival uses the Cox loss on one risk output, as ``attention_mil``.
* ``attention`` (the reference has none): the class token's row of the first layer's Nystrom attention matrix
  ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T)``, averaged over heads, with each square-padding
  copy's weight added to the instance it repeats; the approximate pseudo-inverse can make a few entries
  slightly negative, so they are clipped at 0 and the row is renormalised to sum to 1 over the bag. The first
  layer is the last one whose tokens are single instances: PPEG's 7x7 / 5x5 / 3x3 convolutions then mix each
  token with its neighbours on the square, so the second layer's weights belong to neighbourhoods, not
  instances (on MNIST-bags the second layer's row ranked the key instances first markedly less often).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from mmcli.heads.nn.bag import BagHead
from mmcli.heads.nn.modules import StandardisedEmbed
from mmcli.heads.nn.nystrom import NystromAttention
from mmcli.heads.nn.torch_base import TorchParams
from mmcli.heads.registry import register_head


class TransMILParams(TorchParams):
    """Parameters of ``transmil``: the torch heads' and TransMIL's own."""

    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on each attention layer's output (the "
                           "reference's 0.1), 0 <= p < 1")
    attn_dim: int = Field(32, ge=1, le=8192, description="not used by transmil (its attention works in hidden "
                          "units: n_heads x hidden / n_heads)")
    n_heads: int = Field(8, ge=1, le=64, description="attention heads per layer (the reference's 8), 1..64; "
                         "hidden must be divisible by it")
    n_landmarks: int | None = Field(None, ge=1, le=4096, description="Nystrom landmarks per layer, 1..4096; "
                                    "null = hidden // 2 (the reference's 256 at hidden 512)")
    pinv_iterations: int = Field(6, ge=1, le=50, description="Moore-Penrose iterations of the Nystrom "
                                 "pseudo-inverse (the reference's 6), 1..50")

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_hidden(cls, v: int, info: ValidationInfo) -> int:
        hidden = info.data.get("hidden")
        if hidden and hidden % v:
            raise ValueError(f"transmil needs hidden ({hidden}) divisible by n_heads ({v})")
        return v


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))`` (the reference's ``TransLayer``)."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, dim_head=dim // heads, heads=heads, num_landmarks=landmarks,
                                     pinv_iterations=pinv_iterations, residual=True, dropout=dropout)

    def forward(self, x: torch.Tensor, cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (b, T, dim) -> (x + attention, the class token's (token 0) attention over the T tokens (b, T), averaged
        over heads, or None)."""
        if not cls_attention:
            return x + self.attn(self.norm(x)), None
        out, (a1, a2_inv, a3) = self.attn(self.norm(x), return_attn_matrices=True)
        pad = a1.shape[2] - x.shape[1]  # the sequence is padded in front to a multiple of the landmarks
        row = (a1[:, :, pad:pad + 1] @ a2_inv) @ a3  # (b, heads, 1, pad + T)
        return x + out, row[:, :, 0, pad:].mean(1)


class PPEG(nn.Module):
    """Pyramid position encoding generator (the reference's ``PPEG``): depth-wise convolutions on the square."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        cls_token, feat_token = x[:, 0], x[:, 1:]
        cnn_feat = feat_token.transpose(1, 2).reshape(B, C, H, W)
        x = self.proj(cnn_feat) + cnn_feat + self.proj1(cnn_feat) + self.proj2(cnn_feat)
        x = x.flatten(2).transpose(1, 2)
        return torch.cat((cls_token.unsqueeze(1), x), dim=1)


class TransMILNet(nn.Module):
    """TransMIL on raw instances: ``forward(x, mask, mean, scale) -> (logits (B, n_out), attention (B, N))``,
    each bag run at its own length (its real instances: the first ``mask.sum()`` of its row)."""

    def __init__(self, in_dim: int, hidden: int, n_out: int, heads: int, landmarks: int, pinv_iterations: int,
                 dropout: float) -> None:
        super().__init__()
        self.fc1 = StandardisedEmbed(in_dim, hidden, 0.0)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.layer1 = TransLayer(hidden, heads, landmarks, pinv_iterations, dropout)
        self.pos_layer = PPEG(hidden)
        self.layer2 = TransLayer(hidden, heads, landmarks, pinv_iterations, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def bags(self, h: torch.Tensor, cls_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedded bags of one length h (b, n, hidden) -> (logits (b, n_out), attention (b, n) or None)."""
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)  # pad to the square with the first instances
        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        h, row = self.layer1(h, cls_attention)
        h = self.pos_layer(h, side, side)
        h, _ = self.layer2(h)
        logits = self.fc2(self.norm(h)[:, 0])
        if row is None:
            return logits, None
        tokens = row[:, 1:]  # the instance tokens, square-padding copies last
        att = tokens[:, :n].clone()
        att[:, : side * side - n] += tokens[:, n:]
        att = att.clamp(min=0.0)
        total = att.sum(1, keepdim=True)
        return logits, torch.where(total > 0, att / total.clamp(min=1e-30), torch.full_like(att, 1.0 / n))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc1(x, mean, scale)
        lengths = mask.sum(1).clamp(min=1)  # a missing bag: its one masked row, attention 0
        logits = h.new_zeros((h.shape[0], self.fc2.out_features))
        att = torch.zeros(mask.shape, dtype=h.dtype, device=h.device)
        for n in torch.unique(lengths).tolist():  # bags of equal length run as one batch
            rows = torch.nonzero(lengths == n).flatten()
            out, a = self.bags(h[rows, :n], cls_attention=not self.training)
            logits = logits.index_copy(0, rows, out)
            if a is not None:
                att[rows, :n] = a * mask[rows, :n]
        return logits, att


@register_head("transmil", aliases=("trans_mil",))
class TransMILHead(BagHead):
    """TransMIL (Shao et al. 2021): Nystrom-attention transformer with the PPEG positional module over the
    bag; parameters: :class:`TransMILParams`."""

    Params = TransMILParams
    n_heads: int
    n_landmarks: int | None
    pinv_iterations: int

    def _build(self) -> nn.Module:
        landmarks = self.n_landmarks or max(1, self.hidden // 2)
        return TransMILNet(self.spec_[0].dim, self.hidden, self.n_out, self.n_heads, landmarks,
                           self.pinv_iterations, self.dropout)

