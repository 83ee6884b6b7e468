"""The stage-1 item runner shared by every modality: cache check, per-item locks, per-item failure isolation,
in-process or dask.distributed execution, progress, run summary and run record.

An :class:`ExtractorSpec` is a small picklable recipe (``target`` + kwargs) that builds an :class:`ItemExtractor`
once per process (so each dask worker loads its encoder once). Items are written to the store by whoever
extracted them, atomically, under a per-item lock file (PID, host, start time) so that several processes can
share one store without a global lock.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import socket
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.pipeline.errors import InputError, ItemError
from mmcli.pipeline.faults import fault
from mmcli.pipeline.fingerprint import source_fingerprint
from mmcli.pipeline.manifest import ManifestRow
from mmcli.pipeline.store import open_store, pid_alive

ProgressFn = Callable[[int, int], None]  # (done, total) units of work inside one item, e.g. tiles


@dataclass
class ItemResult:
    """What an extractor returns for one manifest row."""

    features: np.ndarray
    coords: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def set_torch_threads(n: int | None) -> None:
    """Give torch ``n`` CPU threads (``None``/0: leave torch's default), e.g. under a dask nanny's OMP=1."""
    if n:
        import torch

        torch.set_num_threads(int(n))


class ItemExtractor(ABC):
    """Turns one manifest row into features. Built once per process from an :class:`ExtractorSpec`."""

    modality: str

    @property
    @abstractmethod
    def encoder_id(self) -> str: ...

    @abstractmethod
    def encoder_attrs(self) -> dict[str, Any]:
        """Provenance stored at ``/<modality>/<encoder_id>`` (encoder name, dim, params, weights hash)."""

    @abstractmethod
    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult: ...

    def fingerprint(self, row: ManifestRow) -> dict[str, Any]:
        return source_fingerprint(row.path)


@dataclass(frozen=True)
class ExtractorSpec:
    """Picklable recipe for an extractor: ``target`` is ``"package.module:callable"``.

    ``modality`` and ``encoder_id`` are known without building the model, so the cache can be checked
    before any encoder is loaded.
    """

    target: str
    kwargs: dict[str, Any]
    modality: str
    encoder_id: str

    def key(self) -> str:
        return json.dumps([self.target, self.kwargs], sort_keys=True, default=str)

    def build(self) -> ItemExtractor:
        with _CACHE_LOCK:
            k = self.key()
            if k not in _EXTRACTORS:
                mod, _, name = self.target.partition(":")
                _EXTRACTORS[k] = getattr(importlib.import_module(mod), name)(**self.kwargs)
            return _EXTRACTORS[k]


_EXTRACTORS: dict[str, ItemExtractor] = {}
_CACHE_LOCK = threading.Lock()


# ---- per-item locks ---------------------------------------------------------------------------------------
def lock_dir(store_path: str | Path) -> Path:
    """Lock files live beside the store (``<store>.locks/``), never inside the data."""
    p = Path(store_path)
    return p.with_name(p.name + ".locks")


@contextmanager
def item_lock(store_path: str | Path, modality: str, encoder_id: str, patient_id: str, item_id: str) -> Iterator[bool]:
    """Yield True if this process holds the item's lock, False if a live process holds it.

    A lock left by a dead process on this host is stale and cleared (as TRIDENT does). Locks from other hosts
    are honoured; remove them by hand (``<store>.locks``) if that host is gone.
    """
    path = lock_dir(store_path) / modality / encoder_id / patient_id / f"{item_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    held = False
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                other = {}
            if other.get("host") == me["host"] and not pid_alive(int(other.get("pid", -1))):
                path.unlink(missing_ok=True)
                continue
            if not other:  # written by a process killed between create and write: stale after a minute
                try:
                    if time.time() - path.stat().st_mtime > 60:
                        path.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
            break
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        held = True
        break
    try:
        yield held
    finally:
        if held:
            path.unlink(missing_ok=True)


# ---- one item ---------------------------------------------------------------------------------------------
@dataclass
class ItemOutcome:
    patient_id: str
    item_id: str
    path: str
    row: int
    status: str  # done | cached | failed | missing | locked
    reason: str = ""
    n: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def process_item(
    spec: ExtractorSpec,
    row: ManifestRow,
    store_path: str,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> ItemOutcome:
    """Extract one row and write it to the store; never raises for a bad item."""
    t0 = time.perf_counter()
    out = ItemOutcome(row.patient_id, row.item_id, str(row.path), row.row, "failed")
    try:
        store = open_store(store_path, "a")
        fp = source_fingerprint(row.path)
        key = (spec.modality, spec.encoder_id, row.patient_id, row.item_id)
        if not force and store.is_cached(*key, fingerprint=fp):
            out.status = "cached"
            return out
        with item_lock(store_path, *key) as held:
            if not held:
                out.status, out.reason = "locked", "another live process is writing this item"
                return out
            if not force and store.is_cached(*key, fingerprint=fp):  # finished by another process meanwhile
                out.status = "cached"
                return out
            fault("item.locked")
            extractor = spec.build()
            if not store.encoder_attrs(spec.modality, spec.encoder_id):
                store.set_encoder_attrs(spec.modality, spec.encoder_id, extractor.encoder_attrs())
            result = extractor.extract(row, _with_fault_point(progress))
            attrs = {**extractor.encoder_attrs(), **result.attrs, "source_fingerprint": fp,
                     "mmcli_version": __version__}
            if result.warnings:
                attrs["warnings"] = list(result.warnings)
            store.write_item(*key, result.features, result.coords, attrs)
            fault("item.written")
            out.status, out.n, out.warnings = "done", int(result.features.shape[0]), list(result.warnings)
        fault("item.after")
    except FileNotFoundError as e:
        out.status, out.reason = "missing", f"file not found: {e.filename or row.path}"
    except ItemError as e:
        out.reason = str(e)
    except Exception as e:  # noqa: BLE001 - one bad item must never kill a cohort run
        out.reason = f"{type(e).__name__}: {e}"
        out.warnings.append(traceback.format_exc(limit=3))
    finally:
        out.seconds = time.perf_counter() - t0
    return out


def _with_fault_point(progress: ProgressFn | None) -> ProgressFn:
    """The extractor's progress callback, with the ``item.progress`` fault point between units of work."""

    def report(done: int, total: int) -> None:
        if 0 < done < total:
            fault("item.progress")
        if progress is not None:
            progress(done, total)

    return report


def _dask_task(spec: ExtractorSpec, row: ManifestRow, store_path: str, force: bool) -> ItemOutcome:
    return process_item(spec, row, store_path, force)


# ---- a cohort ---------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    modality: str
    encoder_id: str
    store: str
    outcomes: list[ItemOutcome]
    seconds: float
    scheduler: str
    record_path: str = ""

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def problems(self) -> list[ItemOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "missing")]

    @property
    def exit_code(self) -> int:
        """0 when every item is done or cached (or held by another live writer), else 1."""
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            done=self.count("done"), cached=self.count("cached"), failed=self.count("failed"),
            missing=self.count("missing"), locked=self.count("locked"), exit_code=self.exit_code,
            mmcli_version=__version__, finished=_now(),
        )
        return d


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_extraction(
    rows: list[ManifestRow],
    spec: ExtractorSpec,
    store_path: str | Path,
    *,
    force: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    missing: list[ManifestRow] | None = None,
    progress: bool = True,
    unit: str = "item",
) -> RunSummary:
    """Run ``spec`` over ``rows`` and write each item to the store.

    ``scheduler``: None runs in this process; ``"local"`` starts a dask LocalCluster (``workers`` processes,
    default: one per core); any other value is a dask scheduler address (``tcp://host:8786``) or scheduler file
    (see :func:`connect`). A task whose worker dies is rescheduled by dask on another worker (up to
    ``distributed.scheduler.allowed-failures`` times); the dead worker's item lock is then cleared as stale.
    Rows whose file is missing (``missing``) are reported as such and not attempted.
    """
    store_path = str(store_path)
    open_store(store_path, "a").clear_stale_staging()  # create / validate before any work; drop dead writers' staging
    t0 = time.perf_counter()
    outcomes = [
        ItemOutcome(r.patient_id, r.item_id, str(r.path), r.row, "missing", "file not found") for r in missing or []
    ]
    from mmcli.pipeline.progress import CohortProgress

    with CohortProgress(len(rows), f"{spec.modality} [{spec.encoder_id}]", unit, enabled=progress) as bar:
        if scheduler:
            outcomes += _run_dask(rows, spec, store_path, force, scheduler, workers, bar)
        else:
            for row in rows:
                with bar.item(f"{row.patient_id}/{row.item_id}") as item_progress:
                    o = process_item(spec, row, store_path, force, item_progress)
                bar.advance(o)
                outcomes.append(o)
    summary = RunSummary(spec.modality, spec.encoder_id, store_path, outcomes, time.perf_counter() - t0,
                         scheduler or "in-process")
    summary.record_path = str(write_run_record(summary))
    return summary


def connect(scheduler: str, workers: int | None = None) -> tuple[Any, Any]:
    """(client, cluster or None) for ``scheduler``: ``"local"`` (a LocalCluster of ``workers`` processes), a
    scheduler address (``tcp://host:8786``) or the JSON file that ``dask scheduler --scheduler-file`` wrote."""
    from distributed import Client, LocalCluster

    if scheduler == "local":
        n = workers or os.cpu_count() or 1
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    as_file = scheduler.endswith(".json") or "://" not in scheduler and Path(scheduler).is_file()
    try:
        client = Client(scheduler_file=scheduler) if as_file else Client(scheduler)
    except (OSError, TimeoutError, ValueError) as e:
        raise InputError(f"--scheduler {scheduler}: cannot reach a dask scheduler ({type(e).__name__}: {e}). "
                         "Fix: start one (`dask scheduler`), check the address (tcp://HOST:PORT) or the "
                         "scheduler file, or use --scheduler local.") from e
    return client, None


def _run_dask(rows, spec, store_path, force, scheduler, workers, bar) -> list[ItemOutcome]:
    from distributed import as_completed

    # workers of a remote cluster run in their own working directory: give them absolute paths
    store_path = os.path.abspath(store_path)
    rows = [replace(r, path=r.path.absolute()) for r in rows]
    client, cluster = connect(scheduler, workers)
    try:
        futures = [
            client.submit(_dask_task, spec, row, store_path, force, key=f"mmcli-{spec.encoder_id}-{row.patient_id}"
                          f"-{row.item_id}-{time.time_ns()}", retries=2, pure=False)
            for row in rows
        ]
        by_future = dict(zip(futures, rows))
        outcomes = []
        for fut in as_completed(futures):
            row = by_future[fut]
            try:
                o = fut.result()
            except Exception as e:  # noqa: BLE001 - a lost worker after retries: report the item
                o = ItemOutcome(row.patient_id, row.item_id, str(row.path), row.row, "failed",
                                f"dask task failed: {type(e).__name__}: {e}")
            bar.advance(o)
            outcomes.append(o)
        order = {(r.patient_id, r.item_id): i for i, r in enumerate(rows)}
        return sorted(outcomes, key=lambda o: order[(o.patient_id, o.item_id)])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def write_run_record(summary: RunSummary) -> Path:
    """JSON record of the run beside the store: ``<store>.runs/extract-<modality>-<time>.json``."""
    p = Path(summary.store)
    runs = p.with_name(p.name + ".runs")
    runs.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    path = runs / f"extract-{summary.modality}-{stamp}-{os.getpid()}.json"
    path.write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    return path
