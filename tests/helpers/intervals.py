"""Checks of a metrics.json metric entry that fail for a wrong interval (issue 24 item 9), for tests of runs.

``assert_metric_intervals(entry, test_sizes)``: the headline is named by the documented rule; ``mean`` is the
mean of ``per_fold``; the corrected t-interval equals a hand computation of Nadeau & Bengio's formula (scipy's
t quantile, clipped to [0, 1]); the bootstrap interval obeys the validity rule.

``assert_bootstrap_recomputes(entry, y, probs, folds, n_boot, seed)``: the bootstrap interval of the AUROC
equals an independent recomputation: scikit-learn's ``roc_auc_score`` with sample weights on the documented
resampling scheme (one ``numpy`` generator seeded ``seed``; folds in order; within a fold, each class's rows
drawn with replacement as one multinomial, classes in sorted order), then ``np.percentile``.

``assert_run_intervals(run_dir, n_boot, seed)``: both of the above on a classification run folder
(``metrics.json`` + ``predictions.csv``).

``from helpers.intervals import assert_run_intervals``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as student_t
from sklearn.metrics import roc_auc_score

MIN_VALID_SHARE = 0.95


def assert_metric_intervals(entry: Mapping[str, Any], test_sizes: Sequence[int], alpha: float = 0.05) -> None:
    pf = entry["per_fold"]
    k = len(pf)
    assert k == len(test_sizes)
    assert entry["headline"] == ("ci_t" if k >= 2 else "ci")
    if any(v is None for v in pf):
        assert entry["mean"] is None and entry["ci_low"] is None and entry["ci_t_low"] is None
        return
    v = np.asarray(pf, dtype=float)
    assert entry["mean"] == pytest.approx(v.mean(), abs=1e-12)
    if k >= 2:
        n = np.asarray(test_sizes, dtype=float)
        var = (1 / k + np.mean(n / (n.sum() - n))) * v.var(ddof=1)
        half = student_t.ppf(1 - alpha / 2, k - 1) * math.sqrt(var)
        want = (max(v.mean() - half, 0.0), min(v.mean() + half, 1.0))
        assert (entry["ci_t_low"], entry["ci_t_high"]) == pytest.approx(want, abs=1e-12)
    else:
        assert entry["ci_t_low"] is None and entry["ci_t_high"] is None
    valid = entry["n_valid"] >= MIN_VALID_SHARE * entry["n_boot"] and entry["n_valid"] > 0
    assert (entry["ci_low"] is not None) == valid, entry
    if valid:
        assert entry["ci_low"] <= entry["ci_high"]


def _auroc(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1], sample_weight=w))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])),
                               sample_weight=w))


def assert_bootstrap_recomputes(entry: Mapping[str, Any], y: np.ndarray, probs: np.ndarray,
                                folds: Sequence[np.ndarray], n_boot: int, seed: int, alpha: float = 0.05) -> None:
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for rows in folds:
        yf, pf = y[rows], probs[rows]
        W = np.zeros((n_boot, len(rows)))
        for c in np.unique(yf):
            idx = np.flatnonzero(yf == c)
            W[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n_boot)
        boot += [_auroc(yf, pf, w) for w in W]
    boot /= len(folds)
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    assert entry["n_boot"] == n_boot and entry["n_valid"] == n_boot
    assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)


def assert_run_intervals(run_dir: str | Path, n_boot: int, seed: int) -> None:
    """Every metric's intervals by :func:`assert_metric_intervals`, and the AUROC's bootstrap recomputed."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    config = json.loads((run_dir / "config.json").read_text())
    pred = pd.read_csv(run_dir / "predictions.csv")
    fold_ids = sorted(pred["fold"].unique()) if "fold" in pred.columns else [None]
    folds = [np.flatnonzero(pred["fold"].to_numpy() == f) if f is not None else np.arange(len(pred))
             for f in fold_ids]
    for entry in metrics.values():
        assert_metric_intervals(entry, [len(f) for f in folds])
    classes = [str(c) for c in config["classes"]]
    y = pred["y_true"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = pred[[f"prob_{c}" for c in classes]].to_numpy(float)
    assert_bootstrap_recomputes(metrics["auroc"], y, probs, folds, n_boot, seed)
