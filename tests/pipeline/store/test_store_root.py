"""Issue 25, item 11 (store faults): the root metadata can be rebuilt by ``repair``, and a store created by
several processes at once is never seen without its ``schema_version``."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import h5py
import numpy as np
import pytest

from mmcli import __version__
from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.store import SCHEMA_VERSION, open_store


def _store(path: Path) -> None:
    s = open_store(path)
    for i in range(3):
        s.write_item("wsi", "enc", f"P{i}", "a", np.full((2, 4), i, np.float16), None, {"mmcli_version": "0.0.9"})
    s.set_encoder_attrs("wsi", "enc", {"encoder": "toy", "dim": 4})


def _break_root(path: Path, how: str) -> None:
    if path.suffix == ".zarr":
        meta = path / "zarr.json"
        if how == "truncated":
            meta.write_text(meta.read_text()[:20])
        elif how == "deleted":
            meta.unlink()
        else:  # no schema_version: what a store seen mid-creation used to look like
            meta.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    else:
        with h5py.File(path, "a") as f:
            if how == "truncated":
                f.attrs["mmcli_attrs"] = '{"schema_ver'
            elif how == "deleted":
                del f.attrs["mmcli_attrs"]
            else:
                f.attrs["mmcli_attrs"] = "{}"


@pytest.mark.parametrize("how", ["truncated", "deleted", "no_schema"])
@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_broken_root_is_refused_reported_and_rebuilt(tmp_path: Path, name: str, how: str) -> None:
    path = tmp_path / name
    _store(path)
    _break_root(path, how)
    for mode in ("r", "a"):
        with pytest.raises(StoreError, match=r"not a readable mmcli store: .*Fix: `mmcli store verify --repair"):
            open_store(path, mode)
    s = open_store(path, "r", check_root=False)
    (problem,) = s.verify()
    assert (problem.where, problem.kind) == ("/", "root") and "rebuilds it from the items" in problem.message
    w = open_store(path, "a", check_root=False)
    assert w.repair([problem]) == [f"/ (root metadata rebuilt: schema_version {SCHEMA_VERSION}, mmcli_version 0.0.9)"]
    s = open_store(path, "r")
    assert s.verify() == [] and s.root_attrs()["schema_version"] == SCHEMA_VERSION
    assert s.root_attrs()["mmcli_version"] == "0.0.9" and s.root_attrs()["rebuilt"]["mmcli_version"] == __version__
    assert [k.patient_id for k in s.iter_items()] == ["P0", "P1", "P2"]
    assert s.encoder_attrs("wsi", "enc") == {"encoder": "toy", "dim": 4}


def test_a_folder_that_is_no_store_is_still_refused(tmp_path: Path) -> None:
    """Only a folder holding Zarr groups counts as a store with a lost root; anything else stays refused."""
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "notes.txt").write_text("x")
    for check_root in (True, False):
        with pytest.raises(StoreError, match="no feature store"):
            open_store(tmp_path / "x.zarr", "r", check_root=check_root)
        with pytest.raises(StoreError, match="is not empty and is not a Zarr store"):
            open_store(tmp_path / "x.zarr", "a", check_root=check_root)


def test_newer_schema_is_refused_even_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = SCHEMA_VERSION + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        open_store(path, "a", check_root=False)


def test_repair_resets_unreadable_encoder_metadata_and_says_who_restores_it(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    (path / "wsi" / "enc" / "zarr.json").write_text('{"zarr_format": 3, "node_')
    s = open_store(path)
    assert s.repair() == ["/wsi/enc (unreadable metadata reset; the next extract or import of this encoder "
                          "restores its provenance)"]
    assert s.verify() == [] and s.encoder_attrs("wsi", "enc") == {}


# ---- several processes create one store at once ----------------------------------------------------------------
def _open_after(barrier, path: str, q) -> None:
    barrier.wait()
    try:
        s = open_store(path, "a")
        q.put(("ok", s.root_attrs().get("schema_version")))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_concurrent_creation_never_shows_a_root_without_schema(tmp_path: Path, name: str) -> None:
    """Six processes released at once open (and so create) the same new store, 15 times over: every one gets the
    store. Before, a process could read the root Zarr wrote before its attributes and fail with 'store
    schema_version None'."""
    ctx = mp.get_context("fork")
    errors = []
    for trial in range(15):
        path = str(tmp_path / f"{trial}-{name}")
        barrier, q = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_after, args=(barrier, path, q)) for _ in range(6)]
        for p in procs:
            p.start()
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        errors += [r for r in results if r != ("ok", SCHEMA_VERSION)]
    assert errors == []
