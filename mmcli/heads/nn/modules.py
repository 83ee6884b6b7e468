"""Torch building blocks shared by the torch heads: attention / mean pooling and instance embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_FILL = -1e4  # finite, so an all-masked bag (missing modality) gives uniform weights instead of NaN


class GatedAttention(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): ``a_k ∝ exp(w^T (tanh(V h_k) ⊙ sigm(U h_k)))``.

    Args:
        dim: instance embedding size.
        attn_dim: hidden size of the attention network.
    """

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, N, d), mask (B, N) bool -> pooled (B, d), attention (B, N) summing to 1 over real instances."""
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)
        a = torch.softmax(scores.masked_fill(~mask, MASK_FILL), dim=1)
        return torch.bmm(a.unsqueeze(1), h).squeeze(1), a


class MeanPool(nn.Module):
    """Masked mean over instances (the attention output is the uniform weight over real instances)."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(h.dtype)
        a = m / m.sum(1, keepdim=True).clamp(min=1.0)
        return torch.bmm(a.unsqueeze(1), h).squeeze(1), a


class StandardisedEmbed(nn.Module):
    """Linear-ReLU-Dropout on standardised input ``(x - mean) / scale``, computed on the raw input.

    ``W ((x - m) / s) + b = (W / s) x + (b - (W / s) m)``: folding the in-fold instance standardisation into
    the weights saves a full pass over every tile of every batch, while the parameters (and their gradients)
    stay those of a layer on standardised input. Padded rows (raw zeros) get ``b - (W / s) m`` instead of
    ``b``; they are masked out by the pooling, so it does not matter.
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden)
        self.act = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight / scale
        return self.act(F.linear(x, w, self.linear.bias - w @ mean))


def mlp_embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout: per-instance / per-modality projection."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
