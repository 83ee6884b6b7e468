"""In-fold preprocessing: imputation (+ missingness indicators), batch correction, standardisation, PCA.

All of it is fit on training rows only and applied from saved params.

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

from mmcli.heads.preprocess.combat import ComBatHarmoniser
from mmcli.heads.preprocess.params import IMPUTERS
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_json
from mmcli.pipeline.registry import Registry
from mmcli.pipeline.rundir import damaged, model_file

# scikit-learn is imported where a preprocessor is fit: loading a model and transforming need numpy only

PREPROCESSORS: Registry[type] = Registry("preprocessor", flag="preprocess.json \"type\"")


class VectorPrepHead:
    """Mixin of the heads whose ``Params`` include :class:`VectorPrepParams`: they declare the covariates
    (batch column, protected columns) their preprocessing reads per patient."""

    @classmethod
    def needs_covariates(cls, params: Any) -> list[str]:
        return params.covariate_columns()


def _sk_imputer(strategy: str, seed: int = 0) -> Any:
    """The scikit-learn imputer of ``strategy``, with per-feature missingness indicators."""
    from sklearn.impute import KNNImputer, SimpleImputer

    if strategy in ("mean", "median"):
        return SimpleImputer(strategy=strategy, add_indicator=True, keep_empty_features=True)
    if strategy == "knn":
        return KNNImputer(n_neighbors=5, add_indicator=True, keep_empty_features=True)
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    return IterativeImputer(max_iter=10, random_state=seed, add_indicator=True, keep_empty_features=True)


@PREPROCESSORS.register("vector")
class VectorPreprocessor:
    """Imputation -> optional batch correction -> standardisation -> optional PCA, for per-patient vectors.

    Args:
        n_components: keep this many principal components (capped at rows - 1 and features); None = no PCA.
        impute: None = median imputation without indicators (the default of the heads); ``mean | median |
            knn | iterative`` = that scikit-learn imputer with ``add_indicator=True``: a 0/1 column per
            feature that had missing values in training is appended (and standardised like the others).
        harmoniser: an unfitted :class:`~mmcli.heads.preprocess.combat.ComBatHarmoniser`, fit on the imputed
            training values (indicators are left alone) and applied before standardisation.

    ``knn`` and ``iterative`` keep the (imputer's) training matrix in the saved state and refit the imputer
    from it at load: KNN imputation *is* its training matrix, and IterativeImputer with a fixed seed refits to
    the same estimators, which keeps the model pickle-free.
    """

    def __init__(self, n_components: int | None = None, impute: str | None = None,
                 harmoniser: ComBatHarmoniser | None = None) -> None:
        if impute is not None and impute not in IMPUTERS:
            raise ValueError(f"unknown imputation {impute!r} (takes: {IMPUTERS})")
        self.n_components = n_components
        self.impute = impute
        self.harmoniser = harmoniser
        self.fitted_patients: list[str] = []
        self.median_: np.ndarray | None = None  # statistics of median/mean imputation
        self.indicator_: np.ndarray | None = None  # (k,) feature indices given a missingness indicator
        self.impute_X_: np.ndarray | None = None  # knn / iterative: the imputer's training matrix
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.components_: np.ndarray | None = None  # (k, D)
        self.pca_mean_: np.ndarray | None = None
        self.uncorrected_: list[str] = []  # patients of the last transform left without batch correction
        self._imputer: Any = None

    def _impute(self, X: np.ndarray) -> np.ndarray:
        """(n, D) imputed values, then the indicator columns."""
        if self.impute in ("knn", "iterative"):
            if self._imputer is None:  # reloaded model: refit from the saved training matrix
                self._imputer = _sk_imputer(self.impute).fit(self.impute_X_)
            values = np.asarray(self._imputer.transform(X), dtype=np.float64)[:, : X.shape[1]]
        else:
            assert self.median_ is not None
            values = np.where(np.isnan(X), self.median_, X)
        if self.indicator_ is None or not len(self.indicator_):
            return values
        return np.concatenate([values, np.isnan(X[:, self.indicator_]).astype(np.float64)], axis=1)

    def _harmonise(self, Z: np.ndarray, patients: Sequence[str] | None, covariates: Any) -> np.ndarray:
        if self.harmoniser is None:
            return Z
        if patients is None:
            raise ValueError("a batch-corrected preprocessor needs the patient ids of the rows")
        D = Z.shape[1] - (0 if self.indicator_ is None else len(self.indicator_))
        corrected, skip = self.harmoniser.transform(Z[:, :D], patients, covariates)
        self.uncorrected_ = [str(p) for p, s in zip(patients, skip) if s]
        return np.concatenate([corrected, Z[:, D:]], axis=1)

    def fit(self, X: np.ndarray, patients: Sequence[str], covariates: Any = None) -> VectorPreprocessor:
        """Fit on rows ``X`` (n, D) of ``patients`` (NaN = missing value); ``covariates`` (a DataFrame indexed
        by patient id) is read by batch correction only."""
        from sklearn.decomposition import PCA
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import StandardScaler

        X = np.asarray(X, dtype=np.float64)
        if len(X) != len(patients):
            raise ValueError(f"{len(X)} rows but {len(patients)} patient ids")
        if len(X) == 0:
            raise ValueError("cannot fit preprocessing on zero rows")
        if self.impute is None:
            imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(X)
            self.median_ = np.asarray(imputer.statistics_, dtype=np.float64)
        else:
            self._imputer = _sk_imputer(self.impute).fit(X)
            ind = self._imputer.indicator_
            self.indicator_ = np.asarray(ind.features_ if ind is not None else [], dtype=np.int64)
            if self.impute in ("mean", "median"):
                self.median_ = np.asarray(self._imputer.statistics_, dtype=np.float64)
            else:
                self.impute_X_ = X.copy()
        Xi = self._impute(X)
        if self.harmoniser is not None:
            D = X.shape[1]
            self.harmoniser.fit(Xi[:, :D], patients, covariates)
        Xi = self._harmonise(Xi, patients, covariates)
        scaler = StandardScaler().fit(Xi)
        self.mean_, self.scale_ = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        if self.n_components:
            k = int(min(self.n_components, Xi.shape[1], max(1, len(X) - 1)))
            pca = PCA(n_components=k, svd_solver="full").fit((Xi - self.mean_) / self.scale_)
            self.components_ = pca.components_.astype(np.float64)
            self.pca_mean_ = pca.mean_.astype(np.float64)
        self.fitted_patients = [str(p) for p in patients]
        return self

    @property
    def out_dim(self) -> int:
        assert self.mean_ is not None, "not fitted"
        return int(self.components_.shape[0]) if self.components_ is not None else int(self.mean_.shape[0])

    @property
    def n_indicators(self) -> int:
        return 0 if self.indicator_ is None else len(self.indicator_)

    def feature_names(self, names: Sequence[str]) -> list[str]:
        """Output names before PCA: ``names``, then ``<name>__missing`` for each indicator column."""
        ind = [] if self.indicator_ is None else [f"{names[int(i)]}__missing" for i in self.indicator_]
        return [*names, *ind]

    def transform(self, X: np.ndarray, patients: Sequence[str] | None = None, covariates: Any = None
                  ) -> np.ndarray:
        """(n, D) -> (n, out_dim) float64; missing values imputed with the training fit. ``patients`` and
        ``covariates`` are needed when the preprocessor corrects batches."""
        Z = self.standardised(X, patients, covariates)
        if self.components_ is not None:
            Z = (Z - self.pca_mean_) @ self.components_.T
        return Z

    def standardised(self, X: np.ndarray, patients: Sequence[str] | None = None, covariates: Any = None
                     ) -> np.ndarray:
        """(n, D + indicators): imputed, batch-corrected, standardised values before PCA (named by
        :meth:`feature_names`); :meth:`transform` = this, then the PCA projection."""
        assert self.mean_ is not None and self.scale_ is not None, "not fitted"
        X = np.asarray(X, dtype=np.float64)
        return (self._harmonise(self._impute(X), patients, covariates) - self.mean_) / self.scale_

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) for saving."""
        arrays = {"median": self.median_, "mean": self.mean_, "scale": self.scale_, "indicator": self.indicator_,
                  "impute_X": self.impute_X_}
        if self.components_ is not None:
            arrays.update(components=self.components_, pca_mean=self.pca_mean_)
        meta: dict[str, Any] = {"type": "vector", "n_components": self.n_components,
                                "n_fitted": len(self.fitted_patients)}
        if self.impute is not None:
            meta["impute"] = self.impute
        if self.harmoniser is not None:
            h_meta, h_arrays = self.harmoniser.state()
            meta["harmoniser"] = h_meta
            arrays.update({f"combat.{k}": v for k, v in h_arrays.items()})
        return meta, {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None and v.size}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> VectorPreprocessor:
        self = cls(meta.get("n_components"), meta.get("impute"))
        self.median_, self.mean_, self.scale_ = arrays.get("median"), arrays["mean"], arrays["scale"]
        self.components_, self.pca_mean_ = arrays.get("components"), arrays.get("pca_mean")
        self.impute_X_ = arrays.get("impute_X")
        if self.impute is not None:
            self.indicator_ = arrays.get("indicator", np.zeros(0, dtype=np.int64))
        if meta.get("harmoniser"):
            self.harmoniser = ComBatHarmoniser.from_state(
                meta["harmoniser"], {k[len("combat."):]: v for k, v in arrays.items() if k.startswith("combat.")})
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
        """Fit on ``bags`` (arrays, or a :class:`~mmcli.heads.data.bags.BagList`: then only the sampled rows of
        a bag that is not in memory are read)."""
        from sklearn.preprocessing import StandardScaler

        rng = np.random.default_rng(self.seed)
        scaler = StandardScaler()
        used = []
        sample = getattr(bags, "sample", None)
        for k, pid in enumerate(patients):
            if sample is not None:
                bag = sample(k, self.max_per_bag, rng)
            else:
                bag = bags[k]
                if bag is not None and len(bag) > self.max_per_bag:
                    bag = bag[np.sort(rng.choice(len(bag), self.max_per_bag, replace=False))]
            if bag is None or len(bag) == 0:
                continue
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


def vector_preprocessor(head: Any, n_components: int | None = None) -> VectorPreprocessor:
    """A fresh :class:`VectorPreprocessor` for a head whose parameters include :class:`VectorPrepParams`."""
    harmoniser = (ComBatHarmoniser(head.batch_column, head.batch_keep)
                  if getattr(head, "batch_correct", "none") == "combat" else None)
    return VectorPreprocessor(n_components, getattr(head, "impute", None), harmoniser)
