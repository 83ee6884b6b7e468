"""``attention_mil``: gated attention MIL over one bag modality (WSI tiles) (Ilse, Tomczak & Welling 2018,
"Attention-based deep multiple instance learning", ICML, PMLR 80:2127-2136).

A patient's slides are concatenated into one bag. Instances are standardised with an in-fold
:class:`~mmcli.heads.preprocess.vector.InstanceScaler` (folded into the first layer), embedded (Linear-ReLU-
Dropout), pooled by gated attention and classified (or scored for survival with the Cox loss, or regressed on a
standardised target). Bags are padded into masked mini-batches; during training each bag contributes at most
``max_instances`` random instances per step (the shared bag machinery: :class:`~mmcli.heads.nn.bag.BagHead`).
"""
from __future__ import annotations

import torch
from torch import nn

from mmcli.heads.nn.bag import BagHead
from mmcli.heads.nn.modules import GatedAttention, StandardisedEmbed
from mmcli.heads.nn.torch_base import TorchParams
from mmcli.heads.registry import register_head


class ABMIL(nn.Module):
    """Instance embedding -> gated attention pooling -> linear output."""

    def __init__(self, in_dim: int, hidden: int, attn_dim: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.embed = StandardisedEmbed(in_dim, hidden, dropout)
        self.pool = GatedAttention(hidden, attn_dim)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) raw features, mask (B, N); mean/scale (D,) of the in-fold instance scaler."""
        z, a = self.pool(self.embed(x, mean, scale), mask)
        return self.out(z), a


@register_head("attention_mil", aliases=("abmil", "gated_abmil"))
class AttentionMILHead(BagHead):
    """Gated attention MIL (Ilse et al. 2018) over one bag modality; parameters:
    :class:`~mmcli.heads.nn.torch_base.TorchParams`."""

    Params = TorchParams

    def _build(self) -> nn.Module:
        return ABMIL(self.spec_[0].dim, self.hidden, self.attn_dim, self.n_out, self.dropout)
