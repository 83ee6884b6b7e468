"""Metrics of cross-validated predictions: per-fold values, a bootstrap CI and a corrected t-interval.

Metric definitions follow scikit-learn, lifelines and scikit-survival exactly (:func:`classification_metrics`
and :func:`survival_metrics` call them). The bootstrap evaluates the same definitions in a vectorised,
*weighted* form (a resample is a vector of multiplicities, so one matrix product scores all replicates);
the tests check the weighted form against the library functions on the full data and on resamples.

Classification (``probs`` (n, K), class codes ``y`` in 0..K-1):
    auroc (binary: positive class = code 1; multiclass: macro one-vs-rest), auprc (average precision;
    multiclass: macro one-vs-rest), f1_macro and balanced_accuracy of ``argmax(probs)``, brier (binary:
    Brier score of the positive class; multiclass: the **mean of the K one-vs-rest Brier scores**).
Survival (``risk`` (n,), higher = shorter survival; ``event`` 1 = observed):
    c_index (Harrell, as lifelines' ``concordance_index`` of ``-risk``), c_index_uno (scikit-survival
    ``concordance_index_ipcw``, censoring distribution from the training fold, truncated at the last grid
    time), td_auc (scikit-survival ``cumulative_dynamic_auc``, its Kaplan-Meier-weighted mean over the grid)
    and ibs (``integrated_brier_score`` of the predicted survival curves over the grid).
    **One evaluation grid for all folds** (:func:`survival_grid`): ``GRID_POINTS`` equally spaced times from
    the latest of the folds' earliest test events to the ``GRID_UPPER_QUANTILE``-th percentile of the whole
    cohort's observed times, below every fold's last test time. Every fold is scored on the same times, so
    the fold values average one quantity; the grid is recorded in metrics.json (``eval_times``).

Regression (``value`` (n,) predicted, ``y`` the observed values): r2, mae, rmse, pearson, spearman
    (:mod:`.regression`).

Summary (:func:`summarise`), per metric:
    ``per_fold`` the metric on each fold's test patients; ``mean`` their mean (the cross-validation estimate;
    ``null`` when any fold is undefined: never an average over the folds that happened to be defined).
    ``ci_low``/``ci_high``: percentile bootstrap interval of that mean. Each replicate resamples every fold's
    test patients with replacement, **stratified within the fold** so that every replicate is evaluable by
    construction: by class (classification: every class of the fold stays present), or (survival) into
    events at or before the first grid time / patients followed past the last grid time / the rest (so every
    replicate has a case and a control at every grid time and a comparable pair); without a grid, by event
    status. The fold models, their training data (Breslow baseline, censoring distribution) and the grid are
    held fixed: the interval covers the test-sample variability of these K fitted models, not training
    variability. A replicate is valid when every fold's value is defined; ``n_valid`` of ``n_boot`` were (by
    construction all of them, unless a fold itself is degenerate); the interval is ``null`` when fewer than
    ``bootstrap.MIN_VALID_SHARE`` of the replicates were valid (it would be conditional on the evaluable ones).
    ``ci_t_low``/``ci_t_high``: corrected resampled t-interval (:func:`corrected_t_interval`) over the
    per-fold values, which also covers the variability of training. ``headline``: which of the two to show
    first (``"ci_t"`` for 2 or more folds, ``"ci"`` for one evaluation set; :mod:`.headline`). Resampling,
    percentiles and the validity rule are :mod:`.bootstrap`'s. JSON gets ``null`` for NaN.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mmcli.heads.evaluation.bootstrap import finite_or_nan, finite_or_none, percentile_interval, resample_weights
from mmcli.heads.evaluation.headline import CI_BOOT, CI_T, headline_for
from mmcli.heads.evaluation.regression import BOUNDS, weighted_regression_metrics

CLASSIFICATION_METRICS = ("auroc", "auprc", "f1_macro", "balanced_accuracy", "brier")
SURVIVAL_METRICS = ("c_index", "c_index_uno", "ibs", "td_auc")
GRID_METRICS = ("c_index_uno", "ibs", "td_auc")  # the survival metrics that use the evaluation grid
GRID_POINTS = 10
GRID_UPPER_QUANTILE = 80.0
TIED_TOL = 1e-8  # scikit-survival's tolerance for tied risks (Uno's c, td-AUC)


# ---- classification (library reference) ----------------------------------------------------------------
def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """auroc, auprc, f1_macro, balanced_accuracy, brier for codes ``y`` and probabilities (n, K)."""
    from sklearn.metrics import (
        average_precision_score,
        balanced_accuracy_score,
        brier_score_loss,
        f1_score,
        roc_auc_score,
    )
    from sklearn.preprocessing import label_binarize

    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    K = probs.shape[1]
    pred = probs.argmax(axis=1)
    out: dict[str, float] = {
        "f1_macro": float(f1_score(y, pred, average="macro", labels=np.arange(K), zero_division=0)),
        "balanced_accuracy": _safe(lambda: balanced_accuracy_score(y, pred)),
    }
    if K == 2:
        out["auroc"] = _safe(lambda: roc_auc_score(y, probs[:, 1]))
        out["auprc"] = _safe(lambda: average_precision_score(y, probs[:, 1]))
        out["brier"] = _safe(lambda: brier_score_loss(y, probs[:, 1], pos_label=1))
    else:
        onehot = label_binarize(y, classes=np.arange(K))
        complete = len(np.unique(y)) == K
        out["auroc"] = _safe(lambda: roc_auc_score(y, probs, multi_class="ovr", average="macro",
                                                   labels=np.arange(K))) if complete else math.nan
        out["auprc"] = _safe(lambda: average_precision_score(onehot, probs, average="macro")) if complete \
            else math.nan
        out["brier"] = float(np.mean([brier_score_loss(onehot[:, k], probs[:, k], pos_label=1) for k in range(K)]))
    return {k: out[k] for k in CLASSIFICATION_METRICS}


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Binary AUROC by midranks, the Mann-Whitney U / (m n) (= scikit-learn's ``roc_auc_score``; ties count one
    half); NaN without both classes. The one unweighted AUROC of mmcli; :func:`_weighted_auc` is its weighted,
    vectorised form for bootstrap replicates (the tests check both against scikit-learn)."""
    from scipy.stats import rankdata

    pos = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    m = int(pos.sum())
    if m == 0 or m == len(pos):
        return math.nan
    return float((rankdata(s)[pos].sum() - m * (m + 1) / 2.0) / (m * (len(pos) - m)))


# ---- survival (grid and library reference) -------------------------------------------------------------
def survival_grid(time: np.ndarray, event: np.ndarray, test_folds: Sequence[np.ndarray] | None = None,
                  n: int = GRID_POINTS, upper_quantile: float = GRID_UPPER_QUANTILE) -> np.ndarray:
    """The one evaluation grid of a cross-validation, shared by all folds.

    ``n`` equally spaced times from ``lo`` to ``hi``: ``lo`` = the latest of the folds' earliest test events
    (so every fold, and every stratified resample of it, has a case at every grid time), ``hi`` = the
    ``upper_quantile``-th percentile of the whole cohort's observed times (events and censorings), kept
    strictly below every fold's last test time (so there is a control at every grid time). ``test_folds``:
    each fold's test indices into ``time``; None = the cohort is one test set. Empty where no such time
    exists (too few events); the time-grid metrics are then undefined.
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    folds = [np.arange(len(t))] if test_folds is None else [np.asarray(f) for f in test_folds]
    if len(t) == 0 or any(len(f) == 0 or not e[f].any() for f in folds):
        return np.zeros(0)
    lo = max(float(t[f][e[f]].min()) for f in folds)
    last = min(float(t[f].max()) for f in folds)
    hi = min(float(np.percentile(t, upper_quantile)), last)
    if hi <= lo:
        return np.array([lo]) if lo < last else np.zeros(0)
    grid = np.unique(np.linspace(lo, hi, n))
    return grid[grid < last]


def eval_times(train_time: np.ndarray, train_event: np.ndarray, test_time: np.ndarray, n: int = 10,
               lo: float = 10.0, hi: float = 70.0) -> np.ndarray:
    """Superseded by :func:`survival_grid` (one grid for all folds); kept only for callers not yet moved.

    Percentiles ``lo..hi`` of the training fold's event times, strictly inside the test fold's follow-up.
    """
    ev = np.asarray(train_time, dtype=np.float64)[np.asarray(train_event).astype(bool)]
    if len(ev) < 2:
        return np.zeros(0)
    t = np.unique(np.percentile(ev, np.linspace(lo, hi, n)))
    tt = np.asarray(test_time, dtype=np.float64)
    upper = min(tt.max(), np.asarray(train_time).max())
    return t[(t > tt.min()) & (t < upper)]


def survival_metrics(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None, surv: np.ndarray | None = None, times: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
) -> dict[str, float]:
    """c_index (+ c_index_uno, ibs, td_auc when the training fold, survival curves ``surv`` (n, T) at
    ``times`` are given), straight from lifelines / scikit-survival. ``risk``: higher = shorter survival.

    scikit-survival evaluates the censoring distribution at *every* test event time, so it refuses a test set
    with an event after the training follow-up even where the metric does not need it; the weighted form
    used by :func:`summarise` only evaluates it where the definition does (and otherwise agrees).
    """
    from lifelines.utils import concordance_index

    time, risk = np.asarray(time, dtype=np.float64), np.asarray(risk, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    out = dict.fromkeys(SURVIVAL_METRICS, math.nan)
    if event.any():
        out["c_index"] = _safe(lambda: concordance_index(time, -risk, event))
    if train_time is None or train_event is None or times is None or len(times) == 0 or not event.any():
        return out
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
    from sksurv.util import Surv

    if y_train is None:
        y_train = Surv.from_arrays(np.asarray(train_event).astype(bool), np.asarray(train_time, dtype=np.float64))
    y_test = Surv.from_arrays(event, time)
    times = np.asarray(times, dtype=np.float64)
    out["c_index_uno"] = _safe(lambda: concordance_index_ipcw(y_train, y_test, risk, tau=times[-1])[0])
    out["td_auc"] = _safe(lambda: cumulative_dynamic_auc(y_train, y_test, risk, times)[1])
    if surv is not None and len(times) >= 2:
        out["ibs"] = _safe(lambda: integrated_brier_score(y_train, y_test, surv, times))
    return out


def _safe(fn: Callable[[], Any]) -> float:
    """The metric, or NaN where it is undefined for these inputs (sklearn/sksurv raise ValueError)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = float(fn())
        except (ValueError, ZeroDivisionError, IndexError):
            return math.nan
    return v if math.isfinite(v) else math.nan


# ---- weighted (vectorised) forms: W (B, n) = multiplicity of each patient in each replicate -------------
def _pair_scores(a: np.ndarray, b: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """(len(a), len(b)): 1 where a_i > b_j, 1/2 where tied (within ``tol``), else 0."""
    d = a[:, None] - b[None, :]
    return np.where(np.abs(d) <= tol, 0.5, (d > 0).astype(np.float64))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _weighted_auc(W: np.ndarray, pos: np.ndarray, score: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """Weighted Mann-Whitney AUC (= roc_auc_score with sample_weight) per replicate; NaN without both classes."""
    S = _pair_scores(score[pos], score[~pos], tol)
    Wp, Wn = W[:, pos], W[:, ~pos]
    return _ratio(((Wp @ S) * Wn).sum(1), Wp.sum(1) * Wn.sum(1))


def _weighted_ap(W: np.ndarray, pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Weighted average precision (= average_precision_score with sample_weight) per replicate."""
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    tp = np.cumsum(W[:, order] * pos[order], axis=1)
    fp = np.cumsum(W[:, order] * ~pos[order], axis=1)
    last = np.r_[s[1:] != s[:-1], True]  # one threshold per distinct score
    tp, fp = tp[:, last], fp[:, last]
    precision = _ratio(tp, tp + fp)
    precision[np.isnan(precision)] = 0.0  # no predicted positives yet: the recall step there is 0 too
    recall_step = np.diff(np.concatenate([np.zeros((len(W), 1)), tp], axis=1), axis=1)
    return _ratio((recall_step * precision).sum(1), tp[:, -1])


def weighted_classification_metrics(y: np.ndarray, probs: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`classification_metrics` of every replicate of ``W`` (B, n) at once; each value (B,)."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    K = probs.shape[1]
    total = W.sum(1)
    pred = probs.argmax(1)
    conf = (W @ np.eye(K * K)[y * K + pred]).reshape(len(W), K, K)  # [b, true, predicted]
    tp = np.diagonal(conf, axis1=1, axis2=2)
    support, predicted = conf.sum(2), conf.sum(1)
    f1_den = support + predicted
    f1 = np.where(f1_den > 0, 2 * tp / np.where(f1_den > 0, f1_den, 1), 0.0).mean(1)
    f1[total <= 0] = np.nan  # no patient in the replicate (a subgroup not drawn): undefined, not 0
    present = support > 0
    recall = np.where(present, tp / np.where(present, support, 1), 0.0)
    balanced = _ratio(recall.sum(1), present.sum(1).astype(np.float64))
    onehot = np.eye(K)[y]
    if K == 2:
        auroc = _weighted_auc(W, y == 1, probs[:, 1])
        auprc = _weighted_ap(W, y == 1, probs[:, 1])
        brier = _ratio(W @ (probs[:, 1] - (y == 1)) ** 2, total)
    else:
        complete = present.all(1)
        auroc = np.mean([_weighted_auc(W, y == k, probs[:, k]) for k in range(K)], axis=0)
        auprc = np.mean([_weighted_ap(W, y == k, probs[:, k]) for k in range(K)], axis=0)
        auroc[~complete], auprc[~complete] = np.nan, np.nan
        brier = _ratio(W @ ((probs - onehot) ** 2).mean(1), total)
    out = {"auroc": auroc, "auprc": auprc, "f1_macro": f1, "balanced_accuracy": balanced, "brier": brier}
    return {k: out[k] for k in CLASSIFICATION_METRICS}


class _SurvivalScorer:
    """Weighted forms of the survival metrics of one fold; everything not resampled is computed once."""

    def __init__(self, f: FoldPredictions) -> None:
        assert f.time is not None and f.event is not None and f.risk is not None
        t = np.asarray(f.time, dtype=np.float64)
        e = np.asarray(f.event).astype(bool)
        r = np.asarray(f.risk, dtype=np.float64)
        # i is comparable with j: i's event comes first (an event ties with a censoring at the same time)
        comparable = e[:, None] & ((t[None, :] > t[:, None]) | ((t[None, :] == t[:, None]) & ~e[None, :]))
        self.harrell = (comparable * _pair_scores(r, r), comparable.astype(np.float64))
        self.grid: np.ndarray = np.zeros(0) if f.times is None else np.asarray(f.times, dtype=np.float64)
        self.grid_ok = len(self.grid) > 0 and f.train_time is not None and f.train_event is not None
        if not self.grid_ok:
            return
        times = self.grid
        tau = times[-1]
        g_t, g_i = _censoring_survival(f.train_time, f.train_event, times, np.minimum(t, tau))  # type: ignore[arg-type]
        need = e & (t <= tau)
        if g_t is None or g_i is None or (g_t <= 0).any() or (g_i[need] <= 0).any():
            self.grid_ok = False
            return
        inv = np.where(need, 1.0 / np.where(need, g_i, 1.0), 0.0)  # type: ignore[arg-type]
        tied = _pair_scores(r, r, TIED_TOL)
        uno_w = np.where(e & (t < tau), inv ** 2, 0.0)[:, None] * comparable
        self.uno = (uno_w * tied, uno_w)
        self.tied = tied
        self.case = (e[:, None] & (t[:, None] <= times[None, :])) * inv[:, None]  # IPCW case weights (n, T)
        self.control = (t[:, None] > times[None, :]).astype(np.float64)
        self.km_times = np.unique(t)
        self.km_event = (e[:, None] & (t[:, None] == self.km_times[None, :])).astype(np.float64)
        self.km_risk = (t[:, None] >= self.km_times[None, :]).astype(np.float64)
        self.km_at = np.searchsorted(self.km_times, times, side="right") - 1
        if f.surv is not None and len(times) >= 2:
            s = np.asarray(f.surv, dtype=np.float64)
            self.brier_terms = s ** 2 * self.case + (1 - s) ** 2 * self.control / g_t[None, :]
        else:
            self.brier_terms = None

    def __call__(self, W: np.ndarray) -> dict[str, np.ndarray]:
        B = len(W)
        num, den = self.harrell
        out = {k: np.full(B, np.nan) for k in SURVIVAL_METRICS}
        out["c_index"] = _ratio(((W @ num.T) * W).sum(1), ((W @ den.T) * W).sum(1))
        if not self.grid_ok:
            return out
        num, den = self.uno
        out["c_index_uno"] = _ratio(((W @ num.T) * W).sum(1), ((W @ den.T) * W).sum(1))
        T = len(self.grid)
        auc = np.empty((B, T))
        for k in range(T):
            q = (W * self.control[:, k]) @ self.tied.T  # (B, n): weighted controls each patient outranks
            auc[:, k] = _ratio(((W * self.case[:, k]) * q).sum(1), (W @ self.case[:, k]) * (W @ self.control[:, k]))
        if T == 1:
            out["td_auc"] = auc[:, 0]
        else:  # scikit-survival's mean: AUC(t) weighted by the drop of the test Kaplan-Meier curve
            d, r = W @ self.km_event, W @ self.km_risk
            km = np.cumprod(np.where(r > 0, 1 - d / np.where(r > 0, r, 1), 1.0), axis=1)
            s = np.where(self.km_at >= 0, km[:, np.maximum(self.km_at, 0)], 1.0)
            drop = -np.diff(np.concatenate([np.ones((B, 1)), s], axis=1), axis=1)
            out["td_auc"] = _ratio((auc * drop).sum(1), 1 - s[:, -1])
        if self.brier_terms is not None:
            bs = (W @ self.brier_terms) / W.sum(1)[:, None]
            out["ibs"] = np.trapezoid(bs, self.grid, axis=1) / (self.grid[-1] - self.grid[0])
        return out


def _censoring_survival(train_time: np.ndarray, train_event: np.ndarray, *at: np.ndarray
                        ) -> tuple[np.ndarray | None, ...]:
    """Kaplan-Meier of the training fold's censoring times (scikit-survival's estimator) at each ``at``;
    None where it is not defined there (after the training follow-up)."""
    from sksurv.nonparametric import CensoringDistributionEstimator
    from sksurv.util import Surv

    y = Surv.from_arrays(np.asarray(train_event).astype(bool), np.asarray(train_time, dtype=np.float64))
    est = CensoringDistributionEstimator().fit(y)
    out: list[np.ndarray | None] = []
    for a in at:
        try:
            out.append(np.asarray(est.predict_proba(np.asarray(a, dtype=np.float64)), dtype=np.float64))
        except ValueError:
            out.append(None)
    return tuple(out)


# ---- per-fold evaluation -----------------------------------------------------------------------------------
@dataclass
class FoldPredictions:
    """A fold's test predictions plus what survival metrics need from its training part.

    Survival: ``times`` is the cross-validation's one grid (:func:`survival_grid`), ``surv`` (n, T) the
    predicted survival probabilities at it; ``train_time``/``train_event`` give the censoring distribution.
    """

    y: np.ndarray | None = None  # classification codes, or a regression's observed values
    probs: np.ndarray | None = None  # (n, K)
    value: np.ndarray | None = None  # regression: the predicted values (n,), in the target's unit
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    risk: np.ndarray | None = None
    surv: np.ndarray | None = None  # (n, T) survival probabilities at ``times``
    times: np.ndarray | None = None
    train_time: np.ndarray | None = None
    train_event: np.ndarray | None = None
    _scorer: _SurvivalScorer | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.y) if self.y is not None else len(self.time)  # type: ignore[arg-type]

    @property
    def is_survival(self) -> bool:
        return self.y is None

    @property
    def is_regression(self) -> bool:
        return self.value is not None

    def metrics(self, rows: np.ndarray | None = None) -> dict[str, float]:
        """The metrics on the fold's test patients, or on rows ``rows`` (with repeats, as a resample)."""
        w = np.ones(len(self)) if rows is None else np.bincount(np.asarray(rows), minlength=len(self))
        return {k: finite_or_nan(v[0]) for k, v in self.replicate_metrics(w[None, :]).items()}

    def replicate_metrics(self, W: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for each row of multiplicities ``W`` (B, n) at once; NaN where undefined."""
        W = np.atleast_2d(np.asarray(W, dtype=np.float64))
        if self.is_regression:
            assert self.y is not None and self.value is not None
            return weighted_regression_metrics(self.y, self.value, W)
        if not self.is_survival:
            assert self.y is not None and self.probs is not None
            return weighted_classification_metrics(self.y, self.probs, W)
        if self._scorer is None:
            self._scorer = _SurvivalScorer(self)
        return self._scorer(W)

    def strata(self) -> np.ndarray:
        """Resampling strata that keep every replicate evaluable (see the module docstring)."""
        if self.is_regression:  # every resample is evaluable: plain resampling
            return np.zeros(len(self), dtype=int)
        if not self.is_survival:
            return np.asarray(self.y, dtype=int)
        t, e = np.asarray(self.time, dtype=np.float64), np.asarray(self.event).astype(bool)
        if self.times is None or len(self.times) == 0:
            return e.astype(int)
        return np.where(e & (t <= self.times[0]), 0, np.where(t > self.times[-1], 2, 1))

    def resample(self, rng: np.random.Generator, n_boot: int) -> np.ndarray:
        """(n_boot, n) multiplicities of a bootstrap stratified by :meth:`strata`."""
        return resample_weights(rng, n_boot, self.strata())


# ---- intervals and summary -----------------------------------------------------------------------------------
def corrected_t_interval(values: Sequence[float], test_sizes: Sequence[int], alpha: float = 0.05,
                         bounds: tuple[float, float] | None = (0.0, 1.0)) -> tuple[float, float]:
    """Corrected resampled t-interval (Nadeau & Bengio 2003, Machine Learning 52:239) of the mean over folds.

    ``mean ± t(K-1, 1-alpha/2) · sqrt((1/K + n_test/n_train) · s²)``, ``s²`` the sample variance of the K
    fold values, ``n_test/n_train`` the mean over folds of the test/training size ratio (1/(K-1) for equal
    K-fold splits; training size = all patients minus the fold's test patients). Clipped to ``bounds``.

    Why this interval: each fold value comes from a model trained on a different training set, so their spread
    carries the variability of training as well as of the test patients, which the bootstrap (fold models held
    fixed) leaves out. The naive t-interval ``s / sqrt(K)`` is too narrow because folds share training patients
    (their values are positively correlated), and no unbiased estimator of the K-fold variance exists (Bengio &
    Grandvalet 2004); the ``n_test/n_train`` term is Nadeau & Bengio's correction for that correlation, the
    usual choice for K-fold (Bouckaert & Frank 2004). Repeated K-fold would estimate the same thing with R
    times the training cost (minutes per fold for attention MIL), which this needs none of. With K=5 it has 4
    degrees of freedom, so it is wide; NaN when a fold is undefined or K < 2.
    """
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64)
    sizes = np.asarray(test_sizes, dtype=np.float64)
    K = len(v)
    if K < 2 or not np.isfinite(v).all() or len(sizes) != K:
        return math.nan, math.nan
    ratio = float(np.mean(sizes / (sizes.sum() - sizes)))
    half = float(student_t.ppf(1 - alpha / 2, K - 1)) * math.sqrt((1.0 / K + ratio) * v.var(ddof=1))
    lo, hi = float(v.mean()) - half, float(v.mean()) + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return lo, hi


def center_risks_by_fold(pred: pd.DataFrame, fold_col: str = "fold", risk_col: str = "risk") -> pd.DataFrame:
    """A copy of out-of-fold predictions with each fold's risks minus that fold's mean risk.

    The Cox partial likelihood is invariant to adding a constant to every risk, so each fold model's risks
    carry an arbitrary offset; pooled across folds, those offsets mix into every pooled statistic (c-index of
    the pooled risks, risk groups). Centring per fold removes them and changes no within-fold ranking, so
    per-fold metrics are unchanged. Idempotent. Scale differences between fold models are not touched.
    """
    if fold_col not in pred.columns or risk_col not in pred.columns:
        raise ValueError(f"predictions need columns {fold_col!r} and {risk_col!r}")
    out = pred.copy()
    out[risk_col] = out[risk_col] - out.groupby(fold_col)[risk_col].transform("mean")
    return out


def interval_descriptions(survival: bool, n_folds: int | None = None, regression: bool = False) -> dict[str, str]:
    """What ``ci_low/ci_high`` and ``ci_t_low/ci_t_high`` cover, and (given ``n_folds``) which is the headline
    (written into every metric of metrics.json)."""
    strata = ("events at or before the first grid time / patients followed past the last grid time / the rest"
              if survival else "class")
    how = "not stratified" if regression else f"stratified by {strata}, so every replicate is evaluable"
    out = {
        "ci": "percentile bootstrap of the mean over folds: each fold's test patients resampled with replacement "
              f"({how}); fold models, training data and "
              "evaluation grid held fixed: covers test-patient variability of these fitted models, not training "
              "variability",
        "ci_t": "corrected resampled t-interval (Nadeau & Bengio 2003) over the per-fold values, variance "
                "(1/K + n_test/n_train) s^2, K-1 degrees of freedom: approximately covers training and test "
                "variability of the procedure",
    }
    if n_folds is not None:
        out["headline"] = (
            "ci_t: a cross-validation estimates the procedure's performance on new patients; the bootstrap "
            "(fold models fixed) under-covers it (benchmarks/bench_coverage.py)" if headline_for(n_folds) == CI_T
            else "ci: one evaluation set of a fixed model; the bootstrap over its patients covers this model's "
                 "performance (no t-interval over a single value)")
    return out


def summarise(folds: Sequence[FoldPredictions], n_boot: int = 1000, seed: int = 0,
              alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Per metric: ``mean, ci_low, ci_high, per_fold`` plus ``n_boot, n_valid, ci_t_low, ci_t_high``,
    ``headline`` (``"ci_t"`` with 2 or more folds, else ``"ci"``), ``interval`` (what each interval covers)
    and, for the grid metrics, ``eval_times`` (module docstring)."""
    folds = list(folds)
    if not folds:
        raise ValueError("summarise needs at least one fold")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    survival = folds[0].is_survival
    grid = None
    if survival:
        grid = np.zeros(0) if folds[0].times is None else np.asarray(folds[0].times, dtype=np.float64)
        for f in folds[1:]:
            other = np.zeros(0) if f.times is None else np.asarray(f.times, dtype=np.float64)
            if other.shape != grid.shape or not np.array_equal(other, grid):
                raise ValueError("survival folds must share one evaluation grid (build it with survival_grid)")
    per_fold = [f.metrics() for f in folds]
    names = list(per_fold[0])
    rng = np.random.default_rng(seed)
    boot = np.zeros((n_boot, len(names)))
    for f in folds:  # NaN in any fold makes the replicate NaN: no average over a subset of folds
        reps = f.replicate_metrics(f.resample(rng, n_boot))
        boot += np.stack([reps[k] for k in names], axis=1)
    boot /= len(folds)
    sizes = [len(f) for f in folds]
    intervals = interval_descriptions(survival, len(folds), regression=folds[0].is_regression)
    headline = headline_for(len(folds))
    out: dict[str, dict[str, Any]] = {}
    for j, k in enumerate(names):
        pf = np.array([m[k] for m in per_fold], dtype=np.float64)
        mean = float(pf.mean()) if np.isfinite(pf).all() else math.nan
        ci = percentile_interval(boot[:, j], alpha, estimate=mean)
        t_lo, t_hi = corrected_t_interval(pf, sizes, alpha, bounds=BOUNDS.get(k, (0.0, 1.0)))
        entry: dict[str, Any] = {
            "mean": finite_or_none(mean), **ci.json(CI_BOOT), "per_fold": [finite_or_none(v) for v in pf],
            "n_boot": n_boot, "n_valid": ci.n_valid, "ci_t_low": finite_or_none(t_lo),
            "ci_t_high": finite_or_none(t_hi), "headline": headline, "interval": intervals,
        }
        if survival and k in GRID_METRICS:
            entry["eval_times"] = [float(x) for x in grid]  # type: ignore[union-attr]
        out[k] = entry
    return out
