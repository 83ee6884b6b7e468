"""``mmcli store verify [--repair]`` end to end: a store with a killed writer's staging and an item whose
``complete`` flag is missing -> verify exits 1 listing both -> ``--repair`` exits 0 removing them -> verify
exits 0 -> ``mmcli extract`` redoes exactly those items and the store equals a clean run."""
from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest

from helpers.wsi_runs import (
    COHORT_SIZE,
    assert_same_items,
    done_items,
    extract_in_process,
    extract_subprocess,
    items,
    record_of,
    verify_cli,
)

N = COHORT_SIZE


@pytest.fixture(scope="module")
def cohort(copy_wsi_cohort: Path) -> Path:
    """A private copy of the session's cohort with its clean ``clean.zarr`` (tests/conftest.py): the test's own
    clean extraction into it then finds every slide cached. It used to write and extract 4 slides of its own;
    it now uses the shared 5 (the kill lands on the last slide either way)."""
    return copy_wsi_cohort


@pytest.mark.slow
def test_verify_repair_rerun(cohort: Path, tmp_path: Path) -> None:
    clean = cohort.parent / "clean.zarr"
    assert extract_in_process(cohort, clean).exit_code == 0
    store = tmp_path / "s.zarr"
    killed = extract_subprocess(cohort, store, f"store.staged:{N}")  # dies writing the last slide
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(items(store)) == [(f"P{i}", "a") for i in range(N - 1)]

    # P0 loses its complete flag, as an item of a writer that died between data and flag would look
    (enc,) = [d.name for d in (store / "wsi").iterdir() if d.is_dir()]
    meta_path = store / "wsi" / enc / "P0" / "a" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["complete"]
    meta_path.write_text(json.dumps(meta))

    bad = verify_cli(store)
    assert bad.exit_code == 1, bad.stdout
    lines = bad.stdout.splitlines()
    assert f"problem: /wsi/{enc}/P0/a: incomplete item (complete flag missing)" in lines
    staged = [x for x in lines if x.startswith("problem: /.staging/")]
    assert len(staged) == 1 and f".{killed.pid}.{socket.gethostname()}" in staged[0]
    assert "staging data left by an interrupted writer" in staged[0]
    assert lines[-1] == f"2 problem(s) in {store}"
    as_json = verify_cli(store, "--json")
    assert as_json.exit_code == 1 and len(json.loads(as_json.stdout)["problems"]) == 2

    fixed = verify_cli(store, "--repair")
    assert fixed.exit_code == 0, fixed.stdout
    assert f"removed: /wsi/{enc}/P0/a" in fixed.stdout and "removed: /.staging" in fixed.stdout
    assert not meta_path.parent.exists() and not any((store / ".staging").iterdir())
    ok = verify_cli(store)
    assert ok.exit_code == 0 and ok.stdout.strip() == f"{store}: ok", ok.stdout

    rerun = extract_in_process(cohort, store)
    assert rerun.exit_code == 0, rerun.output
    rec = record_of(rerun.stdout)
    assert done_items(rec) == {("P0", "a"), (f"P{N - 1}", "a")}
    assert done_items(rec, "cached") == {(f"P{i}", "a") for i in range(1, N - 1)}
    assert verify_cli(store).exit_code == 0
    assert_same_items(items(store), items(clean))


def test_verify_of_a_missing_store_is_a_usage_error(tmp_path: Path) -> None:
    r = verify_cli(tmp_path / "nope.zarr")
    assert r.exit_code == 2 and "no feature store" in r.output
