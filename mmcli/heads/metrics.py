"""Metrics of cross-validated predictions, with per-fold values and 95% bootstrap confidence intervals.

All metric values come from scikit-learn, lifelines and scikit-survival; only the bootstrap loop is ours.

Classification (``probs`` (n, K), class codes ``y`` in 0..K-1):
    auroc (binary: positive class = code 1; multiclass: macro one-vs-rest), auprc (average precision;
    multiclass: macro one-vs-rest), f1_macro and balanced_accuracy of ``argmax(probs)``, brier (binary:
    Brier score of the positive class; multiclass: the **mean of the K one-vs-rest Brier scores**).
Survival (``risk`` (n,), higher = shorter survival; ``event`` 1 = observed):
    c_index (Harrell, lifelines, computed on ``-risk`` because lifelines expects higher = longer survival),
    c_index_uno (scikit-survival ``concordance_index_ipcw``, censoring from the training fold, truncated at
    the last evaluation time), ibs (integrated Brier score of the predicted survival curves) and td_auc
    (mean cumulative/dynamic AUC), both scikit-survival, at evaluation times taken from the training
    fold's event times (see :func:`eval_times`).

Summary (:func:`summarise`): ``per_fold`` = the metric on each fold's test patients; ``mean`` = mean over
folds (the usual cross-validation estimate); ``ci_low``/``ci_high`` = 2.5/97.5 percentiles of that mean
under a bootstrap that resamples patients with replacement within each fold's test set (``n_boot``
replicates, seeded). A fold or replicate where a metric is undefined (e.g. one class only) gives NaN and is
left out of the averages; JSON gets ``null`` for NaN.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CLASSIFICATION_METRICS = ("auroc", "auprc", "f1_macro", "balanced_accuracy", "brier")
SURVIVAL_METRICS = ("c_index", "c_index_uno", "ibs", "td_auc")


# ---- classification --------------------------------------------------------------------------------------
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


# ---- survival --------------------------------------------------------------------------------------------
def eval_times(train_time: np.ndarray, train_event: np.ndarray, test_time: np.ndarray, n: int = 10,
               lo: float = 10.0, hi: float = 70.0) -> np.ndarray:
    """Evaluation times for ibs/td_auc: percentiles ``lo..hi`` of the training fold's event times, kept
    strictly inside the test fold's follow-up (scikit-survival requires it) and the training follow-up."""
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
    ``times`` are given). ``risk``: higher = shorter survival."""
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


# ---- per-fold evaluation and bootstrap ------------------------------------------------------------------------
@dataclass
class FoldPredictions:
    """A fold's test predictions plus what survival metrics need from its training part."""

    y: np.ndarray | None = None  # classification codes
    probs: np.ndarray | None = None  # (n, K)
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    risk: np.ndarray | None = None
    surv: np.ndarray | None = None  # (n, T) survival probabilities at ``times``
    times: np.ndarray | None = None
    train_time: np.ndarray | None = None
    train_event: np.ndarray | None = None
    _y_train: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.y) if self.y is not None else len(self.time)  # type: ignore[arg-type]

    def metrics(self, rows: np.ndarray | None = None) -> dict[str, float]:
        r = np.arange(len(self)) if rows is None else rows
        if self.y is not None:
            assert self.probs is not None
            return classification_metrics(self.y[r], self.probs[r])
        assert self.time is not None and self.event is not None and self.risk is not None
        if self._y_train is None and self.train_time is not None and self.train_event is not None:
            from sksurv.util import Surv

            self._y_train = Surv.from_arrays(np.asarray(self.train_event).astype(bool),
                                             np.asarray(self.train_time, dtype=np.float64))
        return survival_metrics(self.time[r], self.event[r], self.risk[r], train_time=self.train_time,
                                train_event=self.train_event, surv=None if self.surv is None else self.surv[r],
                                times=self.times, y_train=self._y_train)


def summarise(folds: Sequence[FoldPredictions], n_boot: int = 200, seed: int = 0,
              alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "ci_low", "ci_high", "per_fold"}}`` (see module docstring for definitions)."""
    per_fold = [f.metrics() for f in folds]
    names = list(per_fold[0])
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, len(names)), np.nan)
    for b in range(n_boot):
        reps = [f.metrics(rng.integers(0, len(f), len(f))) for f in folds]
        vals = np.array([[r[k] for k in names] for r in reps])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            boot[b] = np.nanmean(vals, axis=0)
    out: dict[str, dict[str, Any]] = {}
    for j, k in enumerate(names):
        pf = np.array([m[k] for m in per_fold], dtype=np.float64)
        col = boot[:, j][np.isfinite(boot[:, j])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = float(np.nanmean(pf)) if np.isfinite(pf).any() else math.nan
        lo, hi = (np.percentile(col, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(col) else (math.nan, math.nan))
        out[k] = {"mean": _num(mean), "ci_low": _num(lo), "ci_high": _num(hi), "per_fold": [_num(v) for v in pf]}
    return out


def _num(v: float) -> float | None:
    """JSON-safe float: NaN -> None."""
    v = float(v)
    return v if math.isfinite(v) else None
