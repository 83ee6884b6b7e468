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

Writing (:class:`RunWriter`): the new run is built in ``.<name>.fit-<pid>.new`` beside ``--out`` and swapped in
whole at the end, under the lock file ``.<name>.lock`` beside it (PID, host, start; a dead local writer's lock
is cleared). An existing, non-empty ``--out`` is refused unless ``overwrite``; a failed, interrupted or
disk-full fit removes its staging folder and leaves the previous run as it was.

Every file is written atomically (:mod:`mmcli.pipeline.io`); CSV text cells are formula-escaped on write
(a leading ``'`` before ``=``, ``+``, ``-``, ``@``, tab, CR) and unescaped here on read, so labels round-trip.
``config.json`` carries ``schema_version`` (:data:`SCHEMA_VERSION`); a run without it is an older run (read as
version 0); a newer version than this mmcli knows is refused with a clear error.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import DiskFullError, MmcliError, RunFolderError
from mmcli.pipeline.faults import fault
from mmcli.pipeline.io import (
    FORMULA_START,
    disk_full_as_error,
    disk_full_message,
    is_disk_full,
    write_csv,
    write_json,
)
from mmcli.pipeline.locks import LockHeld, PidLock
from mmcli.pipeline.log import get_logger
from mmcli.pipeline.signals import Interrupted, critical

SCHEMA_VERSION = 1
CLASSIFICATION = "classification"
SURVIVAL = "survival"
REGRESSION = "regression"
PROB_PREFIX = "prob_"
_log = get_logger("rundir")
CONFIG, METRICS, PREDICTIONS = "config.json", "metrics.json", "predictions.csv"
FOLDS, CV_AUDIT, MODEL_DIR, LOG_NAME = "folds.json", "cv_audit.json", "model", "fit.log"
MODALITY_WEIGHTS, SHAP, ATTRIBUTIONS = "modality_weights.json", "shap.csv", "attributions.csv"
WINDOW_ATTRIBUTIONS = "attributions_windows.csv"
TILE_ATTRIBUTIONS = "attributions_tiles.csv"
# keys of config.json copied into model/config.json's "run" block (what predict needs without the run folder)
MODEL_RUN_KEYS = ("task", "target", "time", "event", "classes", "modalities", "encoder_ids",
                  "features_sha256", "seed", "created", "risk_convention", "eval_times")


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
        if task not in (CLASSIFICATION, SURVIVAL, REGRESSION):
            raise RunFolderError(f"{self.path}: unknown task {task!r} (expected classification, survival or "
                                 "regression)")
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
        if self.task in (CLASSIFICATION, REGRESSION):
            return {"target": self.config.get("target")}
        return {"time": self.config.get("time"), "event": self.config.get("event")}

    @property
    def classes(self) -> list[str]:
        """Class labels as text, in the order of the probability columns (none for survival and regression)."""
        if self.task == REGRESSION:
            return []
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
        risk for survival, the predicted value for regression."""
        if self.task == SURVIVAL:
            return self.require_predictions()["risk"].to_numpy(dtype=float)
        if self.task == REGRESSION:
            return self.require_predictions()["y_pred"].to_numpy(dtype=float)
        p = self.prob_matrix()
        return p[:, 1] if p.shape[1] == 2 else p.max(axis=1)


def _check_predictions(run: Run, pred: pd.DataFrame, where: Path) -> None:
    need = ["patient_id"]
    if run.task == SURVIVAL:
        need += ["time", "event", "risk"]
    elif run.task == REGRESSION:
        need += ["y_true", "y_pred"]
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
    numeric = (["time", "event", "risk"] if run.task == SURVIVAL else ["y_true", "y_pred"] if run.task == REGRESSION
               else [PROB_PREFIX + c for c in run.classes])
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


# ---- model files --------------------------------------------------------------------------------------------
def _first_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, without xgboost's ``[12:00:00] /path/file.cc:409:`` prefix."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", text)
    return f"{type(e).__name__}: {text[:limit].rstrip('.')}"


def damaged(f: Path, what: str) -> RunFolderError:
    """The error for a model file that is missing or cannot be used: names the file, says the run folder is
    damaged and how to get a good one."""
    return RunFolderError(f"{f}: {what}. The run folder is damaged (a truncated copy, an edited or missing "
                          "file). Fix: restore the folder from where it came from, or re-run `mmcli fit` to "
                          "write it again.")


@contextmanager
def model_file(f: str | Path, *, optional: bool = False) -> Iterator[Path]:
    """Read model file ``f`` inside the block: a missing file or any failure to parse it (a truncated JSON,
    safetensors or xgboost file, an array of the wrong shape) becomes a :class:`RunFolderError` naming the
    file and the fix, never a library traceback. :class:`MmcliError` passes through unchanged."""
    f = Path(f)
    if not optional and not f.is_file():
        raise damaged(f, "missing" if not f.exists() else "not a file")
    try:
        yield f
    except MmcliError:
        raise
    except Exception as e:  # noqa: BLE001 - every parser raises its own types (SafetensorError, XGBoostError...)
        raise damaged(f, f"cannot be read ({_first_line(e)})") from e


# ---- writing ----------------------------------------------------------------------------------------------
# what marks a folder as a run of `mmcli fit` (``--overwrite`` replaces nothing else)
RUN_MARKERS = (CONFIG, METRICS, PREDICTIONS, MODEL_DIR, LOG_NAME, FOLDS, CV_AUDIT, "report.html")
_CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


def _abs(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def staging_path(out: str | Path) -> Path:
    """Where this process builds the run of ``--out`` before swapping it in: ``.<name>.fit-<pid>.new`` beside
    it. Known before the run starts, so the CLI points the command's log (``fit.log``) into it."""
    out = _abs(out)
    return out.with_name(f".{out.name}.fit-{os.getpid()}.new")


def lock_path(out: str | Path) -> Path:
    """The writer lock of run folder ``out``: ``.<name>.lock`` beside it (the folder itself gets replaced)."""
    out = _abs(out)
    return out.with_name(f".{out.name}.lock")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            pass
    return total


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that exists and is not empty (unless ``overwrite``), and never replace a folder
    that is not an mmcli run."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder. Fix: choose another --out.")
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError as e:
        raise RunFolderError(f"{out}: cannot list it ({e.strerror}). Fix: choose another --out.") from e
    if not entries:
        return
    if not overwrite:
        raise RunFolderError(f"{out}: already exists and is not empty (an earlier run?). Fix: pass --overwrite "
                             "to replace it whole, or choose another --out.")
    if not any(n in RUN_MARKERS for n in entries):
        raise RunFolderError(f"{out}: is not a run folder of `mmcli fit` (none of {list(RUN_MARKERS)}); "
                             "--overwrite only replaces run folders. Fix: choose another --out.")
    logs = audit_logs_in(out)
    if logs:
        raise RunFolderError(f"{out}: holds the audit log of `mmcli serve` ({logs[0]}); --overwrite would delete "
                             "it. Fix: move the log's files (LOG, LOG.NNNNNN, LOG.head, LOG.lock) out of the run "
                             "folder and pass the new path to `mmcli serve --audit-log` (the default is "
                             "RUN.audit/ beside the run); or choose another --out.")


def audit_logs_in(folder: Path) -> list[Path]:
    """Audit logs of ``mmcli serve`` anywhere under ``folder``, found by their head file ``LOG.head`` (a small
    JSON record with ``seq`` and ``hash``); symlinks are not followed."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not name.endswith(".head"):
                continue
            head = Path(root) / name
            try:
                with open(head, "rb") as fh:
                    doc = json.loads(fh.read(1024))
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and "seq" in doc and "hash" in doc:
                found.append(head.with_name(name[: -len(".head")]))
    return sorted(found)


class RunWriter:
    """Writes one run folder: the new run is built in a staging folder beside ``--out``
    (:func:`staging_path`) and swapped in whole at :meth:`finish`, under a lock on ``--out``
    (:func:`lock_path`). So two writers never mix, a refit leaves nothing of the previous run (no stale
    report.html or explanations), and a failed, interrupted or disk-full fit leaves the previous run as it was.

    Order: :meth:`open` (lock, refuse an existing run unless ``overwrite``; before the long work),
    :meth:`begin` (staging folder), :meth:`write_model`, predictions / folds / audit / explanations, then
    :meth:`finish` (config.json and metrics.json, then the swap). As a context manager it opens on entry
    and, on exit, removes the staging folder of an unfinished run, releases the lock, and turns a full disk
    into :class:`DiskFullError` naming ``--out``.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = _abs(path)
        self.overwrite = overwrite
        self.stage = staging_path(self.path)
        self.committed = False
        self._lock = PidLock(lock_path(self.path), "mmcli fit")
        self._began = False

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def open(self) -> RunWriter:
        """Take the writer lock on ``--out`` and check it may be written; clears leftovers of dead writers."""
        if self._lock.held:
            return self
        check_out(self.path, self.overwrite)
        try:
            self._lock.acquire()
        except LockHeld as e:
            raise RunFolderError(f"{self.path}: another {e.holder.describe()} is writing this run folder. Fix: "
                                 f"wait for it to finish, or choose another --out (if that process is gone, "
                                 f"delete {e.path}).") from None
        except OSError as e:
            raise self._write_error(e) from e
        try:
            self._clear_leftovers()
            check_out(self.path, self.overwrite)
        except BaseException:
            self._lock.release()
            raise
        return self

    def _clear_leftovers(self) -> None:
        """Staging folders of writers that died (we hold the lock, so no live writer owns one); an old run
        set aside by a writer that died mid-swap is put back when ``--out`` is missing."""
        prefix = f".{self.path.name}.fit-"
        for p in sorted(self.path.parent.glob(f"{glob.escape(prefix)}*")):
            if p.name.endswith(".old") and not (self.path.exists() or self.path.is_symlink()):
                os.rename(p, self.path)
            elif p.name.endswith((".new", ".old")):
                _remove(p)

    def begin(self) -> RunWriter:
        """Open (if not yet) and create the empty staging folder the run is written into."""
        self.open()
        if not self._began:
            _remove(self.stage)
            with disk_full_as_error(self.path):
                self.stage.mkdir(parents=True)
            self._began = True
            # also opens the command's log, which the CLI points into the staging folder (fit.log)
            _log.debug("writing the run into %s", self.stage)
        return self

    def abort(self) -> None:
        """Drop the unfinished run (its staging folder) and release the lock; ``--out`` is untouched."""
        if not self.committed:
            _remove(self.stage)
        self._began = False
        self._lock.release()

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        staged = _size(self.stage) if exc is not None and self.stage.exists() else 0
        self.abort()
        if exc is None:
            return
        if isinstance(exc, Interrupted) and not exc.note:
            exc.note = (f"the new run was complete and is in {self.path}" if self.committed else
                        f"nothing was written; {self.path} is as it was")
        elif isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE:
            raise self._write_error(exc) from exc
        elif isinstance(exc, Exception) and is_disk_full(exc):  # also a DiskFullError naming a staged file
            old = _size(self.path) if self.path.is_dir() else 0
            free = shutil.disk_usage(next(p for p in [self.path, *self.path.parents] if p.exists())).free
            need = max(old, staged) - free
            raise DiskFullError(disk_full_message(self.path, need if need > 0 else None)
                                + f" {self.path} is as it was.") from exc

    def _write_error(self, e: OSError) -> MmcliError:
        """An OSError while creating the lock, the staging folder or a file, worded for the user."""
        if is_disk_full(e):
            return DiskFullError(disk_full_message(self.path))
        blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return RunFolderError(f"{self.path}: {blocker} is a file, not a folder. Fix: choose another --out.")
        return RunFolderError(f"{self.path}: cannot write there ({e.strerror or e}: {e.filename}). Fix: choose an "
                              "--out in a folder you can write (and that is not read-only).")

    # ---- files ----------------------------------------------------------------------------------------
    def _file(self, name: str) -> Path:
        self.begin()
        return self.stage / name

    def write_model(self, save: Callable[[Path], Any], config: Mapping[str, Any]) -> Path:
        """``save(folder)`` writes the model into the run's ``model/``; its config.json gets the run's
        :data:`MODEL_RUN_KEYS` as a ``run`` block."""
        folder = self._file(MODEL_DIR)
        save(folder)
        fault("run.model")
        cfg = read_json(folder / CONFIG)
        cfg["run"] = {k: config.get(k) for k in MODEL_RUN_KEYS}
        write_json(folder / CONFIG, cfg)
        return self.path / MODEL_DIR

    def write_predictions(self, df: pd.DataFrame) -> Path:
        return write_csv(self._file(PREDICTIONS), df)

    def write_folds(self, folds: Mapping[str, int]) -> Path:
        return write_json(self._file(FOLDS), dict(folds))

    def write_audit(self, audit: Mapping[str, Any]) -> Path:
        return write_json(self._file(CV_AUDIT), dict(audit))

    def write_modality_weights(self, weights: Mapping[str, float]) -> Path:
        return write_json(self._file(MODALITY_WEIGHTS), dict(weights))

    def write_shap(self, df: pd.DataFrame) -> Path:
        return write_csv(self._file(SHAP), df)

    def write_attributions(self, df: pd.DataFrame) -> Path:
        """``attributions.csv``: out-of-fold integrated gradients (torch heads)."""
        return write_csv(self._file(ATTRIBUTIONS), df)

    def write_window_attributions(self, df: pd.DataFrame) -> Path:
        """``attributions_windows.csv``: out-of-fold integrated gradients per note window (offsets, no text)."""
        return write_csv(self._file(WINDOW_ATTRIBUTIONS), df)

    def write_tile_attributions(self, df: pd.DataFrame) -> Path:
        """Per-tile integrated gradients (``--explain full``): patient_id,fold,item_id,index,attribution,..."""
        return write_csv(self._file(TILE_ATTRIBUTIONS), df)

    def write_attention(self, frames: Mapping[str, pd.DataFrame]) -> list[Path]:
        """``attention.csv`` for one bag modality, ``attention.<modality>.csv`` each for several."""
        return [write_csv(self._file("attention.csv" if len(frames) == 1 else f"attention.{name}.csv"), df)
                for name, df in frames.items()]

    def finish(self, config: Mapping[str, Any], metrics: Mapping[str, Any]) -> Path:
        """config.json (with :data:`SCHEMA_VERSION`, and ``time_unit`` None unless given) then metrics.json
        into the staging folder, then the staging folder replaces ``--out`` and the lock is released."""
        doc = {"schema_version": SCHEMA_VERSION, "time_unit": None, **config}
        doc["schema_version"] = SCHEMA_VERSION
        write_json(self._file(CONFIG), doc)
        write_json(self._file(METRICS), dict(metrics))
        fault("run.staged")
        self._commit()
        self.abort()  # releases the lock (the staging folder is now --out)
        return self.path

    def _commit(self) -> None:
        aside = self.path.with_name(f".{self.path.name}.fit-{os.getpid()}.old")
        with critical():
            check_out(self.path, self.overwrite)  # nothing else wrote into it meanwhile
            moved = False
            if self.path.is_symlink() or (self.path.exists() and any(self.path.iterdir())):
                os.rename(self.path, aside)
                moved = True
            elif self.path.exists():
                self.path.rmdir()
            try:
                os.rename(self.stage, self.path)
            except BaseException:
                if moved:
                    os.rename(aside, self.path)
                raise
            self.committed = True
        if moved:
            _remove(aside)
        _log.debug("swapped the new run in: %s%s", self.path, " (replaced the previous run)" if moved else "")


# ---- the frames a run folder owns (written by fit, predict and evaluate) ------------------------------------
def prediction_frame(patients: Sequence[str], pred: np.ndarray, task: str, classes: Sequence[str] | None
                     ) -> pd.DataFrame:
    """``patient_id`` + ``y_pred, prob_<class>...`` (classification), ``risk`` (survival) or ``y_pred`` (the
    predicted value of a regression, in the target's unit)."""
    df = pd.DataFrame({"patient_id": list(patients)})
    if task == SURVIVAL:
        df["risk"] = pred
        return df
    if task == REGRESSION:
        df["y_pred"] = np.asarray(pred, dtype=np.float64)
        return df
    assert classes is not None
    df["y_pred"] = [classes[i] for i in np.asarray(pred).argmax(axis=1)]
    for k, c in enumerate(classes):
        df[f"{PROB_PREFIX}{c}"] = pred[:, k]
    return df


def attention_frame(patients: Sequence[str], cohort_items: Sequence[Sequence[tuple[str, int]]],
                    attention: Sequence[np.ndarray | None]) -> pd.DataFrame:
    """Rows ``patient_id,item_id,index,attention``: ``index`` is the row within that item's features."""
    pid_col, item_col, idx_col, att_col = [], [], [], []
    for pid, items, att in zip(patients, cohort_items, attention):
        if att is None:
            continue
        for iid, n in items:
            pid_col.append(np.full(n, pid, dtype=object))
            item_col.append(np.full(n, iid, dtype=object))
            idx_col.append(np.arange(n))
        att_col.append(np.asarray(att, dtype=np.float64))
    if not att_col:
        return pd.DataFrame(columns=["patient_id", "item_id", "index", "attention"])
    return pd.DataFrame({"patient_id": np.concatenate(pid_col), "item_id": np.concatenate(item_col),
                         "index": np.concatenate(idx_col), "attention": np.concatenate(att_col)})
