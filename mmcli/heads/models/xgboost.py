"""``xgboost``: gradient-boosted trees on pooled features of the chosen modalities.

Features: each modality's per-patient vector (bags mean-pooled over tiles) concatenated; a missing modality
or value is NaN and handled by xgboost's learnt default directions (no imputation needed, so nothing to fit
in-fold besides the trees). Objectives: ``binary:logistic``, ``multi:softprob``, ``survival:cox`` (label =
time, negative for censored, xgboost's convention; the output margin is the log hazard ratio = risk).
SHAP values come from ``Booster.predict(pred_contribs=True)``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xgboost as xgb
from pydantic import Field

from mmcli.heads.base import Head, HeadParams
from mmcli.heads.data import Cohort
from mmcli.heads.nn.losses import class_weights
from mmcli.heads.preprocess.params import VectorPrepParams
from mmcli.heads.preprocess.vector import VectorPrepHead, VectorPreprocessor, vector_preprocessor
from mmcli.heads.registry import register_head
from mmcli.pipeline.rundir import damaged, model_file

MODEL = "model.json"


def _safe_names(names: list[str]) -> list[str]:
    """Feature names xgboost accepts (no '[', ']', '<', ','), made unique again if that created clashes."""
    safe = [re.sub(r"[\[\]<,]", "_", n) for n in names]
    if len(set(safe)) < len(safe):
        safe = [f"{s}#{i}" for i, s in enumerate(safe)]
    return safe


class XGBoostParams(HeadParams, VectorPrepParams):
    """XGBoost settings (xgboost's own names in brackets where they differ), plus optional in-fold imputation
    with indicators / batch correction (:class:`VectorPrepParams`; by default missing values go to the trees)."""

    n_estimators: int = Field(200, ge=1, le=100_000, description="boosting rounds, 1..100000")
    max_depth: int = Field(3, ge=1, le=64, description="maximum tree depth (levels), 1..64")
    learning_rate: float = Field(0.05, gt=0.0, le=1.0, description="shrinkage per round (eta), 0 < x <= 1")
    subsample: float = Field(0.8, gt=0.0, le=1.0, description="fraction of patients sampled per tree, 0 < x <= 1")
    colsample_bytree: float = Field(0.5, gt=0.0, le=1.0, description="fraction of features sampled per tree, "
                                    "0 < x <= 1")
    min_child_weight: float = Field(1.0, ge=0.0, description="minimum hessian sum in a leaf, >= 0")
    reg_lambda: float = Field(1.0, ge=0.0, description="L2 penalty on leaf weights (lambda), >= 0")
    class_weight: Literal["balanced", "none"] | None = Field(
        "balanced", description="balanced (sample weights n / (K * count_k)) | none | null")
    regression_loss: Literal["mse", "huber"] = Field("mse", description="regression objective on the in-fold "
                                                     "standardised target: mse (squared error) | huber (pseudo-Huber)")
    huber_delta: float = Field(1.0, gt=0.0, le=100.0, description="huber: slope of the pseudo-Huber loss, in "
                               "standard deviations of the training target, > 0")
    n_threads: int = Field(1, ge=1, le=1024, description="xgboost threads, 1..1024 (1: on small cohorts OpenMP "
                           "synchronisation costs more than it saves, badly so on a busy machine)")


@register_head("xgboost")
class XGBoostHead(VectorPrepHead, Head):
    """XGBoost on pooled features; parameters: :class:`XGBoostParams`."""

    Params = XGBoostParams
    tasks = ("classification", "survival", "regression")
    input_kind = "vector"
    n_estimators: int
    max_depth: int
    learning_rate: float
    subsample: float
    colsample_bytree: float
    min_child_weight: float
    reg_lambda: float
    class_weight: str | None
    regression_loss: str
    huber_delta: float
    n_threads: int

    impute: str | None
    batch_correct: str
    batch_column: str | None
    batch_keep: list[str]

    @property
    def _preprocessed(self) -> bool:
        return self.impute is not None or self.batch_correct != "none"

    def feature_names(self) -> list[str]:
        out = []
        for s in self.spec_:
            prep = self.preprocessors_.get(s.name)
            out += prep.feature_names(s.feature_names()) if isinstance(prep, VectorPreprocessor) else s.feature_names()
        return out

    def _modality_matrix(self, X: Cohort, name: str) -> np.ndarray:
        """Pooled features; with imputation / batch correction set, the preprocessed ones (a patient without
        the modality stays all-NaN: the trees learn where absent modalities go)."""
        m = X.modalities[name]
        v = m.pooled()
        prep = self.preprocessors_.get(name)
        if not isinstance(prep, VectorPreprocessor):
            return v
        out = np.full((len(v), prep.out_dim), np.nan)
        rows = np.flatnonzero(m.present)
        if len(rows):
            out[rows] = prep.transform(v[rows], [X.patients[i] for i in rows], X.covariates)
        return out

    def _matrix(self, X: Cohort) -> np.ndarray:
        return np.concatenate([self._modality_matrix(X, s.name) for s in self.spec_], axis=1).astype(np.float32)

    def _dmatrix(self, X: Cohort, label: np.ndarray | None = None, weight: np.ndarray | None = None) -> xgb.DMatrix:
        return xgb.DMatrix(self._matrix(X), label=label, weight=weight, missing=np.nan,
                           feature_names=_safe_names(self.feature_names()), nthread=self.n_threads)

    def _params(self) -> dict[str, object]:
        p: dict[str, object] = {
            "max_depth": self.max_depth, "eta": self.learning_rate, "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree, "min_child_weight": self.min_child_weight,
            "lambda": self.reg_lambda, "nthread": self.n_threads, "seed": self.seed, "tree_method": "hist",
        }
        if self.task == "survival":
            p.update(objective="survival:cox", eval_metric="cox-nloglik")
        elif self.is_regression:  # on the in-fold standardised target (Head.fit)
            if self.regression_loss == "huber":
                p.update(objective="reg:pseudohubererror", huber_slope=self.huber_delta, eval_metric="mphe")
            else:
                p.update(objective="reg:squarederror", eval_metric="rmse")
        elif self.is_binary:
            p.update(objective="binary:logistic", eval_metric="logloss")
        else:
            p.update(objective="multi:softprob", num_class=self.n_classes, eval_metric="mlogloss")
        return p

    def _fit(self, X: Cohort, y: np.ndarray) -> None:
        if self._preprocessed:
            for name, m in X.modalities.items():
                keep = np.flatnonzero(m.present)
                self.preprocessors_[name] = vector_preprocessor(self).fit(
                    m.pooled()[keep], [X.patients[i] for i in keep], X.covariates)
        if self.is_survival:
            label = np.where(y["event"], y["time"], -y["time"]).astype(np.float64)
            weight = None
        elif self.is_regression:
            label, weight = np.asarray(y, dtype=np.float64), None
        else:
            label = np.asarray(y, dtype=np.float64)
            weight = class_weights(np.asarray(y), self.n_classes, self.class_weight)[np.asarray(y)]
        self.booster_ = xgb.train(self._params(), self._dmatrix(X, label, weight), num_boost_round=self.n_estimators)

    def _predict(self, X: Cohort) -> np.ndarray:
        d = self._dmatrix(X)
        if self.is_survival:
            return self.booster_.predict(d, output_margin=True).astype(np.float64)
        if self.is_regression:  # standardised; Head.predict maps it to the target's unit
            return self.booster_.predict(d).astype(np.float64)
        p = self.booster_.predict(d).astype(np.float64)
        return np.stack([1.0 - p, p], axis=1) if self.is_binary else p

    def contributions(self, X: Cohort) -> pd.DataFrame:
        """SHAP contributions to the output margin (log-odds / log hazard ratio / the standardised value of a
        regression), one column per feature.

        Multiclass: the contributions to the margin of each patient's predicted class. The bias term is
        left out (it is the same for every patient)."""
        X = self.align(X)
        d = self._dmatrix(X)
        c = self.booster_.predict(d, pred_contribs=True)
        if c.ndim == 3:  # (n, K, F + 1)
            pred = self.booster_.predict(d).argmax(axis=1)
            c = c[np.arange(len(pred)), pred]
        return pd.DataFrame(c[:, :-1], index=pd.Index(X.patients, name="patient_id"), columns=self.feature_names())

    def _save(self, path: Path) -> None:
        self.booster_.save_model(str(path / MODEL))

    def _load(self, path: Path) -> None:
        f = path / MODEL
        with model_file(f):
            self.booster_ = xgb.Booster()
            self.booster_.load_model(str(f))
            self.booster_.set_param({"nthread": self.n_threads})
            learner = json.loads(self.booster_.save_config())["learner"]
            objective = learner["objective"]["name"]
            n_class = int(learner["learner_model_param"].get("num_class", "0"))
            n_features = int(self.booster_.num_features())
        want = self._params()["objective"]
        n_in = len(self.feature_names())  # after in-fold imputation indicators, if any (preprocessors_ are loaded)
        multiclass = self.task == "classification" and not self.is_binary
        if objective != want or (multiclass and n_class != self.n_classes) or n_features != n_in:
            raise damaged(f, f"holds a {objective} model of {n_features} features"
                          + (f" and {n_class} classes" if n_class else "")
                          + f"; config.json describes {want} on {n_in} features"
                          + (f" and {self.n_classes} classes" if multiclass else "")
                          + "; was config.json edited?")
