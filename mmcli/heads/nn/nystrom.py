"""Nystrom self-attention (Xiong et al. 2021, "Nystromformer", AAAI 35:14138), as TransMIL uses it.

A port of lucidrains' ``nystrom_attention.NystromAttention`` (package 0.0.14, commit fbe9ebad6bae; MIT licence,
Copyright (c) 2021 Phil Wang), the module the TransMIL reference imports, with the same parameter names (a state
dict moves between the two) and the same output for one sequence (checked in ``tests/heads/test_mil_reference.py``).
Hand-written for one reason: the package scales the initial Moore-Penrose iterate by the largest row and column sums
of the *whole batch*, so a bag's output would depend on the other bags batched with it (and a patient's prediction
on its cohort). Here the scale is taken per sequence, which is the package's computation for a batch of one; masks
are not needed (TransMIL batches only bags of equal length).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def moore_penrose_iter_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative pseudo-inverse of ``x`` (b, h, m, m) (Razavi et al. 2014), initial scale per sequence ``b``."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1).flatten(1).amax(1)
    row = abs_x.sum(dim=-2).flatten(1).amax(1)
    z = x.transpose(-1, -2) / (col * row)[:, None, None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)[None, None]
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nystrom attention over (b, n, dim) with ``num_landmarks`` segment-mean landmarks, the iterative
    pseudo-inverse and the depth-wise value convolution (``residual``); the package's defaults."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True, residual_conv_kernel: int = 33,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.heads = heads
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = (nn.Conv2d(heads, heads, (residual_conv_kernel, 1), padding=(residual_conv_kernel // 2, 0),
                                   groups=heads, bias=False) if residual else None)

    def forward(self, x: torch.Tensor, return_attn_matrices: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """x (b, n, dim) -> (b, n, dim); with ``return_attn_matrices`` also ``(attn1, pinv(attn2), attn3)``
        on the front-padded sequence (the full attention is their product)."""
        b, n, _ = x.shape
        h, m = self.heads, self.num_landmarks
        if n % m:  # pad in front so that the sequence splits evenly into m landmark segments
            x = F.pad(x, (0, 0, m - n % m, 0), value=0.0)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale
        seg = math.ceil(n / m)
        q_land = q.reshape(b, h, m, seg, -1).sum(3) / seg
        k_land = k.reshape(b, h, m, seg, -1).sum(3) / seg
        attn1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)
        attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)
        attn3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)
        attn2_inv = moore_penrose_iter_pinv(attn2, self.pinv_iterations)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(b, out.shape[2], -1))[:, -n:]
        if return_attn_matrices:
            return out, (attn1, attn2_inv, attn3)
        return out
