"""Reading a run directory written by ``mmcli fit`` (the reading side of the run-dir contract).

A run dir holds ``config.json``, ``metrics.json`` and out-of-fold ``predictions.csv``; optionally
``modality_weights.json``, ``shap.csv``, ``attention.csv`` and ``folds.json``. Predictions are
``patient_id,fold,y_true,y_pred,prob_<class>...`` (classification) or ``patient_id,fold,time,event,risk``
(survival; event 1 = observed; higher risk = shorter survival).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import InputError

CLASSIFICATION = "classification"
SURVIVAL = "survival"
PROB_PREFIX = "prob_"


def read_json(path: Path) -> Any:
    """Parse a JSON file, or raise :class:`InputError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read JSON ({e}). Fix: re-run `mmcli fit` to rewrite it.") from e


def read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV with ``patient_id``/``item_id`` kept as text, or raise :class:`InputError` naming it."""
    try:
        return pd.read_csv(path, dtype={"patient_id": str, "item_id": str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise InputError(f"{path}: cannot read CSV ({e})") from e


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
            raise InputError(f"{self.path}: unknown task {task!r} (expected classification or survival)")
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
            raise InputError(f"{self.path}: no predictions.csv. Fix: re-run `mmcli fit --out {self.path}`.")
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
        raise InputError(f"{self.path / 'predictions.csv'}: y_true values {bad} are not among classes {classes}")

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
            raise InputError(f"{where}: needs one prob_<class> column per class (found {len(run.classes)})")
    missing = [c for c in need if c not in pred.columns]
    if missing:
        raise InputError(f"{where}: missing columns {missing} (has {list(pred.columns)})")
    if pred["patient_id"].isna().any():
        raise InputError(f"{where}: empty patient_id in row(s) {list(np.flatnonzero(pred['patient_id'].isna()) + 2)}")
    dup = pred["patient_id"][pred["patient_id"].duplicated()].unique().tolist()
    if dup:
        raise InputError(f"{where}: patients appear more than once: {dup[:5]} (expected one OOF row each)")
    numeric = ["time", "event", "risk"] if run.task == SURVIVAL else [PROB_PREFIX + c for c in run.classes]
    for c in numeric:
        values = pd.to_numeric(pred[c], errors="coerce")
        if values.isna().any():
            rows = list(np.flatnonzero(values.isna().to_numpy())[:5] + 2)
            raise InputError(f"{where}: column {c!r} has missing or non-numeric values (CSV rows {rows})")


def load_run(run_dir: str | Path) -> Run:
    """Load a run dir; raises :class:`InputError` when it is not one or a file in it is malformed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise InputError(f"{path}: not a run directory (it does not exist). Fix: pass the --out folder of `mmcli fit`.")
    files = {n: path / n for n in ("config.json", "metrics.json", "predictions.csv")}
    if not any(p.is_file() for p in files.values()):
        raise InputError(f"{path}: not a run directory (no config.json, metrics.json or predictions.csv)")
    run = Run(path)
    if files["config.json"].is_file():
        run.config = read_json(files["config.json"])
    if files["metrics.json"].is_file():
        run.metrics = read_json(files["metrics.json"])
    if files["predictions.csv"].is_file():
        pred = read_csv(files["predictions.csv"])
        run.predictions = pred
        _check_predictions(run, pred, files["predictions.csv"])
    return run
