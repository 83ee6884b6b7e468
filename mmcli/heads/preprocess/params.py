"""The preprocessing parameters of the heads that take per-patient vectors (mixed into their ``Params``).

Light to import (pydantic only): the CLI's help for ``--impute``, ``--batch-correct``, ``--batch-column`` and
``--batch-keep`` comes from these field descriptions.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmcli.pipeline.options import Options

IMPUTERS = ("mean", "median", "knn", "iterative")


class VectorPrepParams(Options):
    """Preprocessing parameters of the heads that take per-patient vectors (mixed into their ``Params``)."""

    flag_prefix: str = "--param "
    impute: Literal["mean", "median", "knn", "iterative"] | None = Field(
        None, description="in-fold imputation with a missingness indicator per feature that had missing "
        "training values: mean | median | knn | iterative (scikit-learn); null = the head's default (median "
        "without indicators; xgboost: missing values left to the trees)")
    batch_correct: Literal["none", "combat"] = Field(
        "none", description="batch correction fit in-fold: none | combat (needs batch_column)")
    batch_column: str | None = Field(None, description="covariate column (labels file) holding each patient's "
                                     "batch: site, scanner, sequencing run")
    batch_keep: list[str] = Field(default_factory=list, description="covariate columns whose effect batch "
                                  "correction protects, e.g. [\"age\"]")

    @model_validator(mode="after")
    def _combat_needs_column(self) -> VectorPrepParams:
        if self.batch_correct == "combat" and not self.batch_column:
            raise ValueError("batch_correct=combat needs batch_column (--batch-column COL)")
        if self.batch_correct == "none" and (self.batch_column or self.batch_keep):
            raise ValueError("batch_column / batch_keep do nothing without batch_correct (--batch-correct combat)")
        return self

    @model_validator(mode="after")
    def _dp_keeps_no_training_rows(self) -> VectorPrepParams:
        """knn / iterative imputation save the imputer's training matrix with the model (element-wise the
        patients' features), which DP-SGD's epsilon (``dp_epsilon`` of the torch heads) does not cover."""
        if getattr(self, "dp_epsilon", None) is not None and self.impute in ("knn", "iterative"):
            raise ValueError(f"--impute {self.impute} saves the training patients' feature rows with the model, "
                             "outside the DP guarantee of dp_epsilon. Fix: --impute mean or median (or leave it "
                             "out) with --param dp_epsilon")
        return self

    def covariate_columns(self) -> list[str]:
        """The batch column and the protected covariates batch correction reads (none when it is off)."""
        if self.batch_correct == "none" or not self.batch_column:
            return []
        return [self.batch_column, *self.batch_keep]
