"""Small in-memory cohorts of one table modality, for preprocessing / batch-correction tests."""
from __future__ import annotations

import numpy as np
import pandas as pd

from mmcli.heads.data import Cohort, ModalityData, ModalitySpec
from mmcli.heads.targets import build_target


def table_cohort(X: np.ndarray, pids: list[str], name: str = "prot", covariates: pd.DataFrame | None = None
                 ) -> Cohort:
    """A cohort whose one modality is table ``name`` with columns ``f0..f{D-1}`` (NaN = missing value)."""
    X = np.asarray(X, dtype=np.float32)
    spec = ModalitySpec(name, "vector", "table", None, X.shape[1], tuple(f"f{i}" for i in range(X.shape[1])))
    data = ModalityData(spec, present=~np.isnan(X).all(axis=1), vectors=X)
    return Cohort(list(pids), {name: data}, "test", covariates)


def binary_target(y: np.ndarray, pids: list[str]):
    labels = pd.DataFrame({"label": np.asarray(y).astype(int)}, index=pd.Index(pids, name="patient_id"))
    return build_target(labels, target="label")
