"""Fusion operators for ``fusion_mlp``: ``concat``, ``gated``, ``attention``, ``cross_attention``, ``bilinear``.

Every operator takes the presence-masked modality embeddings ``E`` (B, M, h) and presence ``p`` (B, M) (1 =
modality present) and returns a fused vector (B, h) plus per-patient modality weights (B, M) that sum to 1
over present modalities. They work for any number of modalities M >= 1, and a missing modality never
contributes to the fused vector. What the weights mean depends on the operator (see each class).
"""
from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.heads.nn.modules import MASK_FILL, GatedAttention
from mmcli.pipeline.registry import Registry

FUSIONS: Registry[type[nn.Module]] = Registry("fusion", flag="--fusion")
register_fusion = FUSIONS.register


def _normalise(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    w = w * p
    return w / w.sum(1, keepdim=True).clamp(min=1e-12)


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """Concatenate the embeddings, then Linear-ReLU. Weights: each modality's share of the L2 norm of that
    layer's input weights (learnt, the same for every patient), renormalised over present modalities."""

    def __init__(self, n_mod: int, hidden: int, attn_dim: int = 32, dropout: float = 0.0, **_: object) -> None:
        super().__init__()
        self.n_mod, self.hidden = n_mod, hidden
        self.proj = nn.Linear(n_mod * hidden, hidden)

    def forward(self, E: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = F.relu(self.proj(E.flatten(1)))
        norms = self.proj.weight.view(self.hidden, self.n_mod, self.hidden).norm(dim=(0, 2))
        return fused, _normalise(norms[None, :].expand_as(p), p)


@register_fusion("gated")
class GatedFusion(nn.Module):
    """Gated multimodal unit generalised to M modalities (Arevalo et al. 2017): a sigmoid gate per modality,
    conditioned on all embeddings and the presence flags, scales each embedding before Linear-ReLU.
    Weights: the gates, normalised over present modalities."""

    def __init__(self, n_mod: int, hidden: int, attn_dim: int = 32, dropout: float = 0.0, **_: object) -> None:
        super().__init__()
        self.gate = nn.Linear(n_mod * hidden + n_mod, n_mod)
        self.proj = nn.Linear(n_mod * hidden, hidden)

    def forward(self, E: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.sigmoid(self.gate(torch.cat([E.flatten(1), p], 1))) * p
        fused = F.relu(self.proj((g.unsqueeze(-1) * E).flatten(1)))
        return fused, _normalise(g, p)


@register_fusion("attention")
class AttentionFusion(nn.Module):
    """Gated attention over the modality embeddings (modalities as MIL instances; missing ones masked).
    Fused = attention-weighted sum. Weights: the attention."""

    def __init__(self, n_mod: int, hidden: int, attn_dim: int = 32, dropout: float = 0.0, **_: object) -> None:
        super().__init__()
        self.pool = GatedAttention(hidden, attn_dim)

    def forward(self, E: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused, a = self.pool(E, p > 0)
        return fused, _normalise(a, p)


@register_fusion("cross_attention")
class CrossAttentionFusion(nn.Module):
    """Cross-modal attention: each modality token (embedding + learnt modality-type embedding) attends to the
    *other* present modalities with multi-head attention (a patient with a single modality attends to
    itself), residual + LayerNorm, then gated attention pooling over the tokens. Weights: the pooling
    attention."""

    def __init__(self, n_mod: int, hidden: int, attn_dim: int = 32, dropout: float = 0.0, n_heads: int = 2,
                 **_: object) -> None:
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.type_emb = nn.Parameter(torch.randn(n_mod, hidden) * 0.02)
        self.mha = nn.MultiheadAttention(hidden, n_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.pool = GatedAttention(hidden, attn_dim)

    def forward(self, E: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, M, _ = E.shape
        tokens = E + self.type_emb.unsqueeze(0)
        present = p > 0
        eye = torch.eye(M, dtype=torch.bool, device=E.device).unsqueeze(0)
        allowed = present.unsqueeze(1) & ~eye  # (B, query, key)
        allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))
        bias = torch.zeros(B, M, M, device=E.device, dtype=E.dtype).masked_fill(~allowed, MASK_FILL)
        ctx, _ = self.mha(tokens, tokens, tokens, attn_mask=bias.repeat_interleave(self.n_heads, 0),
                          need_weights=False)
        fused, a = self.pool(self.norm(tokens + ctx), present)
        return fused, _normalise(a, p)


@register_fusion("bilinear")
class BilinearFusion(nn.Module):
    """Gated Kronecker fusion (PathomicFusion, Chen et al. 2020; PORPOISE) generalised to M modalities.

    Each modality is projected to a low dim ``d`` (Linear-ReLU) and scaled by a sigmoid gate conditioned on all
    embeddings (PathomicFusion gates each of its two modalities with a bilinear form of both; with M > 2 a
    linear map of the concatenation plays that role), then masked by presence and extended with a constant 1.
    For every pair (i, j) the outer product ``[z_i; 1] ⊗ [z_j; 1]`` holds the unimodal terms z_i, z_j and
    the bimodal terms z_i z_jᵀ. The pairs are concatenated — M(M-1)/2 · (d+1)² features, where the full M-way
    product would grow as (d+1)^M — and projected to ``hidden`` (Linear-ReLU). One modality: ``[z; 1]``.
    A missing modality zeroes its z, so its pairs reduce to the partner's unimodal terms.
    Weights: each present modality's mean gate activation, normalised.
    """

    def __init__(self, n_mod: int, hidden: int, attn_dim: int = 32, dropout: float = 0.0, bilinear_dim: int = 8,
                 **_: object) -> None:
        super().__init__()
        d = bilinear_dim
        self.pairs = list(combinations(range(n_mod), 2))
        self.proj = nn.ModuleList([nn.Linear(hidden, d) for _ in range(n_mod)])
        self.gates = nn.ModuleList([nn.Linear(n_mod * hidden + n_mod, d) for _ in range(n_mod)])
        n_feat = len(self.pairs) * (d + 1) ** 2 if self.pairs else d + 1
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(n_feat, hidden)

    def forward(self, E: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = torch.cat([E.flatten(1), p], 1)
        ones = torch.ones(E.shape[0], 1, device=E.device, dtype=E.dtype)
        zs, gbar = [], []
        for m, (proj, gate) in enumerate(zip(self.proj, self.gates)):
            g = torch.sigmoid(gate(ctx))
            zs.append(torch.cat([F.relu(proj(E[:, m])) * g * p[:, m:m + 1], ones], 1))
            gbar.append(g.mean(1))
        if self.pairs:
            feats = torch.cat([torch.einsum("bi,bj->bij", zs[i], zs[j]).flatten(1) for i, j in self.pairs], 1)
        else:
            feats = zs[0]
        return F.relu(self.out(self.drop(feats))), _normalise(torch.stack(gbar, 1), p)
