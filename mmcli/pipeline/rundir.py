"""The run folder of ``mmcli fit``: the one module that writes it (:class:`RunWriter`) and reads it
(:func:`load_run`). report, predict, compare and ablate read runs only through here.

A run folder holds::

    config.json          schema_version, head, params, task, target / time+event (+ time_unit), classes,
                         modalities, encoder_ids, folds, seed, store, labels, features_sha256, excluded
                         patients, timings, mmcli version, created
    metrics.json         {"head","task","modalities","folds","n_patients","metrics":{name:{mean,ci_low,ci_high,
                         per_fold}},"encoder_ids","seed","created"}
    predictions.csv      out-of-fold: patient_id,fold,y_true,y_pred,prob_<class>...  |  patient_id,fold,time,event,
                         risk (survival; event 1 = observed; higher risk = shorter survival)
    folds.json           {patient_id: fold}
    cv_audit.json        per fold: the patients each preprocessing step was fit on and their overlap with the test
    model/               the final model (the head's own files; its config.json gets a "run" block)
    modality_weights.json, shap.csv, attention.csv / attention.<modality>.csv   optional explanations
    fit.log              the command's log (written by the CLI)

Every file is written atomically (:mod:`mmcli.pipeline.io`); CSV text cells are formula-escaped on write
(a leading ``'`` before ``=``, ``+``, ``-``, ``@``, tab, CR) and unescaped here on read, so labels round-trip.
``config.json`` carries ``schema_version`` (:data:`SCHEMA_VERSION`); a run without it is an older run (read as
version 0); a newer version than this mmcli knows is refused with a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import RunFolderError
from mmcli.pipeline.io import FORMULA_START, write_csv, write_json

SCHEMA_VERSION = 1
CLASSIFICATION = "classification"
SURVIVAL = "survival"
PROB_PREFIX = "prob_"
CONFIG, METRICS, PREDICTIONS = "config.json", "metrics.json", "predictions.csv"
FOLDS, CV_AUDIT, MODEL_DIR, LOG_NAME = "folds.json", "cv_audit.json", "model", "fit.log"
MODALITY_WEIGHTS, SHAP = "modality_weights.json", "shap.csv"
# explanation files of one run; removed before a new run writes into the same folder (they would mislead)
OPTIONAL_OUTPUTS = (MODALITY_WEIGHTS, SHAP, "attention.csv", "attention.*.csv")
# keys of config.json copied into model/config.json's "run" block (what predict needs without the run folder)
MODEL_RUN_KEYS = ("task", "problem", "target", "time", "event", "classes", "modalities", "encoder_ids",
                  "features_sha256", "seed", "created", "risk_convention")


def read_json(path: Path) -> Any:
    """Parse a JSON file, or raise :class:`RunFolderError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path}: cannot read JSON ({e}). Fix: re-run `mmcli fit` to rewrite it.") from e


def unescape_cell(value: Any) -> Any:
    """Undo :func:`mmcli.pipeline.io.escape_cell`: ``'=x`` -> ``=x``; anything else is returned as is."""
    if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1:].startswith(FORMULA_START):
        return value[1:]
    return value


def read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV written by mmcli: ``patient_id``/``item_id`` kept as text, formula escapes undone
    (cells and header); raises :class:`RunFolderError` naming the file."""
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "item_id": str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise RunFolderError(f"{path}: cannot read CSV ({e})") from e
    df.columns = [unescape_cell(c) for c in df.columns]
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(unescape_cell)
    return df


@dataclass
class Run:
    """One run dir: its config, metrics and out-of-fold predictions (each may be absent except the folder)."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    predictions: pd.DataFrame | None = None

    # ---- identity -------------------------------------------------------------------------------------
    def _get(self, key: str, default: Any = None) -> Any:
        if key in self.config:
            return self.config[key]
        return (self.metrics or {}).get(key, default)

    @property
    def task(self) -> str:
        task = self._get("task")
        if task is None and self.predictions is not None:
            task = SURVIVAL if "risk" in self.predictions.columns else CLASSIFICATION
        if task not in (CLASSIFICATION, SURVIVAL):
            raise RunFolderError(f"{self.path}: unknown task {task!r} (expected classification or survival)")
        return task

    @property
    def head(self) -> str:
        return str(self._get("head", "?"))

    @property
    def modalities(self) -> list[str]:
        return list(self._get("modalities", []) or [])

    @property
    def encoder_ids(self) -> dict[str, str]:
        return dict(self._get("encoder_ids", {}) or {})

    @property
    def schema_version(self) -> int:
        """config.json's ``schema_version`` (0 for runs written before it was recorded)."""
        return int(self.config.get("schema_version", 0))

    @property
    def params(self) -> dict[str, Any]:
        """The head's parameters as fitted."""
        return dict(self.config.get("params") or {})

    @property
    def store(self) -> str | None:
        """The feature store the run was fitted on (absolute path as recorded)."""
        return self.config.get("store")

    @property
    def time_unit(self) -> str | None:
        """Unit of the survival time column; None when the run does not know it (``fit`` has no flag for it)."""
        return self.config.get("time_unit")

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def endpoint(self) -> dict[str, Any]:
        """What is predicted: ``{"target": ...}`` or ``{"time": ..., "event": ...}`` (None when unrecorded)."""
        if self.task == CLASSIFICATION:
            return {"target": self.config.get("target")}
        return {"time": self.config.get("time"), "event": self.config.get("event")}

    @property
    def classes(self) -> list[str]:
        """Class labels as text, in the order of the probability columns."""
        if self.config.get("classes") is not None:
            return [str(c) for c in self.config["classes"]]
        if self.predictions is None:
            return []
        return [c[len(PROB_PREFIX):] for c in self.predictions.columns if c.startswith(PROB_PREFIX)]

    def optional(self, name: str) -> Path | None:
        """Path of an optional artefact when it exists."""
        p = self.path / name
        return p if p.is_file() else None

    # ---- predictions ----------------------------------------------------------------------------------
    def require_predictions(self) -> pd.DataFrame:
        if self.predictions is None:
            raise RunFolderError(f"{self.path}: no predictions.csv. Fix: re-run `mmcli fit --out {self.path}`.")
        return self.predictions

    def class_index(self) -> np.ndarray:
        """``y_true`` as integer indices into :attr:`classes` (accepts labels or 0..C-1 indices)."""
        pred = self.require_predictions()
        classes = self.classes
        y = pred["y_true"].astype(str).to_numpy()
        lookup = {c: i for i, c in enumerate(classes)}
        if all(v in lookup for v in y):
            return np.array([lookup[v] for v in y], dtype=int)
        as_int = pd.to_numeric(pred["y_true"], errors="coerce")
        if as_int.notna().all() and as_int.between(0, len(classes) - 1).all() and (as_int % 1 == 0).all():
            return as_int.to_numpy(dtype=int)
        bad = sorted(set(y) - set(lookup))[:5]
        raise RunFolderError(f"{self.path / 'predictions.csv'}: y_true values {bad} are not among classes {classes}")

    def prob_matrix(self) -> np.ndarray:
        """(n, C) out-of-fold class probabilities in :attr:`classes` order."""
        pred = self.require_predictions()
        return pred[[PROB_PREFIX + c for c in self.classes]].to_numpy(dtype=float)

    def score(self) -> np.ndarray:
        """One score per patient for ranking: P(positive class) for binary, max probability for multiclass,
        risk for survival."""
        if self.task == SURVIVAL:
            return self.require_predictions()["risk"].to_numpy(dtype=float)
        p = self.prob_matrix()
        return p[:, 1] if p.shape[1] == 2 else p.max(axis=1)


def _check_predictions(run: Run, pred: pd.DataFrame, where: Path) -> None:
    need = ["patient_id"]
    if run.task == SURVIVAL:
        need += ["time", "event", "risk"]
    else:
        need += ["y_true"] + [PROB_PREFIX + c for c in run.classes]
        if len(run.classes) < 2:
            raise RunFolderError(f"{where}: needs one prob_<class> column per class (found {len(run.classes)})")
    missing = [c for c in need if c not in pred.columns]
    if missing:
        raise RunFolderError(f"{where}: missing columns {missing} (has {list(pred.columns)})")
    if pred["patient_id"].isna().any():
        rows = list(np.flatnonzero(pred["patient_id"].isna()) + 2)
        raise RunFolderError(f"{where}: empty patient_id in row(s) {rows}")
    dup = pred["patient_id"][pred["patient_id"].duplicated()].unique().tolist()
    if dup:
        raise RunFolderError(f"{where}: patients appear more than once: {dup[:5]} (expected one OOF row each)")
    numeric = ["time", "event", "risk"] if run.task == SURVIVAL else [PROB_PREFIX + c for c in run.classes]
    for c in numeric:
        values = pd.to_numeric(pred[c], errors="coerce")
        if values.isna().any():
            rows = list(np.flatnonzero(values.isna().to_numpy())[:5] + 2)
            raise RunFolderError(f"{where}: column {c!r} has missing or non-numeric values (CSV rows {rows})")


def load_run(run_dir: str | Path) -> Run:
    """Load a run dir; raises :class:`RunFolderError` when it is not one or a file in it is malformed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFolderError(f"{path}: not a run directory (it does not exist). "
                             "Fix: pass the --out folder of `mmcli fit`.")
    files = {n: path / n for n in ("config.json", "metrics.json", "predictions.csv")}
    if not any(p.is_file() for p in files.values()):
        raise RunFolderError(f"{path}: not a run directory (no config.json, metrics.json or predictions.csv)")
    run = Run(path)
    if files["config.json"].is_file():
        run.config = read_json(files["config.json"])
        if not isinstance(run.config, dict):
            raise RunFolderError(f"{files['config.json']}: not a JSON object. Fix: re-run `mmcli fit --out {path}`.")
        check_schema(run.config, files["config.json"])
    if files["metrics.json"].is_file():
        run.metrics = read_json(files["metrics.json"])
    if files["predictions.csv"].is_file():
        pred = read_csv(files["predictions.csv"])
        run.predictions = pred
        _check_predictions(run, pred, files["predictions.csv"])
    return run


def check_schema(config: Mapping[str, Any], where: Path) -> int:
    """The run's ``schema_version`` when this mmcli can read it; :class:`RunFolderError` otherwise."""
    version = config.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise RunFolderError(f"{where}: schema_version {version!r} is not a run-folder schema version (an "
                             "integer). Fix: re-run `mmcli fit` to rewrite the run.")
    if version > SCHEMA_VERSION:
        raise RunFolderError(f"{where}: run-folder schema_version {version} was written by a newer mmcli; this "
                             f"mmcli reads up to version {SCHEMA_VERSION}. Fix: upgrade mmcli "
                             "(pip install -U mmcli), or re-run `mmcli fit` with this version.")
    return version


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's metrics.json, or None when the folder holds no readable, current-schema run."""
    try:
        run = load_run(run_dir)
    except RunFolderError:
        return None
    return run.metrics


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder or its ``model/`` folder -> the model folder (the model loader checks its contents)."""
    path = Path(path)
    if (path / MODEL_DIR / CONFIG).is_file():
        config = path / CONFIG
        if config.is_file():
            doc = read_json(config)
            if isinstance(doc, dict):
                check_schema(doc, config)
        return path / MODEL_DIR
    return path


# ---- writing ----------------------------------------------------------------------------------------------
class RunWriter:
    """Writes one run folder, in this order: :meth:`begin` (create, drop stale explanations), the model
    (:meth:`write_model`), predictions / folds / audit / explanations, then :meth:`finish` (config.json and
    metrics.json last, so a folder with a current metrics.json holds a finished run)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def begin(self) -> RunWriter:
        self.path.mkdir(parents=True, exist_ok=True)
        for pattern in OPTIONAL_OUTPUTS:  # from an earlier run into the same folder; they would now mislead
            for f in self.path.glob(pattern):
                f.unlink()
        return self

    def write_model(self, save: Callable[[Path], Any], config: Mapping[str, Any]) -> Path:
        """``save(folder)`` writes the model into a staging folder; its config.json gets the run's
        :data:`MODEL_RUN_KEYS` as a ``run`` block, then the folder is swapped in for ``model/``. A failure
        leaves the previous model in place and no staging folder behind."""
        model_dir = self.path / MODEL_DIR
        stage = self.path / f".model.{uuid.uuid4().hex}"
        try:
            save(stage)
            cfg = read_json(stage / CONFIG)
            cfg["run"] = {k: config.get(k) for k in MODEL_RUN_KEYS}
            write_json(stage / CONFIG, cfg)
            if model_dir.exists():
                old = self.path / f".model-old.{uuid.uuid4().hex}"
                os.rename(model_dir, old)
                os.rename(stage, model_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(stage, model_dir)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        return model_dir

    def write_predictions(self, df: pd.DataFrame) -> Path:
        return write_csv(self.path / PREDICTIONS, df)

    def write_folds(self, folds: Mapping[str, int]) -> Path:
        return write_json(self.path / FOLDS, dict(folds))

    def write_audit(self, audit: Mapping[str, Any]) -> Path:
        return write_json(self.path / CV_AUDIT, dict(audit))

    def write_modality_weights(self, weights: Mapping[str, float]) -> Path:
        return write_json(self.path / MODALITY_WEIGHTS, dict(weights))

    def write_shap(self, df: pd.DataFrame) -> Path:
        return write_csv(self.path / SHAP, df)

    def write_attention(self, frames: Mapping[str, pd.DataFrame]) -> list[Path]:
        """``attention.csv`` for one bag modality, ``attention.<modality>.csv`` each for several."""
        return [write_csv(self.path / ("attention.csv" if len(frames) == 1 else f"attention.{name}.csv"), df)
                for name, df in frames.items()]

    def finish(self, config: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """config.json (with :data:`SCHEMA_VERSION`, and ``time_unit`` None unless given) then metrics.json."""
        doc = {"schema_version": SCHEMA_VERSION, "time_unit": None, **config}
        doc["schema_version"] = SCHEMA_VERSION
        write_json(self.path / CONFIG, doc)
        write_json(self.path / METRICS, dict(metrics))
