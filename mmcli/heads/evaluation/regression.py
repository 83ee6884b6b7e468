"""Regression metrics (a continuous target in its own unit): r2, mae, rmse, pearson, spearman.

Definitions follow scikit-learn and scipy exactly (:func:`regression_metrics` calls ``r2_score``,
``mean_absolute_error``, ``mean_squared_error``, ``pearsonr``, ``spearmanr``): ``r2`` is 1 - SS_res / SS_tot
with SS_tot around the evaluated patients' own mean (so a model that predicts the training mean scores about 0
on new patients, and below 0 when it is worse than that); ``mae`` and ``rmse`` are in the target's unit;
``pearson`` the correlation of the predictions with the values, ``spearman`` of their ranks (ties: midranks).

The bootstrap evaluates the same definitions weighted by multiplicities (:func:`weighted_regression_metrics`;
ranks are the resample's own midranks), checked against the library functions on resamples in the tests.
"""
from __future__ import annotations

import numpy as np

REGRESSION_METRICS = ("r2", "mae", "rmse", "pearson", "spearman")
# the range each metric can take, for clipping its t-interval
BOUNDS: dict[str, tuple[float, float]] = {"r2": (-np.inf, 1.0), "mae": (0.0, np.inf), "rmse": (0.0, np.inf),
                                          "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0)}


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The library values (scikit-learn, scipy) on all patients; NaN where undefined (constant values)."""
    import warnings

    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    out = {"r2": float(r2_score(y, pred)) if np.var(y) > 0 else float("nan"),
           "mae": float(mean_absolute_error(y, pred)), "rmse": float(np.sqrt(mean_squared_error(y, pred)))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        constant = np.var(y) == 0 or np.var(pred) == 0
        out["pearson"] = float("nan") if constant else float(pearsonr(y, pred)[0])
        out["spearman"] = float("nan") if constant else float(spearmanr(y, pred)[0])
    return out


def _weighted_corr(W: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per row of weights ``W`` (B, n); ``a``, ``b`` (n,) or (B, n)."""
    total = W.sum(1)
    a2, b2 = np.broadcast_to(a, W.shape), np.broadcast_to(b, W.shape)
    ma, mb = (W * a2).sum(1) / total, (W * b2).sum(1) / total
    da, db = a2 - ma[:, None], b2 - mb[:, None]
    cov = (W * da * db).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt((W * da * da).sum(1) * (W * db * db).sum(1))


def _weighted_midranks(W: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(B, n): each patient's midrank among a resample's values (patient ``i`` repeated ``W[b, i]`` times)."""
    uniq, group = np.unique(v, return_inverse=True)
    G = np.zeros((len(v), len(uniq)))
    G[np.arange(len(v)), group] = 1.0
    per_group = W @ G  # (B, g): how many resampled values equal each distinct value
    before = np.cumsum(per_group, axis=1) - per_group
    ranks = before + (per_group + 1.0) / 2.0
    return ranks[:, group]


def weighted_regression_metrics(y: np.ndarray, pred: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of multiplicities ``W`` (B, n) at once; NaN where undefined."""
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    total = W.sum(1)
    resid = y - pred
    ss_res = W @ (resid * resid)
    mean_y = (W @ y) / total
    ss_tot = (W * (y[None, :] - mean_y[:, None]) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)
    return {"r2": r2, "mae": (W @ np.abs(resid)) / total, "rmse": np.sqrt(ss_res / total),
            "pearson": _weighted_corr(W, y, pred),
            "spearman": _weighted_corr(W, _weighted_midranks(W, y), _weighted_midranks(W, pred))}
