"""Concurrent writers on one store, the way people shard a cohort over jobs: per-item locks (PID, host, start
time), no global lock, every item written exactly once, stale locks of dead processes cleared, live ones
honoured."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from helpers.wsi_runs import (
    COHORT_SIZE,
    assert_same_items,
    child_env,
    done_items,
    extract_cmd,
    extract_in_process,
    items,
    lock_files,
    record_of,
    verify_cli,
    wait_stopped,
)
from mmcli.features.runner import lock_dir

pytestmark = pytest.mark.slow  # several real extract processes per test

N = COHORT_SIZE
ALL = {(f"P{i}", "a") for i in range(N)}


@pytest.fixture(scope="module")
def cohort(wsi_cohort: Path, wsi_clean_store: Path) -> Path:
    """The session's 5-slide cohort with ``clean.zarr`` beside it (tests/conftest.py); read only."""
    return wsi_cohort


@pytest.fixture(scope="module")
def clean(wsi_clean: Mapping) -> Mapping:
    """Items of the session's clean extraction (the reference)."""
    return wsi_clean


def _end(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
        p.kill()
        p.wait()


def test_a_live_writer_holds_only_its_own_item(cohort: Path, clean: dict, tmp_path: Path) -> None:
    """Writer A freezes in the middle of slide P0 (holding its lock). Writer B, on the same store and manifest,
    honours that lock (status locked, not failed) and writes every other slide while A is still running: no
    global lock. A then resumes, finishes P0 and finds the rest cached."""
    store = tmp_path / "s.zarr"
    a = subprocess.Popen(extract_cmd(cohort, store), env=child_env(MMCLI_FAULT="item.progress:1:stop"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(a)
        (lock,) = lock_files(store)
        assert lock == lock_dir(store) / "wsi" / lock.parent.parent.name / "P0" / "a.lock"
        held = json.loads(lock.read_text())
        assert held["pid"] == a.pid and held["host"] == socket.gethostname()
        assert abs(dt.datetime.fromisoformat(held["started"]) - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(
            hours=1)

        b = extract_in_process(cohort, store)  # the second writer: this test process
        assert b.exit_code == 0, b.output
        rb = record_of(b.stdout)
        assert done_items(rb) == ALL - {("P0", "a")} and done_items(rb, "locked") == {("P0", "a")}
        assert rb["failed"] == 0 and "locked: P0/a: another live process is writing this item" in b.stdout
        assert sorted(items(store)) == sorted(ALL - {("P0", "a")})  # written while A is alive, mid-run

        os.kill(a.pid, signal.SIGCONT)
        out, err = a.communicate(timeout=300)
        assert a.returncode == 0, out + err
    finally:
        _end(a)
    ra = record_of(out)
    assert done_items(ra) == {("P0", "a")} and done_items(ra, "cached") == ALL - {("P0", "a")}
    # every item written exactly once, by one of the two writers
    assert not done_items(ra) & done_items(rb) and done_items(ra) | done_items(rb) == ALL
    assert verify_cli(store).exit_code == 0
    assert_same_items(items(store), clean)
    assert lock_files(store) == []


def test_two_writers_started_together(cohort: Path, clean: dict, tmp_path: Path) -> None:
    """Two ``mmcli extract`` processes on one store at once, free to race: each item is written by exactly one
    of them (the other finds it locked or cached) and the store is consistent."""
    store = tmp_path / "s.zarr"
    procs = [subprocess.Popen(extract_cmd(cohort, store), env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            _end(p)
    assert [p.returncode for p in procs] == [0, 0], outs
    recs = [record_of(out) for out, _ in outs]
    done = [done_items(r) for r in recs]
    assert not done[0] & done[1] and done[0] | done[1] == ALL
    for r in recs:
        assert r["failed"] == 0 and r["done"] + r["cached"] + r["locked"] == N
    assert verify_cli(store).exit_code == 0
    assert_same_items(items(store), clean)
    assert lock_files(store) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_and_foreign_locks(cohort: Path, clean: dict, tmp_path: Path) -> None:
    """A lock of a dead process on this host (and an empty lock file older than a minute) is cleared and its
    item extracted; a lock from another host is honoured (that host may still be writing)."""
    store = tmp_path / "s.zarr"
    enc = next(d for d in (cohort.parent / "clean.zarr" / "wsi").iterdir() if d.is_dir()).name
    base = lock_dir(store) / "wsi" / enc
    for pid in ("P1", "P2", "P3"):
        (base / pid).mkdir(parents=True)
    dead = base / "P1" / "a.lock"
    dead.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00"}))
    foreign = base / "P2" / "a.lock"
    foreign.write_text(json.dumps({"pid": os.getpid(), "host": "another-node", "started": "2020-01-01T00:00:00"}))
    empty = base / "P3" / "a.lock"  # a writer killed between creating its lock file and writing it
    empty.write_text("")
    os.utime(empty, (time.time() - 120, time.time() - 120))

    r = extract_in_process(cohort, store)
    assert r.exit_code == 0, r.output  # an item locked by another writer is not a failure
    rec = record_of(r.stdout)
    assert done_items(rec) == ALL - {("P2", "a")} and done_items(rec, "locked") == {("P2", "a")}
    assert not dead.exists() and not empty.exists() and foreign.exists()
    assert sorted(items(store)) == sorted(ALL - {("P2", "a")})

    foreign.unlink()  # that host is known to be gone: its lock is removed by hand, as the README says
    r2 = extract_in_process(cohort, store)
    rec2 = record_of(r2.stdout)
    assert r2.exit_code == 0 and done_items(rec2) == {("P2", "a")} and rec2["cached"] == N - 1
    assert_same_items(items(store), clean)
