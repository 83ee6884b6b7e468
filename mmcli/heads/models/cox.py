"""``cox``: lifelines ``CoxPHFitter`` with a penalizer on in-fold standardised, PCA-reduced features.

Per modality: pooled vector (bags mean-pooled) -> median imputation -> standardisation -> PCA to at most
``n_components`` components, all fit on the training patients only (a patient missing a modality gets the
training medians, i.e. lands near the centre of that modality's components). PCA is skipped for a modality of
at most ``2 * n_components`` features (a clinical table, a small panel): it enters whole, as its standardised
columns named ``<modality>:<column>``, because a PCA there discards some of few, interpretable columns to save
little. The components (or columns) of all modalities are the Cox covariates. Risk = the linear predictor
``(z - mean_train) · beta`` = lifelines' log partial hazard: higher = shorter survival. Saved as coefficients
JSON.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from mmcli.heads.base import Head, HeadParams, Task
from mmcli.heads.data import Cohort
from mmcli.heads.preprocess.params import VectorPrepParams
from mmcli.heads.preprocess.vector import VectorPrepHead, VectorPreprocessor, vector_preprocessor
from mmcli.heads.registry import register_head
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.rundir import damaged, model_file

COEFS = "cox.json"


class CoxParams(HeadParams, VectorPrepParams):
    """Penalised Cox settings (lifelines' names), plus imputation / batch correction (:class:`VectorPrepParams`)."""

    task: Task = Field("survival", description="survival (set from the labels; the cox head is for survival only)")
    n_classes: int = Field(0, ge=0, description="0 for survival (set from the labels)")
    penalizer: float = Field(0.1, ge=0.0, description="shrinkage strength of the coefficients, >= 0")
    l1_ratio: float = Field(0.0, ge=0.0, le=1.0, description="elastic net mix: 0 = ridge, 1 = lasso, 0 <= x <= 1")
    n_components: int = Field(8, ge=1, le=100_000, description="principal components kept per modality wider "
                              "than 2 x n_components features, 1..100000; a modality of at most 2 x n_components "
                              "features (e.g. a clinical table) enters whole, as its standardised columns, without "
                              "PCA")


@register_head("cox")
class CoxHead(VectorPrepHead, Head):
    """Penalised Cox proportional hazards (survival only); parameters: :class:`CoxParams`."""

    Params = CoxParams
    tasks = ("survival",)
    input_kind = "vector"
    penalizer: float
    l1_ratio: float
    n_components: int
    impute: str | None
    batch_correct: str
    batch_column: str | None
    batch_keep: list[str]

    def _check_task(self) -> None:
        if self.task != "survival":
            raise InputError("the cox head is for survival (--time/--event). Fix: for classification use "
                             "--head xgboost, fusion_mlp or attention_mil.")

    def _covariates(self, X: Cohort) -> tuple[np.ndarray, list[str]]:
        cols, names = [], []
        for s in self.spec_:
            prep = self.preprocessors_[s.name]
            assert isinstance(prep, VectorPreprocessor)
            z = prep.transform(X.modalities[s.name].pooled(), X.patients, X.covariates)
            cols.append(z)
            names += ([f"{s.name}_pc{i + 1}" for i in range(z.shape[1])] if prep.components_ is not None
                      else prep.feature_names(s.feature_names()))
        return np.concatenate(cols, axis=1), names

    def _fit(self, X: Cohort, y: np.ndarray) -> None:
        from lifelines import CoxPHFitter
        from lifelines.exceptions import ConvergenceError, ConvergenceWarning

        for name, m in X.modalities.items():
            keep = np.flatnonzero(m.present)
            if len(keep) < 2:
                raise InputError(f"modality {name!r}: fewer than 2 training patients have it. "
                                 "Fix: drop it from --modalities.")
            wide = m.spec.dim > 2 * self.n_components  # small tables enter whole (module docstring)
            self.preprocessors_[name] = vector_preprocessor(self, self.n_components if wide else None).fit(
                m.pooled()[keep], [X.patients[i] for i in keep], X.covariates)
        Z, names = self._covariates(X)
        df = pd.DataFrame(Z, columns=names)
        df["_time"], df["_event"] = y["time"], y["event"].astype(int)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            cph = CoxPHFitter(penalizer=self.penalizer, l1_ratio=self.l1_ratio)
            try:
                cph.fit(df, duration_col="_time", event_col="_event")
            except ConvergenceError as e:
                raise InputError(f"the Cox model did not converge on {len(df)} patients with {len(names)} "
                                 f"covariates ({str(e).splitlines()[0]}). Fix: a larger penalizer "
                                 "(--param penalizer=1.0) or fewer components (--param n_components=4).") from e
        self.covariates_ = names
        self.coef_ = cph.params_.reindex(names).to_numpy(dtype=np.float64)
        self.norm_mean_ = cph._norm_mean.reindex(names).to_numpy(dtype=np.float64)
        summary = cph.summary  # a property that lifelines recomputes on every access
        self.summary_ = {n: {"coef": float(summary.loc[n, "coef"]), "se": float(summary.loc[n, "se(coef)"]),
                             "p": float(summary.loc[n, "p"])} for n in names}

    def _predict(self, X: Cohort) -> np.ndarray:
        Z, _ = self._covariates(X)
        return (Z - self.norm_mean_) @ self.coef_

    def _save(self, path: Path) -> None:
        (path / COEFS).write_text(json.dumps({
            "covariates": self.covariates_, "coef": self.coef_.tolist(), "norm_mean": self.norm_mean_.tolist(),
            "summary": self.summary_, "convention": "risk = (z - norm_mean) . coef; higher = shorter survival",
        }, indent=2))

    def _load(self, path: Path) -> None:
        f = path / COEFS
        with model_file(f):
            d = json.loads(f.read_text())
            self.covariates_ = [str(c) for c in d["covariates"]]
            self.coef_ = np.asarray(d["coef"], dtype=np.float64).reshape(-1)
            self.norm_mean_ = np.asarray(d["norm_mean"], dtype=np.float64).reshape(-1)
            self.summary_ = d.get("summary", {})
        if not len(self.covariates_) == len(self.coef_) == len(self.norm_mean_):
            raise damaged(f, f"{len(self.covariates_)} covariates but {len(self.coef_)} coefficients and "
                          f"{len(self.norm_mean_)} means")
