"""Issue 25, item 2: a lost or changed chunk no longer reads as valid data.

Before: deleting one ``features/c/...`` chunk file of a Zarr item made it read back as zeros with no error
(``verify`` ok, ``info`` silent, resume called it cached), and a chunk replaced by another valid chunk read back as
other numbers. Now every item carries the CRC-32C of each array (checked on every whole read, by ``verify`` and by
the resume check) and, for a partial read, every chunk file must exist for the array's shape.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import h5py
import numpy as np
import pytest

import mmcli.pipeline.store.hdf5 as hdf5_backend
import mmcli.pipeline.store.zarr as zarr_backend
from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.store import ItemKey, open_store
from mmcli.pipeline.store.checksum import array_checksum

N, D, ROWS = 10, 8, 4  # 10 rows in chunks of 4 rows: 3 chunks per array


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zarr_backend, "CHUNK_ROWS", ROWS)
    monkeypatch.setattr(hdf5_backend, "CHUNK_ROWS", ROWS)


def _feats(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D)).astype(np.float16) + 1, rng.integers(1, 1000, size=(N, 2))


def _store(path: Path):
    s = open_store(path)
    for i in range(3):
        s.write_item("wsi", "enc", f"P{i}", "a", *_feats(i), {"source_fingerprint": {"size": i}})
    return s


def _chunk(path: Path, pid: str, name: str, index: int) -> Path:
    return path / "wsi" / "enc" / pid / "a" / name / "c" / str(index) / "0"


def test_checksum_is_crc32c_of_the_array_bytes() -> None:
    """Independent recomputation: google_crc32c of the little-endian C-order bytes, whole, not in blocks."""
    a = np.random.default_rng(0).normal(size=(3000, 500)).astype(np.float16)  # 3 MB: several 1 MiB blocks
    assert array_checksum(a) == f"crc32c:{google_crc32c.value(a.tobytes()):08x}"
    assert array_checksum(a.astype(">f2")) == array_checksum(a)  # byte order of the caller's array ignored
    assert array_checksum(np.asfortranarray(a)) == array_checksum(a)
    b = a.copy()
    b[1234, 56] += 1
    assert array_checksum(b) != array_checksum(a)


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_items_carry_checksums_of_their_arrays(tmp_path: Path, name: str) -> None:
    s = _store(tmp_path / name)
    item = s.read_item("wsi", "enc", "P1", "a")
    f, c = _feats(1)
    assert item.attrs["checksums"] == {"features": array_checksum(f), "coords": array_checksum(c)}
    # what the caller passes as checksums is never trusted: recomputed from the data
    s.write_item("wsi", "enc", "P1", "b", f, c, {"checksums": {"features": "crc32c:00000000"}})
    assert s.read_item("wsi", "enc", "P1", "b").attrs["checksums"]["features"] == array_checksum(f)


def test_deleted_zarr_chunk_is_caught_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    _chunk(path, "P1", "features", 1).unlink()  # the middle chunk: it would read as zeros
    s = open_store(path, "r")
    assert [k.patient_id for k in s.iter_items()] == ["P0", "P2"]
    assert "features: 1 chunk file(s) missing (c/1/0), which would read as zeros" in capsys.readouterr().err
    assert not s.is_cached("wsi", "enc", "P1", "a", {"size": 1})
    assert s.info()["modalities"]["wsi"]["enc"]["corrupt_items"] == 1
    with pytest.raises(StoreError, match="P1/a is corrupt: features: 1 chunk file"):
        s.read_item("wsi", "enc", "P1", "a")
    with pytest.raises(StoreError, match="P1/a is corrupt"):  # rows of an intact chunk: refused all the same
        s.read_rows(ItemKey("wsi", "enc", "P1", "a"), [0, 1])
    (problem,) = s.verify()
    assert problem.where == "/wsi/enc/P1/a" and "chunk file(s) missing" in problem.message
    w = open_store(path)
    assert w.repair([problem]) == ["/wsi/enc/P1/a"] and w.verify() == []


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_changed_chunk_fails_the_checksum(tmp_path: Path, name: str) -> None:
    """A chunk that still decodes but holds other numbers: metadata intact, the cheap cache check cannot see it;
    the data check, a read, and verify do, naming the item."""
    path = tmp_path / name
    _store(path)
    if name.endswith(".zarr"):  # another item's valid chunk in its place (a restore from the wrong backup)
        shutil.copyfile(_chunk(path, "P0", "features", 0), _chunk(path, "P1", "features", 0))
    else:
        with h5py.File(path, "a") as f:
            f["wsi/enc/P1/a/features"][0, 0] = 42.0
    s = open_store(path, "r")
    assert s.is_cached("wsi", "enc", "P1", "a", {"size": 1})  # metadata only
    assert not s.is_cached("wsi", "enc", "P1", "a", {"size": 1}, check_data=True)
    assert s.is_cached("wsi", "enc", "P0", "a", {"size": 0}, check_data=True)
    with pytest.raises(StoreError, match=r"P1/a is corrupt: features data do not match their checksum .*--repair"):
        s.read_item("wsi", "enc", "P1", "a")
    (problem,) = s.verify()
    assert problem.where == "/wsi/enc/P1/a" and "do not match their checksum" in problem.message


def test_unallocated_hdf5_chunk_is_caught(tmp_path: Path) -> None:
    """HDF5's form of a lost chunk: a chunk never allocated reads as the fill value (zeros)."""
    path = tmp_path / "s.h5"
    _store(path)
    f1, _ = _feats(1)
    with h5py.File(path, "a") as f:
        g = f["wsi/enc/P1/a"]
        del g["features"]
        ds = g.create_dataset("features", shape=(N, D), dtype=np.float16, chunks=(ROWS, D), compression="gzip")
        ds[:ROWS] = f1[:ROWS]
        ds[2 * ROWS:] = f1[2 * ROWS:]  # chunk 1 never written
    s = open_store(path, "r")
    assert [k.patient_id for k in s.iter_items()] == ["P0", "P2"]
    assert not s.is_cached("wsi", "enc", "P1", "a")
    with pytest.raises(StoreError, match="1 of 3 chunks missing"):
        s.read_rows(ItemKey("wsi", "enc", "P1", "a"), [0])
    (problem,) = s.verify()
    assert "1 of 3 chunks missing" in problem.message


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_tables_carry_checksums(tmp_path: Path, name: str) -> None:
    import pandas as pd

    s = open_store(tmp_path / name)
    s.write_table("genes", pd.DataFrame({"A": [1.0, 2.0], "B": [3.0, np.nan]}, index=["P0", "P1"]))
    if name.endswith(".h5"):
        with h5py.File(tmp_path / name, "a") as f:
            f["tabular/genes/values"][0, 0] = 7.0
    else:
        meta = tmp_path / name / "tabular" / "genes" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"]["checksums"]["values"] = "crc32c:00000000"
        meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="genes is corrupt: values data do not match their checksum"):
        s.read_table("genes")
    assert [(p.where, p.kind) for p in s.verify()] == [("/tabular/genes", "table")]


def _strip_checksums(path: Path, pid: str) -> None:
    """Make item ``pid`` look as an mmcli before checksums wrote it (and, for Zarr, without its all-zero chunks:
    Zarr skipped writing chunks equal to the fill value)."""
    if path.suffix == ".zarr":
        meta = path / "wsi" / "enc" / pid / "a" / "zarr.json"
        doc = json.loads(meta.read_text())
        del doc["attributes"]["checksums"]
        meta.write_text(json.dumps(doc))
    else:
        with h5py.File(path, "a") as f:
            g = f[f"wsi/enc/{pid}/a"]
            attrs = json.loads(g.attrs["mmcli_attrs"])
            del attrs["checksums"]
            g.attrs["mmcli_attrs"] = json.dumps(attrs)


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_items_written_before_checksums_are_valid_but_unverified(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    s = _store(path)
    f = np.zeros((N, D), np.float16)
    f[:ROWS] = 1  # chunks 1 and 2 all zeros
    s.write_item("wsi", "enc", "P3", "a", f, np.zeros((N, 2), np.int64))
    _strip_checksums(path, "P3")
    if name.endswith(".zarr"):  # as old Zarr wrote it: no file for a chunk equal to the fill value
        for c in (1, 2):
            _chunk(path, "P3", "features", c).unlink()
        shutil.rmtree(path / "wsi" / "enc" / "P3" / "a" / "coords" / "c")
    s = open_store(path, "r")
    assert [k.patient_id for k in s.iter_items()] == ["P0", "P1", "P2", "P3"]
    assert s.is_cached("wsi", "enc", "P3", "a", check_data=True)
    item = s.read_item("wsi", "enc", "P3", "a")
    np.testing.assert_array_equal(item.features, f)
    np.testing.assert_array_equal(item.coords, np.zeros((N, 2)))
    np.testing.assert_array_equal(s.read_rows(ItemKey("wsi", "enc", "P3", "a"), [0, 5, 9]), f[[0, 5, 9]])
    notes: list[str] = []
    assert s.verify(notes=notes) == []
    assert notes == ["/wsi/enc/P3/a: written before per-array checksums existed: valid, but a lost or changed "
                     "chunk cannot be detected (unverified). Fix, if that matters: re-extract it with --force"]
