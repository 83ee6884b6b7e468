"""Operating points of a binary classifier: a threshold chosen for a target sensitivity or specificity.

``--operating-point sens=0.9`` picks the **highest** threshold whose sensitivity on the choosing data is at least
0.9 (so specificity is as high as that allows); ``spec=0.9`` picks the **lowest** threshold whose specificity is at
least 0.9 (so sensitivity is as high as that allows). A patient is called positive when ``p >= threshold``.

The choosing data are never the patients the threshold is judged on: in cross-validation each fold's threshold
comes from cross-validated probabilities of that fold's *training* patients (nested), and is applied to the
fold's test patients; the final model's threshold comes from the out-of-fold probabilities of the whole cohort.
:func:`threshold_metrics` reports sensitivity, specificity, PPV and NPV of the decisions with 95% percentile
bootstrap intervals (:mod:`.bootstrap`; vectorised over replicates; patients resampled without stratification,
since PPV and NPV depend on the prevalence; a replicate without positives, negatives or calls of a kind gives no
value for that ratio only, counted in ``n_valid``; an interval is null when fewer than ``MIN_VALID_SHARE`` of
the replicates gave a value).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcli.heads.evaluation.bootstrap import finite_or_none, percentile_interval, resample_indices
from mmcli.pipeline.errors import InputError

KINDS = {"sens": "sensitivity", "spec": "specificity"}


@dataclass(frozen=True)
class OperatingPoint:
    """``kind`` ``sens`` or ``spec`` and the ``target`` rate in (0, 1)."""

    kind: str
    target: float

    def __str__(self) -> str:
        return f"{self.kind}={self.target:g}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "text": str(self)}


def parse_operating_point(text: str | None) -> OperatingPoint | None:
    """``"sens=0.9"`` / ``"spec=0.95"`` -> :class:`OperatingPoint`; None/empty -> None; anything else InputError."""
    if text is None or not str(text).strip():
        return None
    key, sep, value = str(text).strip().partition("=")
    key = key.strip().lower()
    key = {"sensitivity": "sens", "specificity": "spec"}.get(key, key)
    try:
        target = float(value)
    except ValueError:
        target = math.nan
    if not sep or key not in KINDS or not (0.0 < target < 1.0):
        raise InputError(f"--operating-point {text!r}: expected sens=RATE or spec=RATE with RATE in (0, 1), "
                         "e.g. --operating-point sens=0.9.")
    return OperatingPoint(key, target)


def choose_threshold(y: np.ndarray, p: np.ndarray, op: OperatingPoint) -> float:
    """The threshold on ``p`` (positive-class probabilities of 0/1 outcomes ``y``) meeting ``op`` (see module)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y, dtype=int)
    if y.min() == y.max():
        raise InputError(f"--operating-point {op}: the data to choose the threshold on hold one class only. "
                         "Fix: use more patients per fold.")
    fpr, tpr, thr = roc_curve(y, np.asarray(p, dtype=np.float64), drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # roc_curve's first threshold is +inf (nobody positive)
    if op.kind == "sens":
        ok = np.flatnonzero(tpr >= op.target - 1e-12)
        return float(thr[ok[0]])  # thresholds decrease along the curve: the first that reaches it is the highest
    ok = np.flatnonzero(1.0 - fpr >= op.target - 1e-12)
    return float(thr[ok[-1]])


def _rates(y: np.ndarray, call: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV along the last axis (arrays of 0/1, any leading shape)."""
    tp = np.sum(call & y, axis=-1)
    fn = np.sum(~call & y, axis=-1)
    fp = np.sum(call & ~y, axis=-1)
    tn = np.sum(~call & ~y, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray, n_boot: int = 200, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV of ``p >= threshold`` (one threshold, or one per patient) with 95%
    percentile bootstrap CIs over patients, plus the 2x2 counts."""
    y = np.asarray(y).astype(bool)
    call = np.asarray(p, dtype=np.float64) >= np.asarray(threshold, dtype=np.float64)
    point = _rates(y, call)
    rng = np.random.default_rng(seed)
    idx = resample_indices(rng, n_boot, len(y))
    boot = _rates(y[idx], call[idx])
    out: dict[str, Any] = {}
    for name, v in point.items():
        ci = percentile_interval(boot[name], alpha, estimate=float(v))
        out[name] = {"value": finite_or_none(v), **ci.json(), "n_valid": ci.n_valid}
    out["counts"] = {"tp": int(np.sum(call & y)), "fp": int(np.sum(call & ~y)), "tn": int(np.sum(~call & ~y)),
                     "fn": int(np.sum(~call & y))}
    return out
