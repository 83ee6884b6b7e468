"""Crash safety: ``mmcli extract`` really killed with SIGKILL (``MMCLI_FAULT``, see mmcli.pipeline.faults) in the
middle of a slide, between slides and inside a store write; the re-run redoes only the unfinished slides,
``mmcli store verify`` passes, and every item equals the item of a clean run (same coords, same features)."""
from __future__ import annotations

import json
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from helpers.wsi_runs import (
    COHORT_SIZE,
    assert_same_items,
    extract_in_process,
    extract_subprocess,
    items,
    lock_files,
    record_of,
    verify_cli,
)
from mmcli.pipeline.faults import POINTS, parse
from mmcli.pipeline.locks import pid_alive
from mmcli.pipeline.store import open_store

N = COHORT_SIZE


@pytest.fixture(scope="module")
def cohort(wsi_cohort: Path) -> Path:
    """The session's 5-slide cohort (tests/conftest.py), shared: every test extracts into its own tmp_path."""
    return wsi_cohort


@pytest.fixture(scope="module")
def clean(wsi_clean: Mapping) -> Mapping:
    """Items of an uninterrupted run (the reference): the session's clean extraction (tests/conftest.py)."""
    assert len(wsi_clean) == N and all(f.shape == (18, 96) for f, _, _ in wsi_clean.values())
    return wsi_clean


@pytest.mark.slow
@pytest.mark.parametrize("backend,fault,where", [
    ("zarr", "item.progress:3", "mid-slide"),      # 2nd slide, after its first tile batch
    ("zarr", "item.after:2", "between slides"),    # 2 slides finished, the 3rd not started
    ("zarr", "store.staged:3", "store write"),     # 3rd slide's arrays staged, not yet moved into place
    ("hdf5", "item.after:2", "between slides"),
    ("hdf5", "item.progress:3", "mid-slide"),
])
def test_sigkill_then_rerun_equals_clean_run(cohort: Path, clean: dict, tmp_path: Path, backend: str, fault: str,
                                             where: str) -> None:
    store = tmp_path / ("s.zarr" if backend == "zarr" else "s.h5")
    killed = extract_subprocess(cohort, store, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "run record" not in killed.stdout  # it died before its summary

    # what the killed run left: only whole items are visible; the slide it was on is not among them
    before = items(store)
    assert_same_items(before, {k: clean[k] for k in before})
    if where == "between slides":
        assert sorted(before) == [("P0", "a"), ("P1", "a")] and lock_files(store) == []
    else:
        assert len(before) == (1 if where == "mid-slide" else 2)
        # it died holding the lock of the slide it was working on: pid, host and start time of a dead process
        (lock,) = lock_files(store)
        held = json.loads(lock.read_text())
        assert set(held) == {"pid", "host", "started", "command", "token"} and held["pid"] == killed.pid
        assert held["host"] == socket.gethostname() and not pid_alive(killed.pid)
        assert (lock.parent.name, lock.stem) not in before
    leftovers = verify_cli(store)
    if where == "store write":  # the staged arrays of the dead writer are reported, never read as an item
        assert leftovers.exit_code == 1 and f".{killed.pid}.{socket.gethostname()}" in leftovers.stdout
        assert "staging data left by an interrupted writer" in leftovers.stdout
    else:
        assert leftovers.exit_code == 0, leftovers.stdout

    # the re-run does exactly the unfinished slides (clearing the dead writer's lock and staging)
    rerun = extract_in_process(cohort, store)
    assert rerun.exit_code == 0, rerun.output
    rec = record_of(rerun.stdout)
    assert (rec["done"], rec["cached"], rec["failed"], rec["locked"]) == (N - len(before), len(before), 0, 0)
    assert {(o["patient_id"], o["item_id"]) for o in rec["outcomes"] if o["status"] == "cached"} == set(before)
    ok = verify_cli(store)
    assert ok.exit_code == 0 and ok.stdout.strip().endswith(": ok"), ok.stdout
    assert_same_items(items(store), clean)
    assert lock_files(store) == []
    if backend == "zarr":
        assert not any((store / ".staging").iterdir())


@pytest.mark.slow
def test_a_second_crash_during_the_resume_is_also_recovered(cohort: Path, clean: dict, tmp_path: Path) -> None:
    """Killed mid-slide, then the resume killed inside a store write: the third run still finishes the cohort."""
    store = tmp_path / "s.zarr"
    assert extract_subprocess(cohort, store, "item.progress:1").returncode == -signal.SIGKILL
    assert extract_subprocess(cohort, store, "store.staged:2").returncode == -signal.SIGKILL
    assert len(items(store)) == 1  # the second run wrote P0 and died writing P1
    rerun = extract_in_process(cohort, store)
    assert rerun.exit_code == 0 and record_of(rerun.stdout)["done"] == N - 1
    assert verify_cli(store).exit_code == 0
    assert_same_items(items(store), clean)
    assert open_store(store, "r").verify() == []


def test_fault_spec_parsing() -> None:
    assert parse("item.after:2,store.staged") == {"item.after": (2, "kill"), "store.staged": (1, "kill")}
    assert parse("item.progress:1:stop") == {"item.progress": (1, "stop")}
    assert parse("") == {}
    for bad in ("nowhere:1", "item.after:0", "item.after:1:explode", "item.after:x"):
        with pytest.raises(ValueError):
            parse(bad)
    # the extraction points, fit's two (run.model, run.staged: see tests/stages/test_fit_faults.py), the lock
    # files' (lock.created: tests/pipeline/test_locks.py) and a fold's (cv.fold: tests/heads/training/test_cv_dask.py)
    assert {"item.locked", "item.progress", "store.staged", "item.written", "item.after", "run.model",
            "run.staged", "lock.created", "cv.fold"} == set(POINTS)
    assert parse("store.staged:1:erofs") == {"store.staged": (1, "erofs")}


def test_fault_once_token_fires_in_one_process_only(tmp_path: Path) -> None:
    """``MMCLI_FAULT_ONCE``: of several processes with the same fault (a nanny's restarted worker, a second
    worker), only the first to reach the point dies; it leaves its pid in the token file."""
    import os
    import subprocess

    env = {**os.environ, "MMCLI_FAULT": "item.after:1", "MMCLI_FAULT_ONCE": str(tmp_path / "token")}
    code = "from mmcli.pipeline.faults import fault; fault('item.after'); print('survived')"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == -signal.SIGKILL and second.returncode == 0 and "survived" in second.stdout
    assert (tmp_path / "token").read_text().isdigit()
