"""File-system helpers of the backends: staging names that tell a live writer's leftovers from a dead one's,
removal that never follows a link, and the ``flock`` that serialises metadata and HDF5 writes."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from mmcli.pipeline.locks import pid_alive


def remove_path(p: Path) -> None:
    """Remove a file, link (not its target) or folder tree."""
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def stage_name(kind: str = "") -> str:
    """``[kind]<uuid>.<pid>.<host>``: unique, and names its writer so leftovers of dead writers can be found."""
    return f"{kind}{uuid.uuid4().hex}.{os.getpid()}.{socket.gethostname()}"


def stage_owner(name: str) -> str:
    """``live`` / ``dead``: the staging entry's writer runs on this host / is gone; ``unknown``: another host
    or an unnamed entry (only its age can tell)."""
    _, _, rest = name.partition(".")
    pid, _, host = rest.partition(".")
    if not pid.isdigit() or host != socket.gethostname():
        return "unknown"
    return "live" if pid_alive(int(pid)) else "dead"


@contextlib.contextmanager
def flock(lock_path: Path, exclusive: bool) -> Iterator[None]:
    """Hold an exclusive (writers) or shared (readers) ``flock`` on ``lock_path`` for the block."""
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
