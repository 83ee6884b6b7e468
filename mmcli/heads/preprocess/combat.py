"""Batch (site, platform, scanner) correction: ComBat fitted on a training fold, applied to any patients.

Fitting uses combatlearn's ``ComBatModel`` (``method="fortin"``: the empirical-Bayes ComBat of Johnson et
al. 2007 with protected covariates in the design, as neuroCombat, Fortin et al. 2018). Applying uses the
fitted location/scale parameters with numpy (the same formula as combatlearn's transform), so a saved model
is JSON + safetensors, never a pickled estimator, and a reloaded model corrects bit-identically.

Rows the harmoniser cannot correct are left as they are and reported by :meth:`ComBatHarmoniser.transform`:
a patient whose batch was not seen in training (ComBat has no location/scale estimate for it), or whose
batch value is missing.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import InputError

MIN_PER_BATCH = 2  # ComBat's per-batch variance needs two patients


class ComBatHarmoniser:
    """Empirical-Bayes ComBat on per-patient vectors, with covariates whose effect is protected.

    Args:
        batch_column: the covariate column holding each patient's batch (site, scanner, run...).
        keep: covariate columns whose association with the features is kept (numeric ones enter the
            design as they are, others as dummies).
    """

    def __init__(self, batch_column: str, keep: Sequence[str] = ()) -> None:
        self.batch_column = batch_column
        self.keep = list(keep)
        self.fitted_patients: list[str] = []
        self.batches_: list[str] = []
        self.categories_: dict[str, list[str]] = {}  # discrete kept covariate -> its training categories
        self.nonbatch_columns_: list[str] = []
        self.grand_mean_: np.ndarray | None = None  # (D,)
        self.pooled_var_: np.ndarray | None = None  # (D,)
        self.gamma_: np.ndarray | None = None  # (B, D) batch location (standardised units)
        self.delta_: np.ndarray | None = None  # (B, D) batch scale
        self.beta_: np.ndarray | None = None  # (P, D) effects of the kept covariates

    # ---- covariates -----------------------------------------------------------------------------------------
    def _columns(self, covariates: pd.DataFrame | None, patients: Sequence[str]) -> pd.DataFrame:
        need = [self.batch_column, *self.keep]
        if covariates is None:
            raise InputError(f"batch correction needs column(s) {need} for each patient and none were given. "
                             "Fix: pass the labels/covariates file that holds them.")
        missing = [c for c in need if c not in covariates.columns]
        if missing:
            raise InputError(f"batch correction: covariate column(s) {missing} not found (have: "
                             f"{list(covariates.columns)[:20]}). Fix: check --batch-column / --batch-keep.")
        return covariates.reindex([str(p) for p in patients])[need]

    def _design(self, cov: pd.DataFrame) -> np.ndarray:
        """(n, P) kept-covariate design in the training column order (dummies against the training categories)."""
        parts = {}
        for c in self.keep:
            if c in self.categories_:
                values = cov[c].astype(str)
                for cat in self.categories_[c][1:]:
                    parts[f"{c}_{cat}"] = (values == cat).astype(float).to_numpy()
            else:
                parts[c] = pd.to_numeric(cov[c], errors="coerce").astype(float).to_numpy()
        n = len(cov)
        return np.stack([parts.get(c, np.zeros(n)) for c in self.nonbatch_columns_], 1) if self.nonbatch_columns_ \
            else np.zeros((n, 0))

    # ---- fit / transform --------------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, patients: Sequence[str], covariates: pd.DataFrame | None) -> ComBatHarmoniser:
        """Fit on complete rows ``X`` (n, D) of ``patients``; rows without a batch value, or of a batch with
        fewer than 2 patients, are left out of the fit (and later left uncorrected)."""
        from combatlearn.core import ComBatModel

        X = np.asarray(X, dtype=np.float64)
        cov = self._columns(covariates, patients)
        batch = cov[self.batch_column]
        known = batch.notna().to_numpy()
        counts = batch[known].astype(str).value_counts()
        ok = known & batch.astype(str).isin(counts[counts >= MIN_PER_BATCH].index).to_numpy()
        if ok.sum() < 2 * MIN_PER_BATCH or counts[counts >= MIN_PER_BATCH].size < 1:
            raise InputError(f"batch correction: {int(ok.sum())} training patient(s) with a batch in column "
                             f"{self.batch_column!r} of a batch with >= {MIN_PER_BATCH} patients; ComBat needs more. "
                             "Fix: check the column, or drop --batch-correct.")
        for c in self.keep:
            bad = cov[c][ok].isna()
            if bad.any():
                raise InputError(f"batch correction: protected covariate {c!r} is missing for patient(s) "
                                 f"{list(bad[bad].index[:5])}. Fix: fill it in, or leave it out of --batch-keep.")
        cov_ok = cov[ok]
        disc = [c for c in self.keep if not pd.api.types.is_numeric_dtype(cov_ok[c])]
        cont = [c for c in self.keep if c not in disc]
        self.categories_ = {c: sorted(cov_ok[c].astype(str).unique()) for c in disc}
        model = ComBatModel(method="fortin")
        rows = pd.DataFrame(X[ok], index=cov_ok.index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # combatlearn's advisory warnings (one feature, imbalance)
            model.fit(rows, batch=pd.Series(cov_ok[self.batch_column].astype(str).to_numpy(), index=rows.index),
                      discrete_covariates=cov_ok[disc].astype(str) if disc else None,
                      continuous_covariates=cov_ok[cont].astype(float) if cont else None)
        self.batches_ = [str(b) for b in model._batch_levels]
        self.nonbatch_columns_ = [str(c) for c in model._nonbatch_columns]
        self.grand_mean_ = np.asarray(model._grand_mean.values, dtype=np.float64)
        self.pooled_var_ = np.asarray(model._pooled_var.values, dtype=np.float64)
        self.gamma_ = np.asarray(model._gamma_star, dtype=np.float64)
        self.delta_ = np.asarray(model._delta_star, dtype=np.float64)
        self.beta_ = np.asarray(model._beta_hat_nonbatch, dtype=np.float64).reshape(len(self.nonbatch_columns_),
                                                                                    X.shape[1])
        self.fitted_patients = [str(p) for p, k in zip(patients, ok) if k]
        return self

    def transform(self, X: np.ndarray, patients: Sequence[str], covariates: pd.DataFrame | None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(corrected X (n, D), (n,) bool: rows left uncorrected because their batch is unknown or unseen)."""
        assert self.grand_mean_ is not None and self.pooled_var_ is not None, "not fitted"
        assert self.gamma_ is not None and self.delta_ is not None and self.beta_ is not None
        X = np.asarray(X, dtype=np.float64)
        cov = self._columns(covariates, patients)
        batch = cov[self.batch_column]
        b_idx = np.array([self.batches_.index(str(b)) if pd.notna(b) and str(b) in self.batches_ else -1
                          for b in batch], dtype=int)
        design = self._design(cov)
        skip = (b_idx < 0) | np.isnan(design).any(axis=1)
        out = X.copy()
        rows = np.flatnonzero(~skip)
        if len(rows):
            sd = np.sqrt(self.pooled_var_)
            mu = self.grand_mean_ + design[rows] @ self.beta_
            z = (X[rows] - mu) / sd
            z = (z - self.gamma_[b_idx[rows]]) / np.sqrt(self.delta_[b_idx[rows]])
            out[rows] = z * sd + mu
        return out, skip

    # ---- persistence ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"type": "combat", "batch_column": self.batch_column, "keep": self.keep, "batches": self.batches_,
                "categories": self.categories_, "nonbatch_columns": self.nonbatch_columns_,
                "n_fitted": len(self.fitted_patients)}
        arrays = {"grand_mean": self.grand_mean_, "pooled_var": self.pooled_var_, "gamma": self.gamma_,
                  "delta": self.delta_, "beta": self.beta_}
        return meta, {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None and v.size}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ComBatHarmoniser:
        self = cls(str(meta["batch_column"]), list(meta.get("keep") or []))
        self.batches_ = [str(b) for b in meta["batches"]]
        self.categories_ = {k: list(v) for k, v in (meta.get("categories") or {}).items()}
        self.nonbatch_columns_ = list(meta.get("nonbatch_columns") or [])
        self.grand_mean_, self.pooled_var_ = arrays["grand_mean"], arrays["pooled_var"]
        self.gamma_, self.delta_ = arrays["gamma"], arrays["delta"]
        self.beta_ = arrays.get("beta", np.zeros((0, len(self.grand_mean_))))
        return self
