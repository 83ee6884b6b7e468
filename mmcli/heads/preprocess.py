"""In-fold preprocessing: imputation, standardisation, PCA — fit on training rows only, applied from saved params.

Fitting uses scikit-learn (``SimpleImputer``, ``StandardScaler``, ``PCA``). Transforming applies the fitted
parameters with numpy, which is the one thing hand-written here: it lets the parameters be stored as
JSON + safetensors (no pickled sklearn objects) and makes a reloaded model transform bit-identically.

Every fitted preprocessor records ``fitted_patients``: the patient ids whose rows it saw. Cross-validation
audits (and tests) use it to prove a fold's preprocessing never saw that fold's test patients.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_json
from mmcli.pipeline.registry import Registry
from mmcli.pipeline.rundir import damaged, model_file

# scikit-learn is imported where a preprocessor is fit: loading a model and transforming need numpy only

PREPROCESSORS: Registry[type] = Registry("preprocessor", flag="preprocess.json \"type\"")


@PREPROCESSORS.register("vector")
class VectorPreprocessor:
    """Median imputation -> standardisation -> optional PCA, for per-patient feature vectors.

    Args:
        n_components: keep this many principal components (capped at rows - 1 and features); None = no PCA.
    """

    def __init__(self, n_components: int | None = None) -> None:
        self.n_components = n_components
        self.fitted_patients: list[str] = []
        self.median_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.components_: np.ndarray | None = None  # (k, D)
        self.pca_mean_: np.ndarray | None = None

    def fit(self, X: np.ndarray, patients: Sequence[str]) -> VectorPreprocessor:
        """Fit on rows ``X`` (n, D) of ``patients`` (NaN = missing value)."""
        from sklearn.decomposition import PCA
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import StandardScaler

        X = np.asarray(X, dtype=np.float64)
        if len(X) != len(patients):
            raise ValueError(f"{len(X)} rows but {len(patients)} patient ids")
        if len(X) == 0:
            raise ValueError("cannot fit preprocessing on zero rows")
        imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(X)
        self.median_ = np.asarray(imputer.statistics_, dtype=np.float64)
        Xi = np.where(np.isnan(X), self.median_, X)
        scaler = StandardScaler().fit(Xi)
        self.mean_, self.scale_ = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        if self.n_components:
            k = int(min(self.n_components, X.shape[1], max(1, len(X) - 1)))
            pca = PCA(n_components=k, svd_solver="full").fit((Xi - self.mean_) / self.scale_)
            self.components_ = pca.components_.astype(np.float64)
            self.pca_mean_ = pca.mean_.astype(np.float64)
        self.fitted_patients = [str(p) for p in patients]
        return self

    @property
    def out_dim(self) -> int:
        assert self.mean_ is not None, "not fitted"
        return int(self.components_.shape[0]) if self.components_ is not None else int(self.mean_.shape[0])

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, out_dim) float64; NaN values get the training median."""
        assert self.median_ is not None and self.mean_ is not None and self.scale_ is not None, "not fitted"
        X = np.asarray(X, dtype=np.float64)
        Z = (np.where(np.isnan(X), self.median_, X) - self.mean_) / self.scale_
        if self.components_ is not None:
            Z = (Z - self.pca_mean_) @ self.components_.T
        return Z

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) for saving."""
        arrays = {"median": self.median_, "mean": self.mean_, "scale": self.scale_}
        if self.components_ is not None:
            arrays.update(components=self.components_, pca_mean=self.pca_mean_)
        meta = {"type": "vector", "n_components": self.n_components, "n_fitted": len(self.fitted_patients)}
        return meta, {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> VectorPreprocessor:
        self = cls(meta.get("n_components"))
        self.median_, self.mean_, self.scale_ = arrays["median"], arrays["mean"], arrays["scale"]
        self.components_, self.pca_mean_ = arrays.get("components"), arrays.get("pca_mean")
        return self


@PREPROCESSORS.register("instance")
class InstanceScaler:
    """Per-feature standardisation of bag instances (tiles), fit on the training bags' instances.

    Args:
        max_per_bag: use at most this many instances per bag for the fit (a seeded random subset; the
            mean/std of 256 tiles per slide over a cohort are as good as of all tiles, and much cheaper).
        seed: seed of that subset.
    """

    def __init__(self, max_per_bag: int = 256, seed: int = 0) -> None:
        self.max_per_bag = max_per_bag
        self.seed = seed
        self.fitted_patients: list[str] = []
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, bags: Sequence[np.ndarray | None], patients: Sequence[str]) -> InstanceScaler:
        from sklearn.preprocessing import StandardScaler

        rng = np.random.default_rng(self.seed)
        scaler = StandardScaler()
        used = []
        for bag, pid in zip(bags, patients):
            if bag is None or len(bag) == 0:
                continue
            if len(bag) > self.max_per_bag:
                bag = bag[np.sort(rng.choice(len(bag), self.max_per_bag, replace=False))]
            scaler.partial_fit(np.asarray(bag, dtype=np.float64))
            used.append(str(pid))
        if not used:
            raise ValueError("cannot fit an instance scaler without any bag")
        self.mean_, self.scale_ = scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)
        self.fitted_patients = used
        return self

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        assert self.mean_ is not None and self.scale_ is not None, "not fitted"
        return ({"type": "instance", "max_per_bag": self.max_per_bag, "n_fitted": len(self.fitted_patients)},
                {"mean": self.mean_, "scale": self.scale_})

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> InstanceScaler:
        self = cls(int(meta.get("max_per_bag", 256)))
        self.mean_, self.scale_ = arrays["mean"], arrays["scale"]
        return self


def save_preprocessors(path: Any, preps: dict[str, VectorPreprocessor | InstanceScaler]) -> None:
    """Write ``preprocess.json`` (metadata) and ``preprocess.safetensors`` (arrays ``<name>/<array>``)."""
    from safetensors.numpy import save_file

    path = Path(path)
    meta, tensors = {}, {}
    for name, prep in preps.items():
        m, arrays = prep.state()
        meta[name] = m
        for k, v in arrays.items():
            tensors[f"{name}/{k}"] = np.ascontiguousarray(v)
    write_json(path / "preprocess.json", meta)
    if tensors:
        save_file(tensors, str(path / "preprocess.safetensors"))


def load_preprocessors(path: Any) -> dict[str, VectorPreprocessor | InstanceScaler]:
    from safetensors.numpy import load_file

    path = Path(path)
    f, st = path / "preprocess.json", path / "preprocess.safetensors"
    with model_file(f):
        meta = json.loads(f.read_text())
        if not isinstance(meta, dict) or not all(isinstance(m, dict) for m in meta.values()):
            raise damaged(f, "not a JSON object of {modality: {...}}")
    with model_file(st, optional=True):
        tensors = load_file(str(st)) if st.exists() else {}
    out: dict[str, Any] = {}
    for name, m in meta.items():
        arrays = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
        try:
            cls = PREPROCESSORS.get(m.get("type", ""))
        except InputError as e:
            raise InputError(f"{f}: modality {name!r}: {e}") from None
        try:
            out[name] = cls.from_state(m, arrays)
        except (KeyError, ValueError, TypeError) as e:
            raise damaged(st if not arrays else f, "missing" if not st.exists() else
                          f"does not hold the state of modality {name!r} ({type(e).__name__}: {e})") from e
    return out
