"""The estimator interface every stage-2 head implements (the registry is :mod:`mmcli.heads.registry`).

Conventions (all heads):

* ``X`` is a :class:`~mmcli.heads.data.Cohort`; the modalities it holds are the ones the head uses.
* ``task``: ``classification`` (binary when ``n_classes == 2``, else multiclass), ``survival`` or
  ``regression``; the one vocabulary of the labels (:class:`~mmcli.heads.targets.Target`), the head parameters
  and the run files.
* ``y``: classification -> int class codes ``0..n_classes-1`` (n,); survival -> a structured array with
  fields ``event`` (bool, True = event observed) and ``time`` (float, any unit) as made by
  :func:`~mmcli.heads.targets.survival_target` (scikit-survival's layout).
* ``predict(X)``: classification -> class probabilities (n, n_classes); survival -> risk (n,), a log
  hazard ratio: **higher risk = higher hazard = shorter expected survival**; regression -> the predicted value
  (n,) in the target's unit. A regression head fits the target standardised in-fold (the training patients'
  mean and standard deviation, ``target_scaler`` in config.json); :meth:`Head.predict` maps back.
* ``predict_survival(X, times)``: survival probabilities (n, T) from a Breslow baseline fit on the training
  data's risks (the same for every head, so ``ibs`` is comparable across heads).
* ``save(dir)`` / ``Head.load(dir)``: ``config.json`` + weights + preprocessing, never pickle.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, field_validator

from mmcli import __version__
from mmcli.heads.data import BAG_MODALITIES, Cohort, ModalitySpec
from mmcli.heads.preprocess.vector import InstanceScaler, VectorPreprocessor, load_preprocessors, save_preprocessors
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_json
from mmcli.pipeline.options import Options, explain
from mmcli.pipeline.rundir import damaged, model_file

TASKS = ("classification", "survival")
Task = Literal["classification", "survival", "regression"]
CONFIG = "config.json"
RUN_PARAMS = ("task", "n_classes", "seed")  # set by the run (labels, --seed); never a --param

H = TypeVar("H", bound="Head")


class HeadParams(Options):
    """Parameters every head has; each head subclasses this with its own (``--param KEY=VALUE``).

    A run validates the user's parameters once (:meth:`validate_params`) and carries the model; each fold's
    head gets it with the run's values (:meth:`for_run`), never re-validated."""

    flag_prefix: str = "--param "
    task: Task = Field("classification", description="classification | survival | regression (set from the labels "
                       "and --task)")
    n_classes: int = Field(2, ge=0, description="number of classes, >= 2 (set from the labels; 0 for survival)")
    seed: int = Field(0, ge=0, description="random seed of weights, shuffling and sampling, >= 0")

    @field_validator("task", mode="before")
    @classmethod
    def _old_task_names(cls, v: Any) -> Any:
        """Models saved before one task vocabulary said ``binary`` / ``multiclass``."""
        return "classification" if v in ("binary", "multiclass") else v

    @classmethod
    def validate_params(cls, given: Mapping[str, Any], *, head: str, context: str = "") -> HeadParams:
        """Validate ``given`` (``None`` is a value here, e.g. ``class_weight=None``); InputError naming the key."""
        valid = cls.fields()
        bad = sorted(set(given) - set(valid))
        where = f"{context}: " if context else ""
        if bad:
            raise InputError(f"{where}head {head!r} has no parameter(s) {bad}. Fix: use some of {valid}.")
        try:
            return cls.model_validate(dict(given))
        except ValidationError as e:
            raise InputError(explain(e, cls, context or f"head {head!r}")) from None

    @classmethod
    def user_params(cls, given: Mapping[str, Any], *, head: str, context: str = "") -> HeadParams:
        """The user's ``--param`` values validated (once, at the edge); the run's own keys are refused."""
        fixed = sorted(set(RUN_PARAMS) & set(given))
        if fixed:
            raise InputError(f"parameters {fixed} are set by the run (the labels, --seed); do not pass them as "
                             "--param.")
        return cls.validate_params(given, head=head, context=context)

    def for_run(self, *, task: str, n_classes: int, seed: int) -> HeadParams:
        """These parameters with the run's task, classes and seed (trusted values: no re-validation)."""
        return self.model_copy(update={"task": task, "n_classes": n_classes, "seed": seed})

    def given(self) -> dict[str, Any]:
        """The values that differ from the defaults (what a user set), for messages and run records."""
        return {k: v for k, v in self.values().items() if k in self.model_fields_set and k not in RUN_PARAMS}

    def values(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.fields()}


class Head(ABC):
    """Base class: validation at the edges, survival baseline, save/load; subclasses do the modelling.

    Parameters come as one validated :attr:`Params` model (a run passes the model it validated once) or as
    keyword arguments validated now (ranges, choices, units in the model's field descriptions); they are set
    as attributes (scikit-learn style). Every head has ``task``, ``n_classes`` and ``seed`` (:class:`HeadParams`).

    Policy (class attributes, read by the stages so that no stage branches on a head's name):

    * :attr:`tasks`: the tasks the head supports.
    * :attr:`input_kind`: ``"bag"`` = the instances of one bag modality (WSI tiles); ``"vector"`` = one vector
      per patient and modality (bags mean-pooled); ``"mixed"`` = bags as instances and vectors as they are.
    * :attr:`needs_every_modality`: a patient must have every modality the head uses (else: at least one).
    * :meth:`needs_covariates`: label columns the head reads besides the features (e.g. ComBat's batch).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[HeadParams]] = HeadParams
    tasks: ClassVar[tuple[str, ...]] = TASKS
    input_kind: ClassVar[Literal["bag", "vector", "mixed"]] = "vector"
    needs_every_modality: ClassVar[bool] = False
    task: str
    n_classes: int
    seed: int

    def __init__(self, params: HeadParams | None = None, **kwargs: Any) -> None:
        if params is None:
            params = self.Params.validate_params(kwargs, head=self.name)
        elif kwargs or not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} takes one {self.Params.__name__} or keyword parameters")
        self.params_ = params
        for k, v in params.values().items():
            setattr(self, k, v)
        self.on_epoch: Callable[[int, int], None] | None = None  # progress (epochs done, total); not saved

    # ---- parameters (scikit-learn style) ----------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        return cls.Params.fields()

    def get_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self.param_names()}

    @classmethod
    def user_params(cls, given: Mapping[str, Any], *, context: str = "") -> HeadParams:
        """The user's parameters validated into :attr:`Params` (unknown keys, bad values, the run's own keys)."""
        return cls.Params.user_params(given, head=cls.name, context=context)

    # ---- policy -----------------------------------------------------------------------------------------
    @classmethod
    def default_modalities(cls, modalities: Sequence[str], tables: Sequence[str], where: Any = "the store"
                           ) -> list[str]:
        """What the head uses when ``--modalities`` is not given: one bag modality for a bag head, else every
        store modality and table."""
        if cls.input_kind != "bag":
            return [*modalities, *tables]
        bags = [m for m in modalities if m in BAG_MODALITIES]
        if not bags:
            raise InputError(f"{where}: {cls.name} needs a bag modality and the store has none of "
                             f"{sorted(BAG_MODALITIES)}. Fix: pass --modalities with one of {list(modalities)}.")
        return bags[:1]

    @classmethod
    def usable_patients(cls, presence: np.ndarray) -> np.ndarray:
        """(n,) bool: the patients of a ``(n, M)`` presence matrix the head can fit or score."""
        presence = np.asarray(presence, dtype=bool)
        return presence.all(axis=1) if cls.needs_every_modality else presence.any(axis=1)

    @classmethod
    def needs_covariates(cls, params: HeadParams) -> list[str]:
        """Columns of the labels (or a store table) the head reads per patient besides the features, e.g. the
        batch column of batch correction; none by default."""
        return []

    @property
    def is_survival(self) -> bool:
        return self.task == "survival"

    @property
    def is_binary(self) -> bool:
        return self.task == "classification" and self.n_classes == 2

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

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
        if self.is_regression:  # standardised in-fold: the training patients' mean and standard deviation
            y = np.asarray(y, dtype=np.float64)
            sd = float(y.std())
            self.target_scaler_ = (float(y.mean()), sd if sd > 0 else 1.0)
            y = (y - self.target_scaler_[0]) / self.target_scaler_[1]
        self._fit(X, y)
        if self.is_survival:
            self.baseline_ = BreslowBaseline().fit(self._predict(X), y)
        return self

    def predict(self, X: Cohort) -> np.ndarray:
        """Class probabilities (n, n_classes), survival risk (n,) (higher = shorter survival), or the predicted
        value (n,) in the target's unit (regression)."""
        return self._to_unit(self._predict(self.align(X)))

    def _to_unit(self, out: np.ndarray) -> np.ndarray:
        """A regression head's standardised output in the target's unit (other tasks: as is)."""
        if not self.is_regression:
            return out
        mean, scale = self.target_scaler_
        return np.asarray(out, dtype=np.float64).reshape(-1) * scale + mean

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

    def predict_explained(self, X: Cohort) -> tuple[np.ndarray, dict[str, list[np.ndarray | None]] | None]:
        """:meth:`predict` and :meth:`attention` together (a head with bags computes both in one pass)."""
        return self.predict(X), self.attention(X)

    def modality_weights(self, X: Cohort) -> dict[str, float] | None:
        """Learnt weight of each modality, averaged over the patients of ``X`` (sums to 1)."""
        return None

    def contributions(self, X: Cohort) -> pd.DataFrame | None:
        """Per-patient, per-feature contributions to the output margin (SHAP), index = patient_id."""
        return None

    def attributions(self, X: Cohort) -> pd.DataFrame | None:
        """Integrated-gradients rows ``patient_id, modality, feature, attribution, ...`` (torch heads)."""
        return None

    def tile_attributions(self, X: Cohort) -> pd.DataFrame | None:
        """Per-instance integrated gradients of a bag head, rows ``patient_id, item_id, index, attribution``
        (comparable with attention; costs about ``n_steps`` forward and backward passes per bag)."""
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
        if self.task == "classification" and self.n_classes < 2:
            raise InputError(f"classification needs >= 2 classes, got {self.n_classes}")

    def align(self, X: Cohort) -> Cohort:
        """``X`` restricted to the model's modalities, in the model's order, table columns in the model's order.

        The one model-vs-data compatibility check (``predict`` relies on it): a missing modality, another
        encoder, another feature dim or missing table columns raise InputError naming the fix.
        """
        if not hasattr(self, "spec_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        out = {}
        for spec in self.spec_:
            if spec.name not in X.modalities:
                raise InputError(f"the model needs modality {spec.name!r}; the data has {X.names}")
            m = X.modalities[spec.name]
            got = m.spec
            if got.encoder_id != spec.encoder_id:
                raise InputError(f"modality {spec.name!r}: the model was fit on encoder_id {spec.encoder_id!r}, "
                                 f"the data comes from {got.encoder_id!r}. Fix: extract with the model's encoder.")
            if spec.columns is not None and got.columns is not None and tuple(got.columns) != spec.columns:
                m = _reorder_columns(m, spec)
            elif got.dim != spec.dim and m.present.any():
                raise InputError(f"modality {spec.name!r}: feature dim mismatch, the model expects "
                                 f"{spec.dim}, found {got.dim}. Fix: use features from the model's encoder"
                                 f"{f' ({spec.encoder_id})' if spec.encoder_id else ''}.")
            out[spec.name] = m
        return Cohort(list(X.patients), out, X.features_sha256, X.covariates)

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
            # sha256 of each training patient id: lets `evaluate` flag a cohort that overlaps the training one
            "fitted_patients_sha256": sorted(hashlib.sha256(p.encode()).hexdigest() for p in self.fitted_patients_),
            "mmcli_version": __version__,
        }
        if self.is_survival:
            config["baseline"] = self.baseline_.to_json()
        if self.is_regression:
            config["target_scaler"] = {"mean": self.target_scaler_[0], "scale": self.target_scaler_[1],
                                       "note": "the head fits (y - mean) / scale; predictions are mapped back"}
        self._save(path)
        save_preprocessors(path, self.preprocessors_)
        write_json(path / CONFIG, config)
        return path

    @classmethod
    def load(cls: type[H], path: str | Path) -> H:
        """Load a head saved by :meth:`save` (use :func:`load_head` when the head class is not known).

        The saved parameters are validated again: an edited bad value is an InputError naming the file."""
        path = Path(path)
        config = read_model_config(path)
        if config.get("head") != cls.name:
            raise InputError(f"{path}: holds a {config.get('head')!r} model, not {cls.name!r}")
        f = path / CONFIG
        try:
            self = cls(cls.Params.validate_params(config.get("params") or {}, head=cls.name,
                                                  context=f"{f} \"params\""))
        except InputError as e:
            raise InputError(f"{e}. Fix: restore that value in {f} (it is what `mmcli fit` saved), or refit "
                             "the model.") from None
        with model_file(f):  # an edited or cut config: missing keys, wrong types
            self.spec_ = [ModalitySpec.from_json(s) for s in config["modalities"]]
            if self.is_survival:
                self.baseline_ = BreslowBaseline.from_json(config["baseline"])
            if self.is_regression:
                self.target_scaler_ = (float(config["target_scaler"]["mean"]), float(config["target_scaler"]["scale"]))
        self.fitted_patients_ = []
        self.preprocessors_ = load_preprocessors(path)
        self._load(path)  # each head reads its own files through model_file (errors name the file)
        return self


def _reorder_columns(m: Any, spec: ModalitySpec) -> Any:
    """Table modality ``m`` with its columns in the model's order (extra columns dropped); missing ones refused."""
    assert spec.columns is not None and m.vectors is not None
    got = list(m.spec.columns or ())
    missing = [c for c in spec.columns if c not in got]
    if missing:
        raise InputError(f"table {spec.name!r} lacks the model's columns {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}. Fix: ingest the same table layout.")
    pos = {c: i for i, c in enumerate(got)}
    vectors = m.vectors[:, [pos[c] for c in spec.columns]]
    return replace(m, spec=replace(m.spec, dim=len(spec.columns), columns=tuple(spec.columns)), vectors=vectors,
                   present=~np.isnan(vectors).all(axis=1))


def read_model_config(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json; InputError when there is none, or it is not a JSON object (damaged)."""
    path = Path(path)
    f = path / CONFIG
    if not path.is_dir():
        raise InputError(f"{path}: no such run or model folder. Fix: pass the --out folder of `mmcli fit` "
                         "(or its model/ folder).")
    if not f.is_file():
        raise InputError(f"{path}: not a model folder (no {CONFIG}). Fix: pass the run's model/ folder or run dir.")
    with model_file(f):
        config = json.loads(f.read_text())
    if not isinstance(config, dict):
        raise damaged(f, "not a JSON object")
    return config


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
