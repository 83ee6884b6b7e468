"""Tests for comparing two models scored on the same patients.

* :func:`delong_test` — DeLong, DeLong & Clarke-Pearson (1988) test for two *correlated* AUROCs (same patients,
  same labels), computed with the midrank algorithm of Sun & Xu (2014, IEEE SPL 21:1389). Hand-written because
  neither scikit-learn nor scipy ship it; the tests check it against R pROC's documented ``aSAH`` example and
  against a brute-force O(m*n) computation of the structural components. Small samples: a class with fewer
  than 2 cases has no variance estimate, so the result is NaN with a ``message`` (never a variance of 0); under
  ``SMALL_CLASS`` cases in a class a warning is issued and the reference distribution is Student's t with
  Welch-Satterthwaite degrees of freedom (as Brunner & Munzel 2000 do for the same placement variance): the
  normal reference rejects a true null 11 % of the time at nominal 5 % with 3 positives among 40 patients,
  the t reference 5 % (benchmarks/bench_stats.py). The Wald interval uses the same variance and reference as
  the p-value, so ``p < alpha`` exactly when the ``1 - alpha`` interval excludes 0.
* :func:`paired_bootstrap` — paired (optionally stratified) percentile bootstrap of the difference of any metric,
  drawn and summarised by :mod:`.bootstrap` (resampling, the validity rule: interval and p-value null when
  fewer than ``MIN_VALID_SHARE`` of the resamples gave a value for both models; ``n_valid`` always reported).
  Its p-value is the percentile interval inverted (the smallest ``alpha`` whose interval reaches 0), so the
  interval and the p-value never disagree.
* :func:`corrected_t_test` — Nadeau & Bengio's corrected resampled t-test of the mean per-fold difference of
  two procedures cross-validated on the same folds (covers training variability, which the two above do not).
* :func:`cindex_bootstrap` / :func:`auroc_bootstrap` — the two uses of it in ``mmcli compare``.

Conventions: ``y_true`` is 0/1 with 1 = positive class; higher score = more likely positive. For survival,
``event`` is 1 when the event was observed (0 = censored), ``time`` is in any one unit, and **higher risk means
shorter survival** (lifelines' ``concordance_index`` expects the opposite sign; it is flipped here).
All differences are ``a - b``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t

from mmcli.heads.evaluation.bootstrap import (
    MIN_VALID_SHARE,
    percentile_interval_and_p,
    resample_indices,
    valid_enough,
)
from mmcli.heads.evaluation.metrics import auroc as _auroc

SMALL_CLASS = 10  # fewer cases than this in a class: warn, and use the t reference


@dataclass(frozen=True)
class DeLongResult:
    """DeLong test of ``auc_a - auc_b`` on the same patients; ``ci_*`` is the Wald interval at ``1 - alpha``.

    ``reference``: ``"normal"`` or ``"t"`` (then ``df`` = Welch-Satterthwaite degrees of freedom; inf for the
    normal). ``se``/``z``/``p_value``/``ci_*`` are NaN, with the reason in ``message``, when a class has fewer
    than 2 cases; ``message`` also notes a class under ``SMALL_CLASS`` cases.
    """

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
    reference: str = "normal"
    df: float = math.inf
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def defined(self) -> bool:
        return math.isfinite(self.p_value)


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of ``estimate_a - estimate_b``.

    ``ci_low``/``ci_high``: percentile interval at ``1 - alpha``, the order statistics ``d*_(k)`` and
    ``d*_(B+1-k)`` of the ``B = n_valid`` replicate differences with ``k = ceil(B alpha / 2)``. ``p_value``:
    two-sided, the percentile interval inverted, ``min(1, 2 min(#{d* <= 0}, #{d* >= 0}) / B)``: the smallest
    level whose interval still reaches 0, so ``p < alpha`` exactly when the interval excludes 0 (0 means
    below ``2 / B``). ``n_valid`` resamples of ``n_boot`` gave a defined metric for both models; the others
    were degenerate and dropped; below ``MIN_VALID_SHARE`` of ``n_boot`` the interval and p are NaN and
    ``message`` says why.
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
    message: str = ""

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
    it outranks) and V01 (per negative: share of positives that outrank it). With fewer than 2 cases in a class
    its sample covariance does not exist: ``cov`` is NaN.
    """
    aucs, s10, s01, m, n = _delong_components(y_true, scores)
    return aucs, s10 / m + s01 / n


def _delong_components(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``(aucs, S10, S01, m, n)`` of :func:`delong_covariance` (S10/S01 NaN for a class under 2 cases)."""
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
    k = s.shape[0]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.full((k, k), np.nan)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.full((k, k), np.nan)
    return aucs, s10, s01, m, n


def delong_test(y_true: Any, score_a: Any, score_b: Any, *, alpha: float = 0.05,
                reference: str = "auto") -> DeLongResult:
    """Two-sided DeLong test of H0: AUROC(a) = AUROC(b) for two scores of the same patients.

    ``reference``: ``"auto"`` (normal, as DeLong et al. and R pROC; Student's t with Welch-Satterthwaite df when
    a class has fewer than ``SMALL_CLASS`` cases), ``"normal"`` or ``"t"``. NaN (with ``message``) when a class
    has fewer than 2 cases; a ``UserWarning`` under ``SMALL_CLASS``.
    """
    if reference not in ("auto", "normal", "t"):
        raise ValueError(f"reference must be 'auto', 'normal' or 't', got {reference!r}")
    y = _binary_labels(y_true)
    aucs, s10, s01, m, n = _delong_components(
        y, np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)]))
    diff = float(aucs[0] - aucs[1])
    base = {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff, "n_positive": m,
            "n_negative": n}
    if min(m, n) < 2:
        msg = (f"DeLong needs at least 2 positives and 2 negatives to estimate its variance; got {m} positive(s) "
               f"and {n} negative(s): no test")
        return DeLongResult(se=math.nan, z=math.nan, p_value=math.nan, ci_low=math.nan, ci_high=math.nan,
                            reference="none", df=math.nan, message=msg, **base)
    use_t = reference == "t" or (reference == "auto" and min(m, n) < SMALL_CLASS)
    message = ""
    if min(m, n) < SMALL_CLASS:
        message = (f"only {min(m, n)} {'positives' if m < n else 'negatives'}: the DeLong variance is rough under "
                   f"{SMALL_CLASS} cases per class"
                   + (" (Student's t reference with Welch-Satterthwaite df used)" if use_t else ""))
        warnings.warn(message, UserWarning, stacklevel=2)
    c10 = float(s10[0, 0] + s10[1, 1] - 2.0 * s10[0, 1]) / m  # variance of the difference, positives' part
    c01 = float(s01[0, 0] + s01[1, 1] - 2.0 * s01[0, 1]) / n
    var = max(c10 + c01, 0.0)
    se = math.sqrt(var)
    df = math.inf
    if use_t and var > 0:
        df = var ** 2 / (c10 ** 2 / (m - 1) + c01 ** 2 / (n - 1))
    if se > 0:
        z = diff / se
    else:  # identical rankings: no variance; equal AUCs are no evidence of a difference
        z = 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    if math.isinf(df):
        q, p = float(norm.ppf(1 - alpha / 2)), float(2.0 * norm.sf(abs(z)))
    else:
        q, p = float(student_t.ppf(1 - alpha / 2, df)), float(2.0 * student_t.sf(abs(z), df))
    half = q * se
    return DeLongResult(se=se, z=float(z), p_value=p, ci_low=diff - half, ci_high=diff + half,
                        reference="t" if use_t else "normal", df=df, message=message, **base)


def auroc(y_true: Any, score: Any) -> float:
    """Binary AUROC by midranks, the Mann-Whitney U / (m n) (equals ``sklearn.metrics.roc_auc_score``; much
    cheaper inside a bootstrap)."""
    y = _binary_labels(y_true)
    s = np.asarray(score, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"score shape {s.shape} does not match y_true length {y.shape[0]}")
    return _auroc(y, s)


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
    statistic raises ``ValueError``/``ZeroDivisionError`` or returns a non-finite value is dropped (and counted:
    the validity rule of :mod:`.bootstrap`). Deterministic for a given ``seed``.
    """
    if n < 2:
        raise ValueError("paired_bootstrap needs at least 2 rows")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    full = np.arange(n)
    est_a, est_b = float(stat_a(full)), float(stat_b(full))
    diff = est_a - est_b
    if strata is not None and np.asarray(strata).shape != (n,):
        raise ValueError(f"strata must have shape ({n},), got {np.asarray(strata).shape}")
    rng = np.random.default_rng(seed)
    boots = []
    for idx in resample_indices(rng, n_boot, n, strata):
        try:
            d = float(stat_a(idx)) - float(stat_b(idx))
        except (ValueError, ZeroDivisionError):
            continue
        if np.isfinite(d):
            boots.append(d)
    if not boots:
        raise ValueError("every bootstrap resample was degenerate (too few events / positives?)")
    if not valid_enough(len(boots), n_boot):
        return BootstrapResult(
            estimate_a=est_a, estimate_b=est_b, difference=diff, ci_low=math.nan, ci_high=math.nan,
            p_value=math.nan, n_boot=n_boot, n_valid=len(boots), seed=seed,
            message=f"only {len(boots)} of {n_boot} resamples gave a value for both models (fewer than "
                    f"{MIN_VALID_SHARE:.0%}): no interval or p-value (it would be conditional on the evaluable "
                    "resamples)")
    lo, hi, p = percentile_interval_and_p(np.asarray(boots), alpha)
    return BootstrapResult(
        estimate_a=est_a, estimate_b=est_b, difference=diff, ci_low=lo, ci_high=hi,
        p_value=p, n_boot=n_boot, n_valid=len(boots), seed=seed,
    )


@dataclass(frozen=True)
class CorrectedTResult:
    """Corrected resampled t-test (Nadeau & Bengio 2003) of the mean of per-fold differences ``a - b``.

    ``difference``: the mean over the K folds; ``ci_*``: ``difference ± t(K-1, 1-alpha/2) · se`` with
    ``se = sqrt((1/K + n_test/n_train) s²)``; ``p_value``: two-sided, same t and se, so ``p < alpha`` exactly
    when the interval excludes 0. NaN (with ``message``) when K < 2 or a fold difference is undefined.
    """

    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    se: float
    df: int
    per_fold: list[float]
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corrected_t_test(differences: Sequence[float], test_sizes: Sequence[int], alpha: float = 0.05
                     ) -> CorrectedTResult:
    """Nadeau & Bengio's corrected resampled t-test of per-fold differences of two procedures evaluated on the
    same K folds (``test_sizes``: each fold's test patients; training size = all minus the fold's).

    The variance ``(1/K + n_test/n_train) s²`` is :func:`mmcli.heads.evaluation.metrics.corrected_t_interval`'s
    (the same correction for the folds' shared training patients); here without clipping, for a difference.
    A zero spread gives se 0: p 1 for a zero difference, else 0, and a zero-width interval.
    """
    d = np.asarray(differences, dtype=np.float64)
    sizes = np.asarray(test_sizes, dtype=np.float64)
    K = len(d)
    pf = [float(v) for v in d]
    if K < 2 or len(sizes) != K or not np.isfinite(d).all():
        why = "fewer than 2 folds" if K < 2 else "a fold's difference is undefined"
        return CorrectedTResult(math.nan, math.nan, math.nan, math.nan, math.nan, max(K - 1, 0), pf,
                                f"no corrected t-test: {why}")
    ratio = float(np.mean(sizes / (sizes.sum() - sizes)))
    se = math.sqrt((1.0 / K + ratio) * d.var(ddof=1))
    mean = float(d.mean())
    q = float(student_t.ppf(1 - alpha / 2, K - 1))
    if se > 0:
        p = float(2.0 * student_t.sf(abs(mean) / se, K - 1))
    else:
        p = 1.0 if mean == 0 else 0.0
    return CorrectedTResult(mean, mean - q * se, mean + q * se, p, se, K - 1, pf)


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
