"""An exclusive lock file that names its holder, for writers that must not run twice at once (``fit --out``).

The lock is a small JSON file ``{"pid", "host", "started", "command", "token"}`` -- the format of the store's
per-item locks (:mod:`mmcli.features.runner`). It is created complete in one step (written under a temporary
name, then hard-linked onto the lock path, which fails if the lock exists), so a reader never sees an empty
lock. A lock left by a dead process on this host (:func:`mmcli.pipeline.store.pid_alive`) is stale and
cleared; a lock of another host is honoured (only that host can tell whether its writer still runs).
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import MmcliError
from mmcli.pipeline.store import pid_alive

STALE_UNREADABLE_S = 60.0  # a lock whose content cannot be read is taken over after this age


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
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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


class PidLock:
    """``with PidLock(path, "mmcli fit"):`` holds ``path`` or raises :class:`LockHeld` naming the live holder.

    Errors creating the lock file (an unwritable folder) propagate as ``OSError``; the caller words them.
    """

    def __init__(self, path: str | Path, command: str = "mmcli") -> None:
        self.path = Path(path)
        self.command = command
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> PidLock:
        token = uuid.uuid4().hex
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": self.command,
               "token": token}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{token}.tmp")
        tmp.write_text(json.dumps(doc))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    other = _read(self.path)
                    if other == {}:  # released meanwhile
                        continue
                    if _is_stale(self.path, other):
                        self.path.unlink(missing_ok=True)
                        continue
                    raise LockHeld(self.path, _holder(other)) from None
                self._token = token
                return self
            raise LockHeld(self.path, _holder(_read(self.path)))
        finally:
            tmp.unlink(missing_ok=True)

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
