"""``mmcli extract`` under a full disk and signals, end to end (issue 13, points 4 and 7).

Each fault: the exit code (1 for a full disk, 130 / 143 for SIGINT / SIGTERM), the message, no ``Traceback``
anywhere in the output, a valid run record (or none), no lock left, ``mmcli store verify`` clean, and the re-run
finishes the cohort with the same features as a clean run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers.wsi_runs import (
    assert_same_items,
    child_env,
    extract_cmd,
    extract_in_process,
    items,
    lock_files,
    record_of,
    records,
    verify_cli,
    wait_stopped,
    write_cohort,
)

N = 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("faults"), N)


@pytest.fixture(scope="module")
def clean(cohort: Path) -> dict:
    store = cohort.parent / "clean.zarr"
    r = extract_in_process(cohort, store)
    assert r.exit_code == 0, r.output
    return items(store)


@pytest.fixture
def fault_env(monkeypatch: pytest.MonkeyPatch):
    from mmcli.pipeline import faults

    def set_fault(spec: str | None) -> None:
        faults._hits.clear()
        if spec:
            monkeypatch.setenv("MMCLI_FAULT", spec)
        else:
            monkeypatch.delenv("MMCLI_FAULT", raising=False)

    yield set_fault
    faults._hits.clear()


def _assert_recovers(cohort: Path, store: Path, clean: dict, before: int) -> None:
    """verify is clean, no lock is left, and the re-run does exactly the rest and equals the clean run."""
    ok = verify_cli(store)
    assert ok.exit_code == 0 and ok.stdout.strip().endswith(": ok"), ok.stdout
    assert lock_files(store) == []
    rerun = extract_in_process(cohort, store)
    assert rerun.exit_code == 0, rerun.output
    rec = record_of(rerun.stdout)
    assert (rec["done"], rec["cached"]) == (N - before, before)
    assert_same_items(items(store), clean)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_injected_enospc_stops_the_run(cohort: Path, clean: dict, tmp_path: Path, fault_env, backend: str) -> None:
    store = tmp_path / ("s.zarr" if backend == "zarr" else "s.h5")
    fault_env("store.staged:3:enospc")  # the 3rd slide's write hits a full disk
    r = extract_in_process(cohort, store)
    fault_env(None)
    assert r.exit_code == 1, r.output
    assert f"stopped: disk full: {store} (needs about 1 MB more)" in r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    rec = record_of(r.stdout)
    assert (rec["done"], rec["failed"], rec["skipped"], rec["exit_code"]) == (2, 1, 2, 1)
    assert len(items(store)) == 2
    if backend == "zarr":
        assert not any((store / ".staging").iterdir())
    _assert_recovers(cohort, store, clean, 2)


def test_real_full_disk_on_a_small_tmpfs(cohort: Path, clean: dict, tmp_path: Path) -> None:
    """The store, its QC images and run records on a tmpfs that fills up during the run (skipped where mounting
    is not permitted). The run stops at the first ENOSPC; then the store moves to a roomy disk and finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        # leave room for about two slides (each: ~20 KB of arrays and metadata, ~25 KB of QC image)
        usage = shutil.disk_usage(disk)
        (disk / "filler").write_bytes(b"\0" * (usage.free - 110_000))
        store = disk / "s.zarr"
        r = extract_in_process(cohort, store)
        assert r.exit_code == 1, r.output
        assert "stopped: disk full: " in r.output and "Fix: free space" in r.output, r.output
        assert "Traceback" not in r.output and "Errno 28" not in r.output
        rec_line = [x for x in r.stdout.splitlines() if x.startswith("run record: ")][-1]
        if rec_line.startswith("run record: not written"):
            assert "disk full" in rec_line
        else:
            json.loads(Path(rec_line.removeprefix("run record: ")).read_text())  # whole, valid JSON
        runs = disk / "s.zarr.runs"
        assert not runs.exists() or not [p for p in runs.iterdir() if p.suffix == ".tmp"]
        assert lock_files(store) == []
        done = len(items(store))
        assert 0 <= done < N
        (disk / "filler").unlink()
        moved = tmp_path / "s.zarr"
        shutil.copytree(store, moved, symlinks=True)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    _assert_recovers(cohort, moved, clean, done)


def test_sigterm_to_a_running_extract(cohort: Path, clean: dict, tmp_path: Path) -> None:
    """A real ``mmcli extract`` process gets SIGTERM once its first slide is stored: it abandons the slide it is on
    (or finishes it), prints the summary and a valid run record, exits 143 and leaves no lock. The child stops
    itself after its first slide (``item.after:1:stop``) so the signal lands there however loaded the machine is
    (polling the store let a fast child finish every slide first)."""
    store = tmp_path / "s.zarr"
    p = subprocess.Popen(extract_cmd(cohort, store), env=child_env(MMCLI_FAULT="item.after:1:stop"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(p)
        p.send_signal(signal.SIGTERM)  # pending while stopped, delivered on SIGCONT
        os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait()
    assert p.returncode == 143, out + err
    assert "Traceback" not in out + err
    assert "stopped: SIGTERM: " in out and "re-run the same command to resume" in out, out
    rec = record_of(out)
    assert rec["exit_code"] == 143 and rec["signal"] == signal.SIGTERM
    before = len(items(store))
    assert rec["done"] == before and 1 <= before < N
    assert rec["done"] + rec["interrupted"] + rec["skipped"] == N
    _assert_recovers(cohort, store, clean, before)


def test_sigint_mid_slide(cohort: Path, clean: dict, tmp_path: Path, fault_env) -> None:
    """Ctrl-C in the middle of the second slide (after its first tile batch): that slide is abandoned unwritten,
    exit 130; the other records and the store stay valid."""
    store = tmp_path / "s.h5"
    fault_env("item.progress:3:int")
    r = extract_in_process(cohort, store)
    fault_env(None)
    assert r.exit_code == 130, r.output
    assert "interrupted: P1/a: stopped by SIGINT before it finished; not written" in r.output
    assert "stopped: SIGINT: 1 item(s) abandoned unwritten, 3 not started" in r.output
    assert "Traceback" not in r.output
    rec = records(store)[-1]
    assert (rec["done"], rec["interrupted"], rec["skipped"], rec["exit_code"]) == (1, 1, 3, 130)
    _assert_recovers(cohort, store, clean, 1)


def test_manifest_of_missing_files_loads_no_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """45 rows, none of whose files exist: the encoder is never built and the console lists 20 of them."""
    import dataclasses

    import mmcli.stages.extract as stage

    def no_spec(*a, **k):
        raise AssertionError("make_spec called for a manifest of missing files")

    real = stage.modality_of
    monkeypatch.setattr(stage, "modality_of", lambda name: dataclasses.replace(real(name), make_spec=no_spec))
    rows = ["patient_id,modality,path,item_id"] + [f"P{i},wsi,slides/{uuid.uuid4().hex}.svs,a" for i in range(45)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    r = extract_in_process(tmp_path / "m.csv", tmp_path / "s.zarr")
    assert r.exit_code == 1, r.output
    assert r.output.count("  missing: ") == 20
    assert "... 25 more not listed (failed 0, missing 45 in all): all 45 in the run record" in r.output
    assert len(record_of(r.stdout)["outcomes"]) == 45
