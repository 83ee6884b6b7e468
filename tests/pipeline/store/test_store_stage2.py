"""What stage-2 streaming reads the store with, on both backends: one patient's items without a walk of the store
(``items_of``), shapes and dtypes without the data (``item_shape`` / ``item_dtype``), and only the chunks that hold
the requested rows (``read_rows``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import mmcli.pipeline.store.hdf5 as hdf5_backend
import mmcli.pipeline.store.zarr as zarr_backend
from mmcli.pipeline.errors import InputError, StoreError
from mmcli.pipeline.store import ItemKey, UnsafeEntry, open_store

ROWS = 4  # rows per chunk in these tests
BACKENDS = ["s.zarr", "s.h5"]
ITEMS = {("P1", "a"): (10, np.float16), ("P1", "b"): (3, np.float32), ("P2", "a"): (9, np.float16)}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zarr_backend, "CHUNK_ROWS", ROWS)
    monkeypatch.setattr(hdf5_backend, "CHUNK_ROWS", ROWS)


def _features(n: int, dtype: type, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, 6)) + 2).astype(dtype)


@pytest.fixture(params=BACKENDS)
def store(tmp_path: Path, request: pytest.FixtureRequest):
    s = open_store(tmp_path / request.param)
    for seed, ((pid, iid), (n, dtype)) in enumerate(ITEMS.items()):
        s.write_item("wsi", "enc", pid, iid, _features(n, dtype, seed), np.arange(2 * n).reshape(n, 2))
    return s


def _garble_first_chunk(s, pid: str, iid: str) -> None:
    """Damage the bytes of chunk 0 of the item's features (metadata intact): reading that chunk fails."""
    if s.backend == "zarr":
        (s.path / "wsi" / "enc" / pid / iid / "features" / "c" / "0" / "0").write_bytes(b"\x00garbage" * 3)
    else:
        with h5py.File(s.path, "r") as f:
            info = f[f"wsi/enc/{pid}/{iid}/features"].id.get_chunk_info(0)
        with open(s.path, "r+b") as fh:
            fh.seek(info.byte_offset)
            fh.write(b"\xff" * info.size)


def test_items_of_lists_one_patient(store) -> None:
    assert store.items_of("wsi", "enc", "P1") == [ItemKey("wsi", "enc", "P1", "a"), ItemKey("wsi", "enc", "P1", "b")]
    assert store.items_of("wsi", "enc", "P2") == [ItemKey("wsi", "enc", "P2", "a")]
    assert store.items_of("wsi", "enc", "P9") == [] and store.items_of("mri", "enc", "P1") == []
    with pytest.raises(InputError):
        store.items_of("wsi", "enc", "../P1")


def test_items_of_never_walks_other_patients(store, tmp_path: Path) -> None:
    """A crafted entry under another patient makes every walk of the store refuse it; items_of of P1 does not
    even look there."""
    if store.backend == "zarr":
        (store.path / "wsi" / "enc" / "P2" / "evil").symlink_to(tmp_path, target_is_directory=True)
    else:
        with h5py.File(store.path, "a") as f:
            f["wsi/enc/P2/evil"] = h5py.SoftLink("/wsi/enc/P1/a")
    with pytest.raises(UnsafeEntry):
        list(store.iter_items())
    assert [k.item_id for k in store.items_of("wsi", "enc", "P1")] == ["a", "b"]
    with pytest.raises(UnsafeEntry, match="P2/evil"):
        store.items_of("wsi", "enc", "P2")


def test_items_of_skips_a_corrupt_item(store, capsys: pytest.CaptureFixture) -> None:
    if store.backend == "zarr":
        shutil.rmtree(store.path / "wsi" / "enc" / "P1" / "b" / "features")
    else:
        with h5py.File(store.path, "a") as f:
            del f["wsi/enc/P1/b/features"]
    assert [k.item_id for k in store.items_of("wsi", "enc", "P1")] == ["a"]
    assert "skipping /wsi/enc/P1/b: features array missing" in capsys.readouterr().err
    assert [k.item_id for k in store.items_of("wsi", "enc", "P1", include_incomplete=True)] == ["a", "b"]


def test_shape_and_dtype_come_from_metadata_only(store) -> None:
    for (pid, iid), (n, dtype) in ITEMS.items():
        key = ItemKey("wsi", "enc", pid, iid)
        assert store.item_shape(key) == (n, 6) and store.item_dtype(key) == np.dtype(dtype)
    _garble_first_chunk(store, "P1", "a")  # the data cannot be decoded any more: shape and dtype still answer
    key = ItemKey("wsi", "enc", "P1", "a")
    assert store.item_shape(key) == (10, 6) and store.item_dtype(key) == np.float16
    with pytest.raises(StoreError, match="P1/a is unreadable"):
        store.read_item("wsi", "enc", "P1", "a")
    with pytest.raises(StoreError, match="no complete item at /wsi/enc/P9/a"):
        store.item_shape(ItemKey("wsi", "enc", "P9", "a"))


def test_read_rows_equals_fancy_indexing_of_the_whole(store) -> None:
    rng = np.random.default_rng(0)
    for seed, ((pid, iid), (n, dtype)) in enumerate(ITEMS.items()):
        key, want = ItemKey("wsi", "enc", pid, iid), _features(n, dtype, seed)
        for k in (1, 2, n // 2, n):
            rows = np.sort(rng.choice(n, size=k, replace=False))
            got = store.read_rows(key, rows)
            assert got.dtype == want.dtype and got.shape == (k, 6)
            np.testing.assert_array_equal(got, want[rows])
        np.testing.assert_array_equal(store.read_rows(key, [0, n - 1], "coords"), [[0, 1], [2 * n - 2, 2 * n - 1]])
        empty = store.read_rows(key, [])
        assert empty.shape == (0, 6) and empty.dtype == want.dtype


def test_read_rows_refuses_bad_rows(store) -> None:
    key = ItemKey("wsi", "enc", "P1", "a")
    for bad in ([3, 1], [1, 1], [0, 10], [-1, 2], [[0, 1]], [0.5]):
        with pytest.raises(ValueError):
            store.read_rows(key, bad)
    with pytest.raises(ValueError):
        store.read_rows(key, [0], "values")


def test_read_rows_decodes_only_the_chunks_it_needs(store) -> None:
    """Chunk 0 (rows 0-3) damaged: rows of chunks 1 and 2 still read (chunk 0 is never touched); a row of chunk
    0 is unreadable, naming the item."""
    _garble_first_chunk(store, "P1", "a")
    key, want = ItemKey("wsi", "enc", "P1", "a"), _features(10, np.float16, 0)
    np.testing.assert_array_equal(store.read_rows(key, [4, 7, 9]), want[[4, 7, 9]])
    with pytest.raises(StoreError, match="P1/a is unreadable"):
        store.read_rows(key, [3, 4])
