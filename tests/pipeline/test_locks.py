"""The one lock file of mmcli (:mod:`mmcli.pipeline.locks`): run folders and store items share its format, a
failed write leaves nothing behind, and file systems without hard links still get an exclusive lock."""
from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from mmcli.features.runner import item_lock, lock_dir
from mmcli.pipeline import faults
from mmcli.pipeline.locks import LockHeld, PidLock, pid_alive

FORMAT = {"pid", "host", "started", "command", "token"}


@pytest.fixture
def fault_env(monkeypatch: pytest.MonkeyPatch):
    def set_fault(spec: str) -> None:
        faults._hits.clear()
        monkeypatch.setenv(faults.ENV, spec)

    yield set_fault
    faults._hits.clear()


def test_item_locks_and_run_locks_have_one_format(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    with item_lock(store, "wsi", "enc", "P0", "a") as held:
        assert held
        doc = json.loads((lock_dir(store) / "wsi" / "enc" / "P0" / "a.lock").read_text())
    with PidLock(tmp_path / ".run.lock", "mmcli fit"):
        run = json.loads((tmp_path / ".run.lock").read_text())
    assert set(doc) == set(run) == FORMAT
    assert doc["pid"] == os.getpid() and doc["host"] == socket.gethostname() and doc["command"] == "mmcli extract"
    assert doc["started"].endswith("+00:00")  # UTC, ISO 8601
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("action", ["enospc", "erofs"])
def test_a_failed_write_leaves_neither_lock_nor_temporary_file(tmp_path: Path, fault_env, action: str) -> None:
    """The lock's temporary file is created, then writing it fails (a full disk, a read-only file system): the
    error reaches the caller and nothing is left (before: ``.run.lock.<token>.tmp`` stayed)."""
    fault_env(f"lock.created:1:{action}")
    with pytest.raises(OSError) as e:
        PidLock(tmp_path / ".run.lock").acquire()
    assert e.value.errno == (errno.ENOSPC if action == "enospc" else errno.EROFS)
    assert list(tmp_path.iterdir()) == []


def test_without_hard_links_the_lock_is_still_exclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # what a file system without hard links says

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "x.lock"
    with PidLock(path, "one") as lock:
        assert lock.held and json.loads(path.read_text())["command"] == "one"
        assert not PidLock(path, "two").try_acquire()
        with pytest.raises(LockHeld, match=r"held by one \(pid"):
            PidLock(path).acquire()
    assert list(tmp_path.iterdir()) == []
    path.write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))  # a dead writer's lock
    assert not pid_alive(2**22 + 7) and PidLock(path).try_acquire()
