"""Fault injection for the crash, concurrency, signal and disk-full tests: make this process die, freeze, get a
signal or hit a full disk at a named point, the way the OOM killer, a pre-empted cluster job, a lost node, a
user's Ctrl-C or a filling disk would.

``MMCLI_FAULT`` holds comma-separated ``POINT[:N[:ACTION]]`` entries: the N-th time (default 1) this process
reaches POINT it performs ACTION on itself:

* ``kill`` (default): ``SIGKILL`` -- no cleanup handler, ``finally`` block or atexit hook runs;
* ``stop``: ``SIGSTOP`` -- the process freezes holding whatever it holds (item lock, open files) until it
  gets ``SIGCONT``; a test uses it to keep a live writer in the middle of an item;
* ``term`` / ``int``: ``SIGTERM`` / ``SIGINT`` -- what a batch scheduler's pre-emption or a Ctrl-C sends; the
  process's own handlers run (graceful stop);
* ``enospc``: raise ``OSError(ENOSPC)`` right there, as a write to a full disk would;
* ``erofs``: raise ``OSError(EROFS)`` right there, as a write to a read-only mount would.

Points (``POINTS``): where the runner and the store call :func:`fault`. With ``MMCLI_FAULT`` unset (always,
outside tests) :func:`fault` is one environment lookup. Hand-written because no Python library offers
process-level fail points that survive into subprocesses and dask workers through the environment.

Example: ``MMCLI_FAULT=store.staged:3 mmcli extract ...`` dies inside the third item write, after the
arrays are staged and before the item is moved into place.

``MMCLI_FAULT_ONCE=FILE`` makes the fault fire at most once over all processes that share the environment: only
the process that creates FILE (``O_EXCL``; it writes its PID there) acts. A dask nanny restarts a killed worker
with the same environment; without this its every restart would die again.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter

ENV = "MMCLI_FAULT"
ONCE_ENV = "MMCLI_FAULT_ONCE"
POINTS = {
    "item.locked": "runner: the item's lock is held, before its extractor runs",
    "item.progress": "runner: inside an item, after some but not all of its work (WSI: between tile batches)",
    "store.staged": "store: an item's arrays and attrs are written to staging, not yet moved into place",
    "item.written": "runner: the item is complete in the store, its lock not yet released",
    "item.after": "runner: the item is finished and its lock released (between two items)",
    "run.model": "fit: the final model is saved into the run's staging folder, before its config is written",
    "run.staged": "fit: the whole new run is in its staging folder, not yet swapped in for --out",
    "lock.created": "locks: a lock's file (or its temporary file) is created, its content not yet written",
    "cv.fold": "fit: a fold starts (in the process or dask worker that runs it)",
}
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "int": signal.SIGINT,
           "enospc": None, "erofs": None}
_ERRNO = {"enospc": (errno.ENOSPC, "No space left on device"), "erofs": (errno.EROFS, "Read-only file system")}

_hits: Counter[str] = Counter()
_lock = threading.Lock()


def parse(spec: str) -> dict[str, tuple[int, str]]:
    """``"item.after:2,store.staged"`` -> ``{"item.after": (2, "kill"), "store.staged": (1, "kill")}``."""
    out: dict[str, tuple[int, str]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, _, rest = entry.partition(":")
        nth, _, action = rest.partition(":")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown point {point!r}; points are {sorted(POINTS)}")
        action = action or "kill"
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action {action!r}; actions are {sorted(ACTIONS)}")
        n = int(nth or 1)
        if n < 1:
            raise ValueError(f"{ENV}: N must be >= 1 in {entry!r}")
        out[point] = (n, action)
    return out


def fault(point: str) -> None:
    """Count a visit to ``point`` and act if ``MMCLI_FAULT`` asks for it on this visit; else nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want = parse(spec).get(point)
    if want is None:
        return
    with _lock:
        _hits[point] += 1
        hit = _hits[point] == want[0]
    if hit and _claim_once():
        sig = ACTIONS[want[1]]
        if sig is None:
            code, text = _ERRNO[want[1]]
            raise OSError(code, f"{text} (injected by {ENV} at {point})")
        os.kill(os.getpid(), sig)


def _claim_once() -> bool:
    """True unless ``MMCLI_FAULT_ONCE`` names a file that another (or this) process already created."""
    token = os.environ.get(ONCE_ENV)
    if not token:
        return True
    try:
        fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True
