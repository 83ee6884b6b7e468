"""The stage-1 item runner shared by every modality: cache check, per-item locks, per-item failure isolation,
in-process or dask.distributed execution, progress, run summary and run record.

An :class:`ExtractorSpec` is a small picklable recipe (``target`` + kwargs) that builds an :class:`ItemExtractor`
once per process (so each dask worker loads its encoder once). Items are written to the store by whoever
extracted them, atomically, under a per-item lock file (PID, host, start time) so that several processes can
share one store without a global lock.

A run stops early, cleanly, on the first full disk (ENOSPC) and on SIGINT / SIGTERM: the item in flight is
abandoned (never half-written: the store writes atomically) or finished, its lock released, the items not yet
started are listed as ``skipped``, and the summary and run record are still written. The exit code is 1 for a full
disk and 128 + the signal number (130 / 143) for a signal.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import signal
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
from mmcli.pipeline.errors import DiskFullError, ItemError, ItemInterrupted
from mmcli.pipeline.faults import fault
from mmcli.pipeline.fingerprint import source_fingerprint
from mmcli.pipeline.io import disk_full_message, is_disk_full, is_read_only, write_json
from mmcli.pipeline.locks import PidLock
from mmcli.pipeline.manifest import ManifestRow, file_problem
from mmcli.pipeline.scale import connect
from mmcli.pipeline.store import open_store

ProgressFn = Callable[[int, int], None]  # (done, total) units of work inside one item, e.g. tiles


@dataclass
class ItemResult:
    """What an extractor returns for one manifest row."""

    features: np.ndarray
    coords: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # counts for the run record (e.g. tiles removed by QC)


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

    def prefetch(self, row: ManifestRow) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Hint: ``row`` is extracted next in this process; an extractor may start reading it in the background."""


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

    A :class:`~mmcli.pipeline.locks.PidLock` (the one lock of mmcli: PID, host, start, command): a lock left by a
    dead process on this host is stale and cleared (as TRIDENT does); locks from other hosts are honoured (remove
    them by hand, ``<store>.locks``, if that host is gone).
    """
    lock = PidLock(lock_dir(store_path) / modality / encoder_id / patient_id / f"{item_id}.lock", "mmcli extract")
    held = lock.try_acquire()
    try:
        yield held
    finally:
        lock.release()


# ---- stopping a run early: signals and a full disk ----------------------------------------------------------
class RunControl:
    """Stop requests of one run. The first SIGINT/SIGTERM asks the item in flight to stop at its next unit of
    work (a tile batch) and no new item to start; a second one abandons the item at once."""

    def __init__(self) -> None:
        self.signum = 0
        self.in_item = False

    @property
    def stopping(self) -> bool:
        return self.signum != 0

    def request(self, signum: int, frame: object = None) -> None:
        repeat = self.signum != 0
        self.signum = self.signum or signum
        if repeat and self.in_item:
            raise ItemInterrupted(signal.Signals(signum).name)

    def check(self) -> None:
        """Called between units of work inside an item."""
        if self.signum and self.in_item:
            raise ItemInterrupted(signal.Signals(self.signum).name)

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM call :meth:`request` while the block runs (main thread only: elsewhere Python
        cannot install handlers and the defaults stay)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextmanager
    def item(self) -> Iterator[None]:
        self.in_item = True
        try:
            yield
        finally:
            self.in_item = False


def _disk_full_path(e: BaseException, store_path: str) -> str:
    """The file that could not be written, or the store when it was a store write (staging paths say nothing)."""
    store = os.path.abspath(store_path)
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.filename:
            name = os.path.abspath(str(x.filename))
            return store_path if name == store or name.startswith(store + os.sep) else str(x.filename)
    return store_path


# ---- one item ---------------------------------------------------------------------------------------------
STATUSES = ("done", "cached", "failed", "missing", "locked", "interrupted", "skipped")


@dataclass
class ItemOutcome:
    """What happened to one manifest row. ``status``: done | cached | failed | missing | locked | interrupted
    (abandoned unwritten when the run was stopped) | skipped (not attempted: the run stopped before it)."""

    patient_id: str
    item_id: str
    path: str
    row: int
    status: str
    reason: str = ""
    n: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    nbytes: int = 0  # bytes of the arrays written (or meant to be written): sizes the disk-full estimate
    disk_full: str = ""  # the path that hit a full disk ("" when none)
    read_only: str = ""  # the path that could not be written: a read-only file system ("" when none)
    record: dict[str, Any] = field(default_factory=dict)  # the extractor's counts (ItemResult.record)


def process_item(
    spec: ExtractorSpec,
    row: ManifestRow,
    store_path: str,
    force: bool = False,
    progress: ProgressFn | None = None,
    control: RunControl | None = None,
) -> ItemOutcome:
    """Extract one row and write it to the store; never raises for a bad item (a full disk or a read-only store
    is reported as a failed outcome with ``disk_full`` / ``read_only`` set; a stop request abandons the item as
    ``interrupted``)."""
    t0 = time.perf_counter()
    out = ItemOutcome(row.patient_id, row.item_id, str(row.path), row.row, "failed")
    ctl = control or RunControl()
    try:
        with ctl.item():
            store = open_store(store_path, "a")
            fp = source_fingerprint(row.path)
            key = (spec.modality, spec.encoder_id, row.patient_id, row.item_id)
            # the data are checked too (read whole, against their checksums): a lost or damaged chunk is redone
            if not force and store.is_cached(*key, fingerprint=fp, check_data=True):
                _restore_provenance(spec, store)
                out.status = "cached"
                return out
            with item_lock(store_path, *key) as held:
                if not held:
                    out.status, out.reason = "locked", "another live process is writing this item"
                    return out
                if not force and store.is_cached(*key, fingerprint=fp, check_data=True):  # done by another process
                    out.status = "cached"
                    return out
                fault("item.locked")
                extractor = spec.build()
                if not store.encoder_attrs(spec.modality, spec.encoder_id):
                    store.set_encoder_attrs(spec.modality, spec.encoder_id, extractor.encoder_attrs())
                result = extractor.extract(row, _with_fault_point(progress, ctl))
                out.nbytes = int(result.features.nbytes + (result.coords.nbytes if result.coords is not None else 0))
                attrs = {**extractor.encoder_attrs(), **result.attrs, "source_fingerprint": fp,
                         "mmcli_version": __version__}
                if result.warnings:
                    attrs["warnings"] = list(result.warnings)
                store.write_item(*key, result.features, result.coords, attrs)
                fault("item.written")
                out.status, out.n, out.warnings = "done", int(result.features.shape[0]), list(result.warnings)
                out.record = dict(result.record)
            fault("item.after")
    except ItemInterrupted as e:
        out.status, out.reason = "interrupted", f"stopped by {e} before it finished; not written (a re-run redoes it)"
    except FileNotFoundError as e:
        out.status, out.reason = "missing", f"file not found: {e.filename or row.path}"
    except ItemError as e:
        out.reason = str(e)
    except Exception as e:  # noqa: BLE001 - one bad item must never kill a cohort run
        if is_disk_full(e):
            out.disk_full = _disk_full_path(e, store_path)
            out.reason = disk_full_message(out.disk_full, out.nbytes or None)
        elif is_read_only(e):
            out.read_only = store_path
            out.reason = f"not written: read-only file system ({_disk_full_path(e, store_path)})"
        else:
            out.reason = f"{type(e).__name__}: {e}"
            out.warnings.append(traceback.format_exc(limit=3))
    finally:
        out.seconds = time.perf_counter() - t0
    return out


def _restore_provenance(spec: ExtractorSpec, store: Any) -> None:
    """Write the encoder's provenance again where it is missing (reset by ``store verify --repair``) although its
    items are cached: builds the extractor for it (once per process). Best effort: a store that cannot be written
    (read-only, full) keeps its cached items all the same."""
    if store.encoder_attrs(spec.modality, spec.encoder_id):
        return
    try:
        store.set_encoder_attrs(spec.modality, spec.encoder_id, spec.build().encoder_attrs())
    except OSError:
        pass


def _with_fault_point(progress: ProgressFn | None, control: RunControl | None = None) -> ProgressFn:
    """The extractor's progress callback, with the ``item.progress`` fault point and a stop check between units
    of work."""

    def report(done: int, total: int) -> None:
        if 0 < done < total:
            fault("item.progress")
        if control is not None and done < total:  # all work done: finish the item rather than waste it
            control.check()
        if progress is not None:
            progress(done, total)

    return report


def _dask_task(spec: ExtractorSpec, row: ManifestRow, store_path: str, force: bool) -> ItemOutcome:
    return process_item(spec, row, store_path, force)


# ---- a cohort ---------------------------------------------------------------------------------------------
MAX_LISTED = 20  # problems (and warnings) listed on the console; the run record holds all of them


@dataclass
class RunSummary:
    modality: str
    encoder_id: str
    store: str
    outcomes: list[ItemOutcome]
    seconds: float
    scheduler: str
    record_path: str = ""
    stopped: str = ""  # why the run stopped before its end ("" when it ran to the end)
    signal: int = 0  # the signal that stopped it (0: none)
    record_error: str = ""  # why no run record could be written
    read_only: bool = False  # stopped because the store is on a read-only file system (a usage error: exit 2)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def problems(self) -> list[ItemOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "missing")]

    @property
    def exit_code(self) -> int:
        """128 + signal when a signal stopped the run (130 SIGINT, 143 SIGTERM); 2 when the store is read-only;
        1 when a full disk stopped it or an item failed or is missing; else 0 (every item done or cached, or held
        by another live writer)."""
        if self.signal:
            return 128 + self.signal
        if self.read_only:
            return 2
        return 1 if self.problems or self.stopped else 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({s: self.count(s) for s in STATUSES})
        d.update(exit_code=self.exit_code, mmcli_version=__version__, finished=_now())
        return d

    def lines(self, max_listed: int = MAX_LISTED) -> list[str]:
        """Console summary: counts, the first ``max_listed`` problems and warnings (all of them are in the run
        record), why the run stopped, and where the run record is."""
        counts = ", ".join(f"{s} {self.count(s)}" for s in STATUSES[:5])
        extra = "".join(f", {s} {self.count(s)}" for s in STATUSES[5:] if self.count(s))
        lines = [f"{self.modality} [{self.encoder_id or 'encoder not loaded'}] -> {self.store}: {counts}{extra} "
                 f"({self.seconds:.1f}s, {self.scheduler})"]
        problems = self.problems
        for o in problems[:max_listed]:
            lines.append(f"  {o.status}: {o.patient_id}/{o.item_id} (manifest line {o.row}, {o.path}): {o.reason}")
        if len(problems) > max_listed:
            by = ", ".join(f"{s} {sum(o.status == s for o in problems)}" for s in ("failed", "missing"))
            lines.append(f"  ... {len(problems) - max_listed} more not listed ({by} in all): all "
                         f"{len(problems)} in the run record")
        notes = [f"  locked: {o.patient_id}/{o.item_id}: {o.reason}" for o in self.outcomes if o.status == "locked"]
        notes += [f"  interrupted: {o.patient_id}/{o.item_id}: {o.reason}" for o in self.outcomes
                  if o.status == "interrupted"]
        notes += [f"  warning: {o.patient_id}/{o.item_id}: {w}" for o in self.outcomes for w in o.warnings
                  if not w.startswith("Traceback")]
        lines += notes[:max_listed]
        if len(notes) > max_listed:
            lines.append(f"  ... {len(notes) - max_listed} more notes and warnings: all in the run record")
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        if self.record_path:
            lines.append(f"run record: {self.record_path}")
        else:
            lines.append(f"run record: not written ({self.record_error})")
        return lines


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _skipped(rows: list[ManifestRow], why: str) -> list[ItemOutcome]:
    return [ItemOutcome(r.patient_id, r.item_id, str(r.path), r.row, "skipped", why) for r in rows]


def run_extraction(
    rows: list[ManifestRow],
    spec: ExtractorSpec | Callable[[], ExtractorSpec],
    store_path: str | Path,
    *,
    force: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    missing: list[ManifestRow] | None = None,
    progress: bool = True,
    unit: str = "item",
    modality: str | None = None,
) -> RunSummary:
    """Run ``spec`` over ``rows`` and write each item to the store.

    ``spec`` may be a function that builds it (validating options, resolving the encoder): it is only called when
    some row's file exists, so a manifest of missing files never loads an encoder (``modality`` then names the
    modality in the summary). ``scheduler``: None runs in this process; ``"local"`` starts a dask LocalCluster
    (``workers`` processes, default: one per core); any other value is a dask scheduler address
    (``tcp://host:8786``) or scheduler file (see :func:`connect`). A task whose worker dies is rescheduled by dask
    on another worker (up to ``distributed.scheduler.allowed-failures`` times); the dead worker's item lock is
    then cleared as stale. Rows whose file is missing (``missing``) are reported as such and not attempted.

    The first full disk stops the run (the items not started are ``skipped``, ``stopped`` says
    "disk full: ..."); so does the first write refused by a read-only file system (exit 2: one message, not one
    failure per item), and SIGINT and SIGTERM (see :class:`RunControl`). Either way the summary and run record
    are written (where the disk allows) and no lock of this run is left.
    """
    store_path = str(store_path)
    t0 = time.perf_counter()
    missing = list(missing or []) + [r for r in rows if not r.path.exists()]  # checked again: before any encoder
    rows = [r for r in rows if r.path.exists()]
    outcomes = [
        ItemOutcome(r.patient_id, r.item_id, str(r.path), r.row, "missing", file_problem(r.path) or "file not found")
        for r in missing
    ]
    if rows and not isinstance(spec, ExtractorSpec):
        spec = spec()
    resolved = spec if isinstance(spec, ExtractorSpec) else None
    mod = resolved.modality if resolved else (modality or "?")
    encoder_id = resolved.encoder_id if resolved else ""
    summary = RunSummary(mod, encoder_id, store_path, outcomes, 0.0, scheduler or "in-process")
    control = RunControl()
    try:
        with control.handling_signals():
            open_store(store_path, "a").clear_stale_staging()  # create / validate; drop dead writers' staging
            if resolved is not None:
                from mmcli.pipeline.progress import CohortProgress

                with CohortProgress(len(rows), f"{mod} [{encoder_id}]", unit, enabled=progress) as bar:
                    if scheduler:
                        outcomes += _run_dask(rows, resolved, store_path, force, scheduler, workers, bar, control)
                    else:
                        outcomes += _run_local(rows, resolved, store_path, force, bar, control)
            if control.stopping:
                summary.signal = control.signum
                summary.stopped = (f"{signal.Signals(control.signum).name}: {summary.count('interrupted')} item(s) "
                                   f"abandoned unwritten, {summary.count('skipped')} not started. Fix: re-run the "
                                   "same command to resume (finished items are kept).")
    except (DiskFullError, OSError) as e:  # outside any item: creating the store, clearing staging
        if not (is_disk_full(e) or is_read_only(e)):
            raise
        summary.read_only = is_read_only(e)
        summary.stopped = _read_only_message(store_path) if summary.read_only else str(e)
        seen = {(o.patient_id, o.item_id) for o in outcomes}
        why = "read-only file system" if summary.read_only else "disk full"
        outcomes += _skipped([r for r in rows if (r.patient_id, r.item_id) not in seen], f"not started: {why}")
    full = [o for o in outcomes if o.disk_full]
    if full:
        sizes = [o.nbytes for o in outcomes if o.nbytes]
        remaining = len(full) + summary.count("skipped")
        need = int(np.mean(sizes) * remaining) if sizes else None
        summary.stopped = disk_full_message(full[0].disk_full, need)
    if any(o.read_only for o in outcomes):
        summary.read_only = True
        summary.stopped = _read_only_message(store_path)
    summary.seconds = time.perf_counter() - t0
    try:
        summary.record_path = str(write_run_record(summary))
    except (OSError, DiskFullError) as e:  # a full disk again: no record rather than half a record
        summary.record_error = str(e) if isinstance(e, DiskFullError) else f"{type(e).__name__}: {e}"
    return summary


def _run_local(rows: list[ManifestRow], spec: ExtractorSpec, store_path: str, force: bool, bar: Any,
               control: RunControl) -> list[ItemOutcome]:
    outcomes: list[ItemOutcome] = []
    for i, row in enumerate(rows):
        if control.stopping:
            return outcomes + _skipped(rows[i:], "not started: the run was stopped by a signal")
        built = _EXTRACTORS.get(spec.key())  # read the next row while this one is encoded
        if built is not None and i + 1 < len(rows):
            built.prefetch(rows[i + 1])
        with bar.item(f"{row.patient_id}/{row.item_id}") as item_progress:
            o = process_item(spec, row, store_path, force, item_progress, control)
        bar.advance(o)
        outcomes.append(o)
        if o.disk_full or o.read_only:
            return outcomes + _skipped(rows[i + 1:], _stop_note(o))
    return outcomes


def _stop_note(o: ItemOutcome) -> str:
    return "not started: the disk is full" if o.disk_full else "not started: the store is on a read-only file system"


def _read_only_message(store_path: str) -> str:
    return (f"{store_path}: read-only file system: nothing can be written there. Fix: mount it read-write or "
            "give a --store on a writable disk, then re-run (finished items are kept).")


def _run_dask(rows, spec, store_path, force, scheduler, workers, bar, control=None) -> list[ItemOutcome]:
    """Items as dask tasks. A stop (signal, full disk) cancels the tasks not finished yet: they are listed as
    ``skipped``; a task already running on a worker may still finish its item (whole, atomically)."""
    from distributed import as_completed

    control = control or RunControl()
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
        pending = set(futures)
        stop_why = ""
        for fut in as_completed(futures):
            pending.discard(fut)
            row = by_future[fut]
            try:
                o = fut.result()
            except Exception as e:  # noqa: BLE001 - a lost worker after retries: report the item
                o = ItemOutcome(row.patient_id, row.item_id, str(row.path), row.row, "failed",
                                f"dask task failed: {type(e).__name__}: {e}")
            bar.advance(o)
            outcomes.append(o)
            if o.disk_full or o.read_only:
                stop_why = _stop_note(o)
            elif control.stopping:
                stop_why = "not started: the run was stopped by a signal"
            if stop_why:
                client.cancel(list(pending))
                outcomes += _skipped([by_future[f] for f in pending], stop_why)
                break
        order = {(r.patient_id, r.item_id): i for i, r in enumerate(rows)}
        return sorted(outcomes, key=lambda o: order[(o.patient_id, o.item_id)])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def write_run_record(summary: RunSummary) -> Path:
    """JSON record of the run beside the store: ``<store>.runs/extract-<modality>-<time>.json``, written
    atomically (a full disk leaves no record rather than half of one)."""
    p = Path(summary.store)
    runs = p.with_name(p.name + ".runs")
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    path = runs / f"extract-{summary.modality}-{stamp}-{os.getpid()}.json"
    return write_json(path, summary.to_dict())
