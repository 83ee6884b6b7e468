"""Tests for comparing two models scored on the same patients.

* :func:`delong_test` — DeLong, DeLong & Clarke-Pearson (1988) test for two *correlated* AUROCs (same patients,
  same labels), computed with the midrank algorithm of Sun & Xu (2014, IEEE SPL 21:1389). Hand-written because
  neither scikit-learn nor scipy ship it; the tests check it against R pROC's documented ``aSAH`` example and
  against a brute-force O(m*n) computation of the structural components.
* :func:`paired_bootstrap` — paired (optionally stratified) percentile bootstrap of the difference of any metric.
  ``scipy.stats.bootstrap`` can neither stratify nor skip degenerate resamples (a resample without events has no
  c-index; one without a class has no AUROC), so this small loop does both and reports how many it dropped.
* :func:`cindex_bootstrap` / :func:`auroc_bootstrap` — the two uses of it in ``mmcli compare``.

Conventions: ``y_true`` is 0/1 with 1 = positive class; higher score = more likely positive. For survival,
``event`` is 1 when the event was observed (0 = censored), ``time`` is in any one unit, and **higher risk means
shorter survival** (lifelines' ``concordance_index`` expects the opposite sign; it is flipped here).
All differences are ``a - b``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata


@dataclass(frozen=True)
class DeLongResult:
    """DeLong test of ``auc_a - auc_b`` on the same patients; ``ci_*`` is the Wald interval at ``1 - alpha``."""

    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of ``estimate_a - estimate_b``.

    ``ci_low``/``ci_high``: percentile interval at ``1 - alpha``. ``p_value``: two-sided, from the bootstrap
    distribution shifted to the null (``P(|d* - d| >= |d|)``, with the +1 correction). ``n_valid`` resamples of
    ``n_boot`` gave a defined metric for both models; the others were degenerate and dropped.
    """

    estimate_a: float
    estimate_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: int
    n_valid: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _binary_labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0/1 (1 = positive class)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("y_true must contain both classes (at least one positive and one negative)")
    return y


def delong_covariance(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of ``k`` score vectors on the same patients and their DeLong covariance matrix.

    Parameters: ``y_true`` (n,) 0/1; ``scores`` (k, n) or (n,). Ties count one half (midranks).
    Returns ``(aucs (k,), cov (k, k))`` with ``cov = S10 / m + S01 / n`` (m positives, n negatives), where S10 and
    S01 are the sample covariances (ddof=1) of the structural components V10 (per positive: share of negatives
    it outranks) and V01 (per negative: share of positives that outrank it).
    """
    y = _binary_labels(y_true)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.shape[0]:
        raise ValueError(f"scores shape {s.shape} does not match y_true length {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    pos, neg = s[:, y], s[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = rankdata(pos, axis=1)  # midranks within positives
    ty = rankdata(neg, axis=1)  # midranks within negatives
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks in the pooled sample
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((s.shape[0], s.shape[0]))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((s.shape[0], s.shape[0]))
    return aucs, s10 / m + s01 / n


def delong_test(y_true: Any, score_a: Any, score_b: Any, *, alpha: float = 0.05) -> DeLongResult:
    """Two-sided DeLong test of H0: AUROC(a) = AUROC(b) for two scores of the same patients."""
    y = _binary_labels(y_true)
    aucs, cov = delong_covariance(y, np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se > 0:
        z = diff / se
    else:  # identical rankings (or one class of size 1): no variance; equal AUCs are no evidence of a difference
        z = 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    half = float(norm.ppf(1 - alpha / 2)) * se
    return DeLongResult(
        auc_a=float(aucs[0]), auc_b=float(aucs[1]), difference=diff, se=se, z=float(z),
        p_value=float(2.0 * norm.sf(abs(z))), ci_low=diff - half, ci_high=diff + half,
        n_positive=int(y.sum()), n_negative=int((~y).sum()),
    )


def auroc(y_true: Any, score: Any) -> float:
    """Binary AUROC by midranks, the Mann-Whitney U / (m n) (equals ``sklearn.metrics.roc_auc_score``; much
    cheaper inside a bootstrap)."""
    y = _binary_labels(y_true)
    s = np.asarray(score, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"score shape {s.shape} does not match y_true length {y.shape[0]}")
    m = int(y.sum())
    return float((rankdata(s)[y].sum() - m * (m + 1) / 2.0) / (m * (len(y) - m)))


def paired_bootstrap(
    stat_a: Callable[[np.ndarray], float],
    stat_b: Callable[[np.ndarray], float],
    n: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    strata: Sequence[Any] | np.ndarray | None = None,
    alpha: float = 0.05,
) -> BootstrapResult:
    """Paired bootstrap of ``stat_a - stat_b``.

    ``stat_a(idx)`` / ``stat_b(idx)`` compute each model's metric on rows ``idx`` (an int array into 0..n-1);
    both see the same resample, which keeps the pairing. With ``strata`` (n,) rows are resampled within each
    stratum (so every resample keeps the stratum sizes, e.g. the number of events). A resample where either
    statistic raises ``ValueError``/``ZeroDivisionError`` or returns a non-finite value is dropped.
    Deterministic for a given ``seed``.
    """
    if n < 2:
        raise ValueError("paired_bootstrap needs at least 2 rows")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    full = np.arange(n)
    est_a, est_b = float(stat_a(full)), float(stat_b(full))
    diff = est_a - est_b
    if strata is None:
        groups = [full]
    else:
        lab = np.asarray(strata)
        if lab.shape != (n,):
            raise ValueError(f"strata must have shape ({n},), got {lab.shape}")
        groups = [np.flatnonzero(lab == u) for u in np.unique(lab)]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        try:
            d = float(stat_a(idx)) - float(stat_b(idx))
        except (ValueError, ZeroDivisionError):
            continue
        if np.isfinite(d):
            boots.append(d)
    if not boots:
        raise ValueError("every bootstrap resample was degenerate (too few events / positives?)")
    b = np.asarray(boots)
    lo, hi = np.quantile(b, [alpha / 2, 1 - alpha / 2])
    p = (1 + np.count_nonzero(np.abs(b - diff) >= abs(diff) - 1e-12)) / (len(b) + 1)
    return BootstrapResult(
        estimate_a=est_a, estimate_b=est_b, difference=diff, ci_low=float(lo), ci_high=float(hi),
        p_value=float(min(1.0, p)), n_boot=n_boot, n_valid=len(b), seed=seed,
    )


def concordance(time: Any, event: Any, risk: Any) -> float:
    """Harrell's c-index of a **risk** score (higher risk = shorter survival) via lifelines."""
    from lifelines.utils import concordance_index

    return float(concordance_index(np.asarray(time, float), -np.asarray(risk, float), np.asarray(event, int)))


def cindex_bootstrap(
    time: Any, event: Any, risk_a: Any, risk_b: Any, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> BootstrapResult:
    """Paired bootstrap of Harrell's c-index difference (a - b); resampled within event/censored strata."""
    t, e = np.asarray(time, float), np.asarray(event, int)
    ra, rb = np.asarray(risk_a, float), np.asarray(risk_b, float)
    if not (len(t) == len(e) == len(ra) == len(rb)):
        raise ValueError("time, event, risk_a and risk_b must have the same length")
    if not np.isin(e, (0, 1)).all():
        raise ValueError("event must be 0/1 (1 = event observed)")
    if e.sum() == 0:
        raise ValueError("no observed events: the c-index is undefined")
    return paired_bootstrap(
        lambda i: concordance(t[i], e[i], ra[i]), lambda i: concordance(t[i], e[i], rb[i]), len(t),
        n_boot=n_boot, seed=seed, strata=e, alpha=alpha,
    )


def macro_auroc(y_onehot: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC of (n, C) probabilities against (n, C) one-hot labels (as sklearn's ``ovr``)."""
    return float(np.mean([auroc(y_onehot[:, c], probs[:, c]) for c in range(y_onehot.shape[1])]))


def auroc_bootstrap(
    y_true: Any, prob_a: Any, prob_b: Any, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> BootstrapResult:
    """Paired bootstrap of the AUROC difference (a - b), stratified by class.

    ``y_true`` (n,) integer class indices 0..C-1; ``prob_*`` (n,) positive-class scores (binary) or (n, C)
    class probabilities, for which the macro one-vs-rest AUROC is used.
    """
    y = np.asarray(y_true).astype(int)
    pa, pb = np.asarray(prob_a, float), np.asarray(prob_b, float)
    if pa.shape != pb.shape or pa.shape[0] != len(y):
        raise ValueError(f"prob_a {pa.shape}, prob_b {pb.shape} and y_true ({len(y)},) do not match")
    if pa.ndim == 1:
        return paired_bootstrap(lambda i: auroc(y[i], pa[i]), lambda i: auroc(y[i], pb[i]), len(y),
                                n_boot=n_boot, seed=seed, strata=y, alpha=alpha)
    onehot = np.eye(pa.shape[1], dtype=int)[y]
    return paired_bootstrap(lambda i: macro_auroc(onehot[i], pa[i]), lambda i: macro_auroc(onehot[i], pb[i]),
                            len(y), n_boot=n_boot, seed=seed, strata=y, alpha=alpha)
