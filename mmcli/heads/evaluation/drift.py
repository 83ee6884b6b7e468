"""Distribution shift between the training cohort's features and a new cohort's, per modality.

Classifier two-sample test (Lopez-Paz & Oquab 2017): a scikit-learn pipeline (median imputation, scaling,
L2 logistic regression) learns to tell training-store patients from new-store patients on one modality's
patient-level features (bags mean-pooled). Its cross-validated AUROC (stratified 5-fold) is 0.5 when the two
cohorts are exchangeable; the p-value is scikit-learn's ``permutation_test_score`` (cohort labels permuted,
``(1 + #{AUROC_perm >= AUROC}) / (1 + n_permutations)``). Also reported: the standardised mean shift per feature
(``|mean_new - mean_train| / sd_train``), its mean and maximum over features, and the feature with the largest.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np


def two_sample_test(train: np.ndarray, new: np.ndarray, *, n_permutations: int = 200, seed: int = 0,
                    folds: int = 5) -> dict[str, Any]:
    """AUROC of the cohort classifier (cross-validated) and its permutation p-value, for rows of two cohorts."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, permutation_test_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = np.asarray(train, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    k = min(folds, len(train), len(new))
    if k < 2:
        return {"auroc": None, "p_value": None, "note": "fewer than 2 patients in a cohort: no test"}
    X = np.vstack([train, new])
    keep = ~np.isnan(X).all(axis=0)  # a feature missing everywhere says nothing
    X = X[:, keep]
    y = np.r_[np.zeros(len(train), dtype=int), np.ones(len(new), dtype=int)]
    clf = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                        LogisticRegression(C=1.0, max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # hundreds of tiny fits: BLAS threads only oversubscribe the cores
        score, _perm, p = permutation_test_score(clf, X, y, cv=cv, scoring="roc_auc",
                                                 n_permutations=n_permutations, random_state=seed, n_jobs=1)
    return {"auroc": float(score), "p_value": float(p), "n_permutations": n_permutations, "cv_folds": k}


def mean_shift(train: np.ndarray, new: np.ndarray, names: list[str] | None = None) -> dict[str, Any]:
    """Standardised mean shift per feature, summarised (mean, max, the feature with the max)."""
    train = np.asarray(train, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        sd = np.nanstd(train, axis=0, ddof=1)
        d = np.abs(np.nanmean(new, axis=0) - np.nanmean(train, axis=0)) / np.where(sd > 0, sd, np.nan)
    ok = np.isfinite(d)
    if not ok.any():
        return {"mean_smd": None, "max_smd": None, "max_feature": None}
    j = int(np.nanargmax(np.where(ok, d, -np.inf)))
    return {"mean_smd": float(np.mean(d[ok])), "max_smd": float(d[j]),
            "max_feature": names[j] if names is not None and j < len(names) else str(j)}


def modality_drift(train: np.ndarray, new: np.ndarray, *, names: list[str] | None = None, n_permutations: int = 200,
                   seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """One modality: sizes, the two-sample test, the mean shift, and ``shift_detected`` (p < ``alpha``)."""
    train = np.asarray(train, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    present_tr = ~np.isnan(train).all(axis=1)
    present_new = ~np.isnan(new).all(axis=1)
    tr, nw = train[present_tr], new[present_new]
    out: dict[str, Any] = {"n_train": int(len(tr)), "n_new": int(len(nw)), "n_features": int(train.shape[1])}
    out.update(two_sample_test(tr, nw, n_permutations=n_permutations, seed=seed))
    out.update(mean_shift(tr, nw, names))
    p = out.get("p_value")
    out["shift_detected"] = bool(p is not None and math.isfinite(p) and p < alpha)
    out["alpha"] = alpha
    return out
