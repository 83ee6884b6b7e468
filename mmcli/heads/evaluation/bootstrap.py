"""The one bootstrap of mmcli's evaluation: resampling, percentile intervals, the validity rule, finite-or-None.

Every bootstrap interval in metrics.json and ``mmcli compare`` is drawn and summarised here:

* **Resampling** of patients with replacement, plain or **stratified** (rows resampled within each stratum, so
  every replicate keeps the stratum sizes). Stratify where the metric needs both classes or events (AUROC,
  c-index): then every replicate is evaluable by construction. Do not stratify where the quantity depends on
  the outcome rate (calibration intercept, PPV/NPV, net benefit): fixing the class counts would remove that
  variability and narrow the interval. Two draws of the same scheme: :func:`resample_weights` (a replicate is a
  vector of multiplicities, for the vectorised weighted metrics) and :func:`resample_indices` (a replicate is a
  vector of row indices, for metrics that take rows).
* **Percentile interval** :func:`percentile_interval`: ``np.percentile`` (linear interpolation) of the valid
  replicates at ``alpha/2`` and ``1 - alpha/2``. For a *test* whose p-value must agree with its interval,
  :func:`percentile_interval_and_p` uses order statistics instead (so ``p < alpha`` iff the interval
  excludes 0, in floating point too).
* **One validity rule**: a replicate is valid when its value is finite. The interval is null (NaN here, None in
  JSON) when fewer than :data:`MIN_VALID_SHARE` of the ``n_boot`` replicates were valid, or when the point
  estimate itself is undefined: an interval over the evaluable replicates only would be conditional on them
  (e.g. on a rare class having been drawn). ``n_valid`` is always reported.

Hand-written because ``scipy.stats.bootstrap`` can neither stratify, nor take multiplicity weights for a
vectorised metric, nor report and police invalid replicates.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_VALID_SHARE = 0.95  # below this share of valid replicates an interval is null


def finite_or_none(v: Any) -> float | None:
    """JSON-safe float: NaN / inf / None -> None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def finite_or_nan(v: Any) -> float:
    """A float, NaN where ``v`` is None or not finite."""
    if v is None:
        return math.nan
    v = float(v)
    return v if math.isfinite(v) else math.nan


def strata_rows(strata: Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """Row indices of each stratum, strata in ``np.unique`` order."""
    s = np.asarray(strata)
    return [np.flatnonzero(s == u) for u in np.unique(s)]


def resample_weights(rng: np.random.Generator, n_boot: int, strata: Sequence[Any] | np.ndarray) -> np.ndarray:
    """(n_boot, n) multiplicities of a bootstrap stratified by ``strata`` (n,): each stratum's rows are drawn
    with replacement, as many as it has (one multinomial per stratum; pass one constant stratum for plain)."""
    s = np.asarray(strata)
    W = np.zeros((n_boot, len(s)))
    for rows in strata_rows(s):
        W[:, rows] = rng.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows)), size=n_boot)
    return W


def resample_indices(rng: np.random.Generator, n_boot: int, n: int,
                     strata: Sequence[Any] | np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) row indices of a bootstrap: plain, or stratified by ``strata`` (n,) (each row of the result
    lists stratum by stratum, in ``np.unique`` order, as many draws as the stratum has)."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    groups = strata_rows(strata)
    if sum(len(g) for g in groups) != n:
        raise ValueError(f"strata must have length {n}")
    return np.stack([np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
                     for _ in range(n_boot)]) if n_boot else np.zeros((0, n), dtype=int)


def multiplicities(idx: np.ndarray, n: int) -> np.ndarray:
    """Row indices (B, m) -> multiplicities (B, n)."""
    idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
    out = np.zeros((len(idx), n))
    for b, r in enumerate(idx):
        out[b] = np.bincount(r, minlength=n)
    return out


@dataclass(frozen=True)
class Interval:
    """A percentile interval: ``low``/``high`` NaN when null (see the validity rule); ``n_valid`` of ``n_boot``."""

    low: float
    high: float
    n_valid: int
    n_boot: int

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def json(self, prefix: str = "ci") -> dict[str, Any]:
        """``{prefix_low, prefix_high}`` (None when null)."""
        return {f"{prefix}_low": finite_or_none(self.low), f"{prefix}_high": finite_or_none(self.high)}


def valid_enough(n_valid: int, n_boot: int, min_valid_share: float = MIN_VALID_SHARE) -> bool:
    """The validity rule: at least ``min_valid_share`` of the replicates valid (and at least one)."""
    return n_valid > 0 and n_valid >= min_valid_share * n_boot


def percentile_interval(values: Sequence[float] | np.ndarray, alpha: float = 0.05, *, n_boot: int | None = None,
                        estimate: float | None = 0.0,
                        min_valid_share: float = MIN_VALID_SHARE) -> Interval:
    """Percentile interval of bootstrap replicate values (NaN = invalid replicate) under the validity rule.

    ``n_boot``: the number of replicates drawn (default ``len(values)``; pass it when invalid replicates were
    dropped before). ``estimate``: the point estimate, when there is one; None / NaN makes the interval null
    too (the default 0.0 only stands for "defined").
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n_boot = len(v) if n_boot is None else int(n_boot)
    ok = v[np.isfinite(v)]
    lo = hi = math.nan
    if math.isfinite(finite_or_nan(estimate)) and valid_enough(len(ok), n_boot, min_valid_share):
        lo, hi = (float(x) for x in np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return Interval(lo, hi, int(len(ok)), n_boot)


def percentile_interval_and_p(boots: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Percentile interval of bootstrap differences and the two-sided p-value that inverts it.

    The interval is ``[d*_(k), d*_(B+1-k)]`` (order statistics of the ``B`` replicate differences), ``k`` the
    smallest count with ``2 k / B >= alpha``; ``p = min(1, 2 min(#{d* <= 0}, #{d* >= 0}) / B)``. So ``p <
    alpha`` iff fewer than ``k`` replicates lie on one side of 0 (inclusive) iff the interval excludes 0, in
    floating point too.
    """
    b = np.sort(np.asarray(boots, dtype=np.float64))
    B = len(b)
    if B == 0:
        raise ValueError("no bootstrap replicates")
    k = max(1, math.ceil(B * alpha / 2))
    while k > 1 and 2 * (k - 1) / B >= alpha:
        k -= 1
    while 2 * k / B < alpha:
        k += 1
    lo, hi = float(b[k - 1]), float(b[B - k])
    below, above = int(np.count_nonzero(b <= 0)), int(np.count_nonzero(b >= 0))
    p = min(1.0, 2 * min(below, above) / B)
    return lo, hi, p
