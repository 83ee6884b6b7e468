"""The one lock-file implementation of mmcli: an exclusive lock that names its holder.

Used for the run folder of ``fit --out`` (``.<name>.lock`` beside it, :mod:`mmcli.pipeline.rundir`) and for
every item of a stage-1 run (``<store>.locks/<modality>/<encoder_id>/<patient_id>/<item_id>.lock``,
:mod:`mmcli.features.runner`), so both have the same format: a small JSON file ``{"pid", "host", "started",
"command", "token"}`` (``started``: UTC, ISO 8601).

A lock is created complete in one step: written under a temporary name, then hard-linked onto the lock path
(which fails if the lock exists), so a reader never sees an empty lock; where the file system has no hard
links it is created with ``O_EXCL`` and written at once. A failed write (a full disk) leaves neither the lock
nor its temporary file. A lock left by a dead process on this host (:func:`pid_alive`) is stale and cleared; a
lock of another host is honoured (only that host can tell whether its writer still runs); a lock whose content
cannot be read is taken over once it is older than :data:`STALE_UNREADABLE_S`.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import MmcliError
from mmcli.pipeline.faults import fault

STALE_UNREADABLE_S = 60.0  # a lock whose content cannot be read is taken over after this age
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` runs on this host (it may belong to another user). A zombie (dead, not yet
    reaped by its parent, e.g. a killed dask worker before its nanny notices) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a valid pid at all
        return False
    try:  # Linux: field 3 of /proc/<pid>/stat is the state; the name before it may hold spaces and ')'
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"{self.command or 'mmcli'} (pid {self.pid} on {self.host}, started {self.started})"


class LockHeld(MmcliError):  # noqa: N818 - a state, raised to the caller that maps it to its own message
    """The lock is held by another live process (``holder``)."""

    def __init__(self, path: Path, holder: Holder) -> None:
        super().__init__(f"{path}: held by {holder.describe()}")
        self.path = path
        self.holder = holder


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content; None when it cannot be read or parsed; {} when it vanished meanwhile."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_stale(path: Path, doc: dict[str, Any] | None) -> bool:
    if doc is None:
        try:
            return time.time() - path.stat().st_mtime > STALE_UNREADABLE_S
        except FileNotFoundError:
            return True
    if doc.get("host") != socket.gethostname():
        return False
    try:
        pid = int(doc.get("pid", -1))
    except (TypeError, ValueError):
        return True
    return not pid_alive(pid)


def _holder(doc: dict[str, Any] | None) -> Holder:
    """The holder a lock file names (unknown fields as ``?`` / -1: a lock being written, or damaged)."""
    doc = doc or {}
    try:
        pid = int(doc.get("pid", -1))
    except (TypeError, ValueError):
        pid = -1
    return Holder(pid, str(doc.get("host", "?")), str(doc.get("started", "?")), str(doc.get("command", "")))


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``; on any error nothing is left behind."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        fault("lock.created")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


class PidLock:
    """``with PidLock(path, "mmcli fit"):`` holds ``path`` or raises :class:`LockHeld` naming the live holder;
    :meth:`try_acquire` returns False instead of raising.

    Errors creating the lock file (an unwritable folder, a full disk) propagate as ``OSError``; the caller words
    them.
    """

    def __init__(self, path: str | Path, command: str = "mmcli") -> None:
        self.path = Path(path)
        self.command = command
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> PidLock:
        if not self.try_acquire():
            raise LockHeld(self.path, _holder(_read(self.path)))
        return self

    def try_acquire(self) -> bool:
        """Take the lock: True when held now, False when another live process holds it."""
        token = uuid.uuid4().hex
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": self.command,
               "token": token}
        data = json.dumps(doc).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{token}.tmp")
        _write_new(tmp, data)
        try:
            for _ in range(3):
                try:
                    self._link(tmp, data)
                except FileExistsError:
                    other = _read(self.path)
                    if other == {}:  # released meanwhile
                        continue
                    if _is_stale(self.path, other):
                        self.path.unlink(missing_ok=True)
                        continue
                    return False
                self._token = token
                return True
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _link(self, tmp: Path, data: bytes) -> None:
        try:
            os.link(tmp, self.path)
        except OSError as e:
            if isinstance(e, FileExistsError) or e.errno not in _NO_HARD_LINKS:
                raise
            _write_new(self.path, data)  # no hard links here: O_EXCL, written at once

    def release(self) -> None:
        """Remove the lock if it is still ours (never another writer's that took over a stale one)."""
        if self._token is None:
            return
        doc = _read(self.path)
        if doc and doc.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        self._token = None

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
