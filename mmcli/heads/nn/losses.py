"""Losses of the torch heads: Cox partial likelihood (survival), softmax focal loss, class weights.

Hand-written because no dependency provides them for torch: torchvision's ``sigmoid_focal_loss`` is the
one-vs-rest sigmoid form, not the softmax form used for multiclass heads here, and none of torch,
lifelines or scikit-survival has a differentiable Cox partial likelihood.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by the losses only: the xgboost head uses class_weights without torch
    import torch


def class_weights(y: np.ndarray, n_classes: int, mode: str | None = "balanced") -> np.ndarray:
    """Per-class weights ``n / (K * count_k)`` (sklearn's "balanced"); 1 for ``mode=None``.

    Classes absent from ``y`` (possible in a small training fold) get weight 1.
    """
    w = np.ones(n_classes, dtype=np.float32)
    if mode is None or mode == "none":
        return w
    if mode != "balanced":
        raise ValueError(f"class_weight must be 'balanced' or None, got {mode!r}")
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    w[present] = compute_class_weight("balanced", classes=present, y=y).astype(np.float32)
    return w


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017): ``-w_y (1 - p_y)^gamma log p_y``, averaged like weighted CE.

    Args:
        logits: (B, K) unnormalised scores.
        target: (B,) class indices.
        gamma: focusing parameter; 0 gives (weighted) cross-entropy.
        weight: (K,) class weights (the alpha term).
    """
    import torch.nn.functional as F

    logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1.0 - logp.exp()) ** gamma) * logp
    if weight is None:
        return loss.mean()
    w = weight[target]
    return (w * loss).sum() / w.sum()


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over observed events.

    Args:
        risk: (B,) log-risk scores; higher = higher hazard = shorter survival.
        time: (B,) follow-up times (any unit).
        event: (B,) 1 = event observed, 0 = censored.

    The risk set of subject i is every subject with ``time >= time_i`` (ties share one risk set). A batch
    without events carries no information and gives a zero loss that keeps the graph connected.
    """
    import torch

    risk = risk.reshape(-1)
    event = event.reshape(-1).to(risk.dtype)
    if event.sum() == 0:
        return risk.sum() * 0.0
    order = torch.argsort(time, descending=True, stable=True)
    r, t, e = risk[order], time[order], event[order]
    log_cum = torch.logcumsumexp(r, dim=0)
    # For tied times, the risk set extends to the last subject of the tie group (sorted descending).
    _, counts = torch.unique_consecutive(t, return_counts=True)
    group_end = torch.repeat_interleave(torch.cumsum(counts, 0) - 1, counts)
    log_risk_set = log_cum[group_end]
    return -((r - log_risk_set) * e).sum() / e.sum()


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", delta: float = 1.0) -> torch.Tensor:
    """Mean squared error, or the Huber loss (quadratic within ``delta``, linear beyond: robust to outliers),
    on the in-fold standardised target."""
    import torch.nn.functional as F

    if kind == "huber":
        return F.huber_loss(pred, target, delta=delta)
    return F.mse_loss(pred, target)
