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


# ---- issue 13: corrupt metadata, missing arrays and crafted keys through the CLI ----------------------------------
@pytest.fixture(scope="module")
def clean_store(cohort: Path) -> Path:
    store = cohort.parent / "clean-ref.zarr"
    r = extract_in_process(cohort, store)
    assert r.exit_code == 0, r.output
    return store


def _invoke(*args: str):
    from typer.testing import CliRunner

    from mmcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_info_verify_repair_survive_corrupt_metadata_and_links(cohort: Path, clean_store: Path,
                                                               tmp_path: Path) -> None:
    """P0's zarr.json truncated, P1's features array deleted, a patient folder linked to outside the store: no
    traceback anywhere; info refuses the link (exit 2), verify names all three (exit 1), --repair removes them
    (the link's target untouched), and the re-run redoes exactly P0 and P1 to a store equal to a clean run."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(clean_store, store)
    (enc,) = [d.name for d in (store / "wsi").iterdir() if d.is_dir()]
    base = store / "wsi" / enc
    meta = base / "P0" / "a" / "zarr.json"
    meta.write_text(meta.read_text()[:60])
    shutil.rmtree(base / "P1" / "a" / "features")
    outside = tmp_path / "outside"
    shutil.copytree(base / "P2", outside)
    (base / "P9").symlink_to(outside, target_is_directory=True)

    info = _invoke("store", "info", store)
    assert info.exit_code == 2 and f"/wsi/{enc}/P9: a symbolic link" in info.output, info.output
    assert "mmcli never writes such a key" in info.output and "Traceback" not in info.output
    bad = verify_cli(store)
    assert bad.exit_code == 1 and "Traceback" not in bad.output, bad.output
    lines = bad.stdout.splitlines()
    assert any(x.startswith(f"problem: /wsi/{enc}/P0/a: corrupt: {meta}: unreadable metadata") for x in lines), lines
    assert f"problem: /wsi/{enc}/P1/a: corrupt: features array missing" in lines
    assert any(x.startswith(f"problem: /wsi/{enc}/P9: a symbolic link (to {outside})") for x in lines)
    assert lines[-1] == f"3 problem(s) in {store}"

    fixed = verify_cli(store, "--repair")
    assert fixed.exit_code == 0 and "Traceback" not in fixed.output, fixed.output
    for p in ("P0/a", "P1/a", "P9"):
        assert f"removed: /wsi/{enc}/{p}" in fixed.stdout
    assert (outside / "a" / "zarr.json").is_file()
    info = _invoke("store", "info", store, "--json")
    assert info.exit_code == 0, info.output
    counts = json.loads(info.stdout)["modalities"]["wsi"][enc]
    assert (counts["items"], counts["incomplete_items"]) == (N - 2, 0)
    rerun = extract_in_process(cohort, store)
    assert rerun.exit_code == 0, rerun.output
    assert done_items(record_of(rerun.stdout)) == {("P0", "a"), ("P1", "a")}
    assert verify_cli(store).exit_code == 0
    assert_same_items(items(store), items(clean_store))


def test_extract_redoes_items_with_a_missing_array_or_broken_attrs(cohort: Path, clean_store: Path,
                                                                   tmp_path: Path) -> None:
    """Without any repair: an item whose features array was deleted, or whose attrs are not JSON, is not cached
    (info does not count it complete) and the next extract redoes it (HDF5 store)."""
    import h5py

    store = tmp_path / "s.h5"
    assert extract_in_process(cohort, store).exit_code == 0
    with h5py.File(store, "a") as f:
        (enc,) = list(f["wsi"])
        del f[f"wsi/{enc}/P1/a/features"]
        f[f"wsi/{enc}/P3/a"].attrs["mmcli_attrs"] = '{"complete": tr'
    info = _invoke("store", "info", store, "--json")
    assert info.exit_code == 0, info.output
    counts = json.loads(info.stdout)["modalities"]["wsi"][enc]
    assert (counts["items"], counts["incomplete_items"], counts["corrupt_items"]) == (N - 2, 2, 2)
    rerun = extract_in_process(cohort, store)
    assert rerun.exit_code == 0 and "Traceback" not in rerun.output, rerun.output
    rec = record_of(rerun.stdout)
    assert done_items(rec) == {("P1", "a"), ("P3", "a")} and rec["cached"] == N - 2
    assert verify_cli(store).exit_code == 0
    assert_same_items(items(store), items(clean_store))


def test_fit_skips_a_corrupt_item_with_a_warning(tmp_path: Path) -> None:
    """fit reads around a corrupt item (a warning names it and the fix) instead of a JSONDecodeError traceback,
    and refuses a crafted store with exit 2."""
    from helpers.planted_data import make_store

    planted = make_store(tmp_path / "s.zarr", n=16, seed=1, dim=8, tiles=(4, 8), modalities=("wsi", "genes"))
    planted.labels.to_csv(tmp_path / "labels.csv")
    meta = tmp_path / "s.zarr" / "wsi" / "enc-wsi" / "P003" / "slide0" / "zarr.json"
    meta.write_text(meta.read_text()[:30])
    args = ["fit", "--head", "xgboost", "--store", tmp_path / "s.zarr", "--labels", tmp_path / "labels.csv",
            "--target", "label", "--folds", "2"]
    r = _invoke(*args, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "skipping /wsi/enc-wsi/P003/slide0" in r.output and "--repair" in r.output, r.output
    assert "Traceback" not in r.output
    (tmp_path / "s.zarr" / "wsi" / "enc-wsi" / "P900").symlink_to(tmp_path / "s.zarr" / "wsi" / "enc-wsi" / "P001")
    r = _invoke(*args, "--out", tmp_path / "run2")
    assert r.exit_code == 2 and "symbolic link" in r.output and "Traceback" not in r.output, r.output


# ---- issue 25: lost and changed chunks, a broken root, items written before checksums ----------------------------
@pytest.mark.parametrize("damage", ["deleted", "swapped"])
def test_lost_or_changed_chunk_is_named_by_verify_and_redone_by_extract(cohort: Path, clean_store: Path,
                                                                       tmp_path: Path, damage: str) -> None:
    """A features chunk of P2 deleted (before: read as zeros, verify ok, resume "cached", the prediction
    flipped) or replaced by P1's chunk: verify exits 1 naming the item; without any repair the next extract
    redoes exactly that item, and the store equals a clean run."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(clean_store, store)
    (enc,) = [d.name for d in (store / "wsi").iterdir() if d.is_dir()]
    chunk = store / "wsi" / enc / "P2" / "a" / "features" / "c" / "0" / "0"
    if damage == "deleted":
        chunk.unlink()
        why = "corrupt: features: 1 chunk file(s) missing (c/0/0), which would read as zeros"
    else:
        shutil.copyfile(store / "wsi" / enc / "P1" / "a" / "features" / "c" / "0" / "0", chunk)
        why = "corrupt: features data do not match their checksum"
    bad = verify_cli(store)
    assert bad.exit_code == 1, bad.output
    (line,) = [x for x in bad.stdout.splitlines() if x.startswith("problem: ")]
    assert line.startswith(f"problem: /wsi/{enc}/P2/a: {why}"), line
    rerun = extract_in_process(cohort, store)
    assert rerun.exit_code == 0, rerun.output
    rec = record_of(rerun.stdout)
    assert done_items(rec) == {("P2", "a")} and rec["cached"] == N - 1
    assert verify_cli(store).exit_code == 0
    assert_same_items(items(store), items(clean_store))


def test_truncated_root_metadata_is_rebuilt_by_repair(clean_store: Path, tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(clean_store, store)
    root = store / "zarr.json"
    root.write_text(root.read_text()[:30])
    info = _invoke("store", "info", store)
    assert info.exit_code == 2 and "Fix: `mmcli store verify --repair" in info.output, info.output
    bad = verify_cli(store)
    assert bad.exit_code == 1 and "Traceback" not in bad.output, bad.output
    assert bad.stdout.splitlines()[0].startswith("problem: /: unreadable root metadata")
    fixed = verify_cli(store, "--repair")
    assert fixed.exit_code == 0, fixed.output
    assert "removed: / (root metadata rebuilt: schema_version 1, mmcli_version " in fixed.stdout
    assert verify_cli(store).exit_code == 0
    assert _invoke("store", "info", store).exit_code == 0
    assert_same_items(items(store), items(clean_store))


def test_items_without_checksums_are_noted_not_failed(tmp_path: Path) -> None:
    import numpy as np

    from mmcli.pipeline.store import open_store

    store = tmp_path / "old.zarr"
    open_store(store).write_item("wsi", "enc", "P0", "a", np.ones((2, 4), np.float16))
    meta = store / "wsi" / "enc" / "P0" / "a" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["checksums"]  # as an mmcli before checksums wrote it
    meta.write_text(json.dumps(doc))
    r = verify_cli(store)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["note: 1 item(s) unverified, e.g. /wsi/enc/P0/a: written before per-array "
                                     "checksums existed: valid, but a lost or changed chunk cannot be detected "
                                     "(unverified). Fix, if that matters: re-extract it with --force",
                                     f"{store}: ok"]
    assert json.loads(verify_cli(store, "--json").stdout)["notes"][0].startswith("/wsi/enc/P0/a: written before")
