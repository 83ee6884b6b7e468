"""Calibration of predicted probabilities: how far to trust them, and how to recalibrate them in-fold.

Assessment (:func:`calibration_report`), for the probabilities a model outputs:

* **reliability curve**: scikit-learn ``calibration_curve`` with quantile bins (mean predicted probability vs
  observed frequency per bin, and the bin sizes);
* **calibration slope**: ``b`` of the logistic recalibration model ``logit P(y=1) = c + b * logit(p)``
  (maximum likelihood); 1 = ideal, < 1 = predictions too extreme;
* **calibration intercept** (calibration-in-the-large): ``a`` of ``logit P(y=1) = a + logit(p)`` (the slope
  fixed at 1, logit(p) an offset); 0 = ideal, > 0 = the model under-predicts on average;
* 95% percentile bootstrap intervals of both (:mod:`.bootstrap`: patients resampled with replacement, not
  stratified, since the intercept depends on the outcome rate and stratifying by class would fix it; a
  replicate with one class only, or with complete separation, gives no value and is counted: ``n_valid``;
  the interval is null when fewer than ``MIN_VALID_SHARE`` of the replicates gave a value).

The two logistic fits are Newton-Raphson maximum likelihood, vectorised over bootstrap replicates (a replicate is
a vector of multinomial patient weights), so 1000 replicates cost one batched fit; the tests check them against
scikit-learn's unpenalised ``LogisticRegression``.

Binary tasks use the positive class; multiclass tasks get the same one-vs-rest for every class.

Recalibration (:class:`Calibrator`, ``--calibrate none|platt|isotonic``): fitted on **cross-validated
probabilities of the data the model was fitted on** (scikit-learn's ``CalibratedClassifierCV(ensemble=False)``
logic: the calibrator never learns from the model's in-sample, over-confident outputs). ``platt``: a logistic
regression of the class indicator on ``logit(p)``; ``isotonic``: ``IsotonicRegression(out_of_bounds="clip")``.
Multiclass: one calibrator per class (one-vs-rest) and the rows renormalised to sum to 1, as scikit-learn does.
A calibrator records the patients it was fitted on (``fitted_patients``) so the CV audit can prove that the
calibrator of a fold never saw that fold's test patients. Saved as JSON, never pickle.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmcli.heads.evaluation.bootstrap import finite_or_none, multiplicities, percentile_interval, resample_indices
from mmcli.pipeline.errors import InputError

METHODS = ("none", "platt", "isotonic")
EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def expit(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit as _expit

    return _expit(np.asarray(z, dtype=np.float64))


# ---- assessment ----------------------------------------------------------------------------------------------
def _logistic_fits(y: np.ndarray, lp: np.ndarray, w: np.ndarray, iters: int = 50) -> np.ndarray:
    """Weighted logistic MLEs for each row of weights ``w`` (B, n): columns (intercept a with logit(p) as
    offset, intercept, slope b of logit(p)). Newton-Raphson, vectorised over rows; NaN where it does not
    converge (e.g. complete separation) or one class has no weight."""
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    B = len(w)
    out = np.full((B, 3), np.nan)
    pos, neg = (w * y).sum(axis=1), (w * (1 - y)).sum(axis=1)
    ok = (pos > 0) & (neg > 0)
    # calibration-in-the-large: score sum w*(y - expit(a + lp)) = 0, one parameter
    a = np.zeros(B)
    for _ in range(iters):
        mu = expit(a[:, None] + lp[None, :])
        step = (w * (y - mu)).sum(axis=1) / np.maximum((w * mu * (1 - mu)).sum(axis=1), 1e-12)
        a = a + np.clip(step, -5, 5)
        if np.all(np.abs(step[ok]) < 1e-10):
            break
    conv_a = np.abs(step) < 1e-6
    out[:, 0] = np.where(ok & conv_a, a, np.nan)
    # recalibration model: logit P = c + b * lp, two parameters
    beta = np.zeros((B, 2))  # Newton from 0 (all mu = 1/2), the usual safe start for logistic regression
    X = np.stack([np.ones_like(lp), lp], axis=1)  # (n, 2)
    for _ in range(iters):
        mu = expit(beta[:, :1] + beta[:, 1:] * lp[None, :])  # (B, n)
        g = (w * (y - mu)) @ X  # (B, 2)
        v = w * mu * (1 - mu)
        H = np.einsum("bn,ni,nj->bij", v, X, X) + 1e-12 * np.eye(2)
        step = np.linalg.solve(H, g[:, :, None])[:, :, 0]
        beta = beta + np.clip(step, -5, 5)
        if np.all(np.abs(step[ok]) < 1e-10):
            break
    conv = np.all(np.abs(step) < 1e-6, axis=1) & (np.abs(beta[:, 1]) < 50)
    out[:, 1:] = np.where((ok & conv)[:, None], beta, np.nan)
    return out


def intercept_slope(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(calibration-in-the-large intercept, calibration slope) of probabilities ``p`` for 0/1 outcomes ``y``;
    NaN where undefined (one class only, or separation)."""
    y = np.asarray(y, dtype=np.float64)
    fit = _logistic_fits(y, logit(p), np.ones((1, len(y))))[0]
    return float(fit[0]), float(fit[2])


def binary_calibration(y: np.ndarray, p: np.ndarray, n_boot: int = 200, seed: int = 0, n_bins: int = 10,
                       alpha: float = 0.05) -> dict[str, Any]:
    """Reliability curve, intercept and slope with bootstrap CIs, and the Brier score, for one 0/1 outcome."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=np.float64)
    a, b = intercept_slope(y, p)
    # bootstrap replicates as multiplicity weights: one vectorised Newton fit for all of them
    rng = np.random.default_rng(seed)
    w = multiplicities(resample_indices(rng, n_boot, len(y)), len(y))
    boot = _logistic_fits(y.astype(np.float64), logit(p), w)[:, [0, 2]] if n_boot else np.zeros((0, 2))
    bins = min(n_bins, max(2, len(y) // 5))
    curve: dict[str, Any] = {"strategy": "quantile", "n_bins": bins}
    if y.min() != y.max():
        frac, mean_pred = calibration_curve(y, p, n_bins=bins, strategy="quantile")
        # bin sizes exactly as calibration_curve bins (quantile edges, searchsorted on the inner edges)
        edges = np.percentile(p, np.linspace(0, 100, bins + 1))
        counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=len(edges))
        counts = counts[counts > 0]
        curve.update(mean_predicted=[float(v) for v in mean_pred], observed=[float(v) for v in frac],
                     n=[int(c) for c in counts])
    ci_a = percentile_interval(boot[:, 0], alpha, n_boot=n_boot, estimate=a)
    ci_b = percentile_interval(boot[:, 1], alpha, n_boot=n_boot, estimate=b)
    return {
        "intercept": {"value": finite_or_none(a), **ci_a.json(), "n_valid": ci_a.n_valid},
        "slope": {"value": finite_or_none(b), **ci_b.json(), "n_valid": ci_b.n_valid},
        "brier": finite_or_none(float(brier_score_loss(y, p))),
        "mean_predicted": float(p.mean()), "observed_rate": float(y.mean()), "n": int(len(y)),
        "reliability": curve,
    }


def calibration_report(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, method: str = "none",
                       n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """metrics.json's ``calibration`` block: per assessed class (binary: the positive class; multiclass: each,
    one-vs-rest) the reliability curve, intercept, slope (with CIs) and Brier score of ``probs``."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    ks = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    per_class = {str(classes[k]): binary_calibration((y == k).astype(int), probs[:, k], n_boot=n_boot,
                                                      seed=seed + k) for k in ks}
    return {
        "method": method,
        "what": "out-of-fold probabilities as the model outputs them"
                + (f" (after in-fold {method} recalibration)" if method != "none" else " (no recalibration)"),
        "intercept_definition": "a in logit P(y=1) = a + logit(p) (calibration-in-the-large; ideal 0)",
        "slope_definition": "b in logit P(y=1) = a + b*logit(p) (ideal 1; < 1: too extreme)",
        "ci": "95% percentile bootstrap over patients (not stratified: the intercept depends on the outcome rate); "
              "null when fewer than 95% of the resamples gave a value",
        "n_boot": n_boot,
        "classes": per_class,
    }


# ---- recalibration -------------------------------------------------------------------------------------------
class Calibrator:
    """Maps a head's probabilities (n, K) to recalibrated probabilities; ``method="none"`` is the identity."""

    def __init__(self, method: str = "none") -> None:
        if method not in METHODS:
            raise InputError(f"--calibrate {method!r}: unknown method (takes: {', '.join(METHODS)}).")
        self.method = method
        self.maps: list[dict[str, Any]] = []
        self.fitted_patients: list[str] = []

    @property
    def active(self) -> bool:
        return self.method != "none"

    def fit(self, probs: np.ndarray, y: np.ndarray, patients: Sequence[str] = ()) -> Calibrator:
        """Fit on cross-validated probabilities ``probs`` (n, K) of patients with class codes ``y``."""
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        probs = np.asarray(probs, dtype=np.float64)
        y = np.asarray(y, dtype=int)
        self.fitted_patients = [str(p) for p in patients]
        self.maps = []
        if not self.active:
            return self
        ks = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
        for k in ks:
            yk = (y == k).astype(int)
            if yk.min() == yk.max():
                raise InputError(f"--calibrate {self.method}: the calibration data have no patient of class "
                                 f"{k} vs rest. Fix: use more patients per fold or --calibrate none.")
            if self.method == "platt":
                lr = LogisticRegression(C=1e6, max_iter=1000).fit(logit(probs[:, k])[:, None], yk)
                self.maps.append({"class": k, "coef": float(lr.coef_[0, 0]), "intercept": float(lr.intercept_[0])})
            else:
                iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(probs[:, k], yk)
                self.maps.append({"class": k, "x": [float(v) for v in iso.X_thresholds_],
                                  "y": [float(v) for v in iso.y_thresholds_]})
        return self

    def transform(self, probs: np.ndarray) -> np.ndarray:
        """Recalibrated probabilities (n, K), rows summing to 1."""
        probs = np.asarray(probs, dtype=np.float64)
        if not self.active:
            return probs
        out = probs.copy()
        for m in self.maps:
            k = m["class"]
            if self.method == "platt":
                out[:, k] = expit(m["intercept"] + m["coef"] * logit(probs[:, k]))
            else:  # IsotonicRegression.predict is linear interpolation between its thresholds, clipped
                out[:, k] = np.interp(probs[:, k], m["x"], m["y"])
        if probs.shape[1] == 2:
            out[:, 0] = 1.0 - out[:, 1]
            return out
        total = out.sum(axis=1, keepdims=True)
        uniform = np.full_like(out, 1.0 / out.shape[1])
        return np.where(total > 0, out / np.where(total > 0, total, 1.0), uniform)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "maps": self.maps, "n_fitted": len(self.fitted_patients),
                "fitted_on": "cross-validated probabilities of the patients the model was fitted on"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibrator:
        self = cls(str(d.get("method", "none")))
        self.maps = list(d.get("maps") or [])
        return self
