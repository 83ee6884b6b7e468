"""The estimator interface every stage-2 head implements, and the head registry.

Conventions (all heads):

* ``X`` is a :class:`~mmcli.heads.data.Cohort`; the modalities it holds are the ones the head uses.
* ``y``: classification -> int class codes ``0..n_classes-1`` (n,); survival -> a structured array with
  fields ``event`` (bool, True = event observed) and ``time`` (float, any unit) as made by
  :func:`survival_target` (scikit-survival's layout).
* ``predict(X)``: classification -> class probabilities (n, n_classes); survival -> risk (n,), a log
  hazard ratio: **higher risk = higher hazard = shorter expected survival**.
* ``predict_survival(X, times)``: survival probabilities (n, T) from a Breslow baseline fit on the training
  data's risks (the same for every head, so ``ibs`` is comparable across heads).
* ``save(dir)`` / ``Head.load(dir)``: ``config.json`` + weights + preprocessing, never pickle.
"""
from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd

from mmcli import __version__
from mmcli.heads.data import Cohort, ModalitySpec
from mmcli.heads.preprocess import InstanceScaler, VectorPreprocessor, load_preprocessors, save_preprocessors
from mmcli.pipeline.errors import InputError

TASKS = ("binary", "multiclass", "survival")
CONFIG = "config.json"

H = TypeVar("H", bound="Head")
_REGISTRY: dict[str, type[Head]] = {}


def survival_target(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Structured array ``(event: bool, time: float64)``; ``event`` 1/True = observed, 0 = censored."""
    y = np.empty(len(time), dtype=[("event", bool), ("time", np.float64)])
    y["event"] = np.asarray(event).astype(bool)
    y["time"] = np.asarray(time, dtype=np.float64)
    return y


class Head(ABC):
    """Base class: validation at the edges, survival baseline, save/load; subclasses do the modelling.

    Args:
        task: ``binary``, ``multiclass`` or ``survival``.
        n_classes: number of classes (classification; ignored for survival).
        seed: random seed (weights init, shuffling, sampling); a fixed seed gives identical results.
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = TASKS

    def __init__(self, task: str = "binary", n_classes: int = 2, seed: int = 0) -> None:
        self.task = task
        self.n_classes = n_classes
        self.seed = seed

    # ---- parameters (scikit-learn style) ----------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return [p for p, v in sig.parameters.items() if p != "self" and v.kind == kind]

    def get_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self.param_names()}

    @property
    def is_survival(self) -> bool:
        return self.task == "survival"

    # ---- fit / predict ----------------------------------------------------------------------------------
    def fit(self: H, X: Cohort, y: np.ndarray) -> H:
        """Fit on cohort ``X`` with targets ``y`` (see module docstring); all preprocessing is fit here."""
        self._check_task()
        if len(y) != len(X):
            raise ValueError(f"{len(X)} patients but {len(y)} targets")
        self._check_modalities(X)
        self.spec_: list[ModalitySpec] = X.specs()
        self.fitted_patients_: list[str] = list(X.patients)
        self.preprocessors_: dict[str, VectorPreprocessor | InstanceScaler] = {}
        self._fit(X, y)
        if self.is_survival:
            self.baseline_ = BreslowBaseline().fit(self._predict(X), y)
        return self

    def predict(self, X: Cohort) -> np.ndarray:
        """Class probabilities (n, n_classes), or survival risk (n,) (higher = shorter survival)."""
        return self._predict(self._aligned(X))

    def predict_proba(self, X: Cohort) -> np.ndarray:
        if self.is_survival:
            raise ValueError("predict_proba is for classification heads; use predict_risk")
        return self.predict(X)

    def predict_risk(self, X: Cohort) -> np.ndarray:
        if not self.is_survival:
            raise ValueError("predict_risk is for survival heads; use predict_proba")
        return self.predict(X)

    def predict_survival(self, X: Cohort, times: np.ndarray, risk: np.ndarray | None = None) -> np.ndarray:
        """Survival probabilities S(t | x) at ``times`` (n, T), ``S0(t) ** exp(risk)`` (Breslow baseline)."""
        risk = self.predict_risk(X) if risk is None else risk
        return self.baseline_.survival(risk, times)

    # ---- explanations (None where a head has none) --------------------------------------------------------
    def attention(self, X: Cohort) -> dict[str, list[np.ndarray | None]] | None:
        """Per bag modality, each patient's attention over the instances of its bag (None if absent)."""
        return None

    def modality_weights(self, X: Cohort) -> dict[str, float] | None:
        """Learnt weight of each modality, averaged over the patients of ``X`` (sums to 1)."""
        return None

    def contributions(self, X: Cohort) -> pd.DataFrame | None:
        """Per-patient, per-feature contributions to the output margin (SHAP), index = patient_id."""
        return None

    # ---- subclass hooks -----------------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, X: Cohort, y: np.ndarray) -> None: ...

    @abstractmethod
    def _predict(self, X: Cohort) -> np.ndarray: ...

    @abstractmethod
    def _save(self, path: Path) -> None:
        """Write weights (safetensors / xgboost JSON / JSON) into ``path``."""

    @abstractmethod
    def _load(self, path: Path) -> None:
        """Read what :meth:`_save` wrote (``spec_`` and ``preprocessors_`` are already set)."""

    def _check_modalities(self, X: Cohort) -> None:
        """Refuse modality sets the head cannot use (e.g. several bags for attention_mil)."""
        if not X.modalities:
            raise InputError(f"head {self.name!r} needs at least one modality")

    # ---- validation ------------------------------------------------------------------------------------------
    def _check_task(self) -> None:
        if self.task not in self.tasks:
            raise InputError(f"head {self.name!r} supports tasks {list(self.tasks)}, not {self.task!r}. "
                             f"Fix: choose another --head.")
        if self.task != "survival" and self.n_classes < 2:
            raise InputError(f"classification needs >= 2 classes, got {self.n_classes}")

    def _aligned(self, X: Cohort) -> Cohort:
        """``X`` restricted to the model's modalities, in the model's order; mismatches raise InputError."""
        if not hasattr(self, "spec_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        for spec in self.spec_:
            if spec.name not in X.modalities:
                raise InputError(f"the model needs modality {spec.name!r}; the data has {X.names}")
            got = X.modalities[spec.name].spec
            if got.encoder_id != spec.encoder_id:
                raise InputError(f"modality {spec.name!r}: the model was fit on encoder_id {spec.encoder_id!r}, "
                                 f"the data comes from {got.encoder_id!r}. Fix: extract with the model's encoder.")
            if got.dim != spec.dim and X.modalities[spec.name].present.any():
                raise InputError(f"modality {spec.name!r}: feature dim mismatch, the model expects "
                                 f"{spec.dim}, found {got.dim}. Fix: use features from the model's encoder.")
            if spec.columns is not None and got.columns is not None and tuple(got.columns) != spec.columns:
                raise InputError(f"table {spec.name!r}: columns differ from the model's "
                                 f"(missing {sorted(set(spec.columns) - set(got.columns))[:10]}, "
                                 f"extra {sorted(set(got.columns) - set(spec.columns))[:10]}).")
        return X.select([s.name for s in self.spec_])

    # ---- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted head into folder ``path`` (created): config.json, weights, preprocessing."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "head": self.name,
            "params": self.get_params(),
            "modalities": [s.to_json() for s in self.spec_],
            "n_fitted": len(self.fitted_patients_),
            "mmcli_version": __version__,
        }
        if self.is_survival:
            config["baseline"] = self.baseline_.to_json()
        self._save(path)
        save_preprocessors(path, self.preprocessors_)
        (path / CONFIG).write_text(json.dumps(config, indent=2, default=_json_default))
        return path

    @classmethod
    def load(cls: type[H], path: str | Path) -> H:
        """Load a head saved by :meth:`save` (use :func:`load_head` when the head class is not known)."""
        path = Path(path)
        config = read_model_config(path)
        if config.get("head") != cls.name:
            raise InputError(f"{path}: holds a {config.get('head')!r} model, not {cls.name!r}")
        self = cls(**config["params"])
        self.spec_ = [ModalitySpec.from_json(s) for s in config["modalities"]]
        self.fitted_patients_ = []
        self.preprocessors_ = load_preprocessors(path)
        if self.is_survival:
            self.baseline_ = BreslowBaseline.from_json(config["baseline"])
        self._load(path)
        return self


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def read_model_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    f = path / CONFIG
    if not f.is_file():
        raise InputError(f"{path}: not a model folder (no {CONFIG}). Fix: pass the run's model/ folder or run dir.")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{f}: not valid JSON ({e})") from e


# ---- survival baseline --------------------------------------------------------------------------------------
class BreslowBaseline:
    """Breslow baseline survival S0(t) fit on training risks (scikit-survival's ``BreslowEstimator``).

    Risks are centred on their training mean (``offset``) so ``exp`` never overflows.
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self.times: np.ndarray | None = None
        self.surv: np.ndarray | None = None

    def fit(self, risk: np.ndarray, y: np.ndarray) -> BreslowBaseline:
        from sksurv.linear_model.coxph import BreslowEstimator

        risk = np.asarray(risk, dtype=np.float64)
        self.offset = float(risk.mean())
        est = BreslowEstimator().fit(risk - self.offset, y["event"], y["time"])
        self.times = np.asarray(est.baseline_survival_.x, dtype=np.float64)
        self.surv = np.asarray(est.baseline_survival_.y, dtype=np.float64)
        return self

    def survival(self, risk: np.ndarray, times: np.ndarray) -> np.ndarray:
        """(n, T) survival probabilities at ``times`` (clipped to the training follow-up)."""
        from sksurv.functions import StepFunction

        assert self.times is not None and self.surv is not None
        if len(times) == 0:  # a fold whose follow-up leaves no evaluation time: no curve to give
            return np.empty((len(risk), 0), dtype=np.float64)
        s0 = StepFunction(self.times, self.surv)
        t = np.clip(np.asarray(times, dtype=np.float64), 0.0, self.times[-1])
        base = np.atleast_1d(s0(t))
        hr = np.exp(np.clip(np.asarray(risk, dtype=np.float64) - self.offset, -50, 50))
        return base[None, :] ** hr[:, None]

    def to_json(self) -> dict[str, Any]:
        assert self.times is not None and self.surv is not None
        return {"offset": self.offset, "times": self.times.tolist(), "survival": self.surv.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BreslowBaseline:
        self = cls()
        self.offset = float(d["offset"])
        self.times = np.asarray(d["times"], dtype=np.float64)
        self.surv = np.asarray(d["survival"], dtype=np.float64)
        return self


# ---- registry ------------------------------------------------------------------------------------------------
def register_head(name: str) -> Callable[[type[H]], type[H]]:
    """Class decorator: make a head available as ``--head NAME``."""

    def deco(cls: type[H]) -> type[H]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"head {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_heads() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def head_class(name: str) -> type[Head]:
    _import_builtin()
    if name not in _REGISTRY:
        raise InputError(f"unknown head {name!r}. Fix: choose one of {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def create_head(name: str, **params: Any) -> Head:
    """Instantiate head ``name`` with ``params``; unknown parameters are an InputError listing the valid ones."""
    cls = head_class(name)
    valid = cls.param_names()
    bad = sorted(set(params) - set(valid))
    if bad:
        raise InputError(f"head {name!r} has no parameter(s) {bad}. Fix: use some of {valid}.")
    return cls(**params)


def load_head(path: str | Path) -> Head:
    """Load any saved head: the class comes from ``config.json``'s ``head``."""
    return head_class(read_model_config(path).get("head", "")).load(path)


def _import_builtin() -> None:
    import mmcli.heads  # noqa: F401  (importing the package registers the built-in heads)
