"""Scale-out on a real cluster: ``dask scheduler`` and two ``dask worker`` processes (with nannies) on loopback,
``mmcli extract --scheduler tcp://127.0.0.1:PORT`` in a subprocess. The store equals an in-process run; a worker
SIGKILLed in the middle of a slide is restarted by its nanny, dask reruns its task elsewhere, the dead
process's item lock is cleared as stale (same host, dead pid) and the run still finishes every slide."""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from helpers.dask_cluster import cluster
from helpers.wsi_runs import (
    COHORT_SIZE,
    THREADS,
    assert_same_items,
    child_env,
    extract_cmd,
    items,
    lock_files,
    record_of,
    verify_cli,
)
from mmcli.pipeline.store import pid_alive

pytestmark = pytest.mark.slow  # a real scheduler and workers: every test here starts processes

N = COHORT_SIZE


@pytest.fixture(scope="module")
def cohort(wsi_cohort: Path) -> Path:
    """The session's 5-slide cohort (tests/conftest.py), shared: every test extracts into its own tmp_path."""
    return wsi_cohort


@pytest.fixture(scope="module")
def clean(wsi_clean: Mapping) -> Mapping:
    """Items of the session's clean in-process extraction (the reference)."""
    return wsi_clean


def _extract(manifest: Path, store: Path, scheduler: str, cwd: Path, timeout: float = 420
             ) -> subprocess.CompletedProcess:
    """``mmcli extract --scheduler`` from another folder than the workers' (relative paths must not matter)."""
    cmd = extract_cmd(manifest, store, "--scheduler", scheduler, "--torch-threads", str(THREADS))
    return subprocess.run(cmd, env=child_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cluster_run_equals_in_process_run(cohort: Path, clean: dict, tmp_path: Path) -> None:
    with cluster(tmp_path / "cluster", {}) as c:
        run = tmp_path / "job"
        run.mkdir()
        manifest = Path(os.path.relpath(cohort, run))  # relative to the client's folder, not the workers'
        r = _extract(manifest, Path("s.zarr"), c.address, cwd=run)
        assert r.returncode == 0, r.stdout + r.stderr + c.log_text()
        store = run / "s.zarr"
        rec = record_of(r.stdout.replace("run record: ", f"run record: {run}/"))
        assert (rec["done"], rec["failed"], rec["locked"], rec["scheduler"]) == (N, 0, 0, c.address)
        assert_same_items(items(store), clean)
        assert verify_cli(store).exit_code == 0 and lock_files(store) == []
        assert not (tmp_path / "cluster" / "s.zarr").exists()  # workers (cwd: cluster/) wrote the client's store

        # the scheduler file works as --scheduler too; everything is cached now
        again = _extract(cohort, store, str(c.scheduler_file), cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert record_of(again.stdout)["cached"] == N


def test_worker_killed_mid_slide_is_tolerated(cohort: Path, clean: dict, tmp_path: Path) -> None:
    """Both workers carry the fault; the token lets exactly one of them die, at its first tile batch."""
    token = tmp_path / "fault.fired"
    fault_env = {"MMCLI_FAULT": "item.progress:1", "MMCLI_FAULT_ONCE": str(token)}
    store = tmp_path / "s.zarr"
    with cluster(tmp_path / "cluster", fault_env) as c:
        r = _extract(cohort, store, c.address, cwd=tmp_path)
        logs = c.log_text()
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert token.is_file(), "no worker reached the fault point"
    dead = int(token.read_text())
    assert not pid_alive(dead) and f"Worker process {dead} was killed by signal 9" in logs, logs
    # it died holding the lock of a slide; the retry (another pid on this host) cleared the lock as stale and
    # extracted that slide: all done, none failed or left "locked"
    rec = record_of(r.stdout)
    assert (rec["done"], rec["failed"], rec["locked"], rec["missing"]) == (N, 0, 0, 0), json.dumps(rec, indent=1)
    assert lock_files(store) == []
    ok = verify_cli(store)
    assert ok.exit_code == 0, ok.stdout
    assert_same_items(items(store), clean)


def test_unreachable_scheduler_is_a_clear_error(cohort: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")
    cmd = extract_cmd(cohort, tmp_path / "s.zarr", "--scheduler", f"tcp://127.0.0.1:{port}")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--scheduler tcp://127.0.0.1:{port}: cannot reach a dask scheduler" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
