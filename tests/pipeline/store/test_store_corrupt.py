"""The store survives any corrupt metadata, missing array or crafted key (issue 13, points 1, 2 and 9).

For each damage, on the backend it applies to: readers skip the item with a warning (or refuse a crafted key
naming it), ``is_cached`` and ``info`` no longer count it, ``verify`` reports it with its path and what is wrong,
``repair`` removes it (a link without its target) and a rewrite of the item makes the store whole again.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.store import STORE_BACKENDS, H5Store, UnsafeEntry, ZarrStore, backend_for, open_store


def _feats(seed: int, n: int = 6, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float16), rng.integers(0, 1000, size=(n, 2))


def _store(path: Path):
    s = open_store(path)
    for i in range(3):
        s.write_item("wsi", "enc", f"P{i}", "a", *_feats(i), {"source_fingerprint": {"size": i}})
    s.set_encoder_attrs("wsi", "enc", {"encoder": "toy", "dim": 8})
    return s


# ---- damage of one item (P1/a), per backend --------------------------------------------------------------------
def _z(path: Path) -> Path:
    return path / "wsi" / "enc" / "P1" / "a"


def z_truncated_meta(path: Path) -> None:
    meta = _z(path) / "zarr.json"
    meta.write_text(meta.read_text()[:40])


def z_attrs_not_object(path: Path) -> None:
    (_z(path) / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": "x"}))


def z_meta_deleted(path: Path) -> None:
    (_z(path) / "zarr.json").unlink()


def z_not_utf8(path: Path) -> None:
    (_z(path) / "zarr.json").write_bytes(b"\xff\xfe\x00garbage")


def z_features_deleted(path: Path) -> None:
    shutil.rmtree(_z(path) / "features")


def z_coords_deleted(path: Path) -> None:
    shutil.rmtree(_z(path) / "coords")


def z_features_meta_truncated(path: Path) -> None:
    meta = _z(path) / "features" / "zarr.json"
    meta.write_text(meta.read_text()[:25])


def z_features_reshaped(path: Path) -> None:
    meta = _z(path) / "features" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [3, 8]
    meta.write_text(json.dumps(doc))


def _h5(path: Path, fn: Callable[[h5py.Group], None]) -> None:
    with h5py.File(path, "a") as f:
        fn(f["wsi/enc/P1/a"])


def h_attrs_not_json(path: Path) -> None:
    _h5(path, lambda g: g.attrs.__setitem__("mmcli_attrs", "{not json"))


def h_features_deleted(path: Path) -> None:
    _h5(path, lambda g: g.__delitem__("features"))


def h_coords_deleted(path: Path) -> None:
    _h5(path, lambda g: g.__delitem__("coords"))


def h_features_reshaped(path: Path) -> None:
    def fn(g: h5py.Group) -> None:
        del g["features"]
        g.create_dataset("features", data=np.zeros((2, 8), np.float16))

    _h5(path, fn)


def h_features_a_group(path: Path) -> None:
    def fn(g: h5py.Group) -> None:
        del g["features"]
        g.create_group("features")

    _h5(path, fn)


METADATA_DAMAGE = [
    ("s.zarr", z_truncated_meta, "unreadable metadata"),
    ("s.zarr", z_attrs_not_object, "unreadable metadata"),
    ("s.zarr", z_meta_deleted, "metadata file missing"),
    ("s.zarr", z_not_utf8, "unreadable metadata"),
    ("s.zarr", z_features_deleted, "features array missing"),
    ("s.zarr", z_coords_deleted, "coords array missing"),
    ("s.zarr", z_features_meta_truncated, "unreadable metadata"),
    ("s.zarr", z_features_reshaped, "features shape (3, 8) != recorded (6, 8)"),
    ("s.h5", h_attrs_not_json, "unreadable attributes"),
    ("s.h5", h_features_deleted, "features array missing"),
    ("s.h5", h_coords_deleted, "coords array missing"),
    ("s.h5", h_features_reshaped, "features shape (2, 8) != recorded (6, 8)"),
    ("s.h5", h_features_a_group, "not a dataset"),
]


@pytest.mark.parametrize("name,damage,why", METADATA_DAMAGE, ids=[d[1].__name__ for d in METADATA_DAMAGE])
def test_corrupt_item_is_skipped_reported_and_repaired(tmp_path: Path, name: str, damage: Callable, why: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / name
    _store(path)
    damage(path)
    s = open_store(path, "r")
    keys = [k.patient_id for k in s.iter_items()]
    assert keys == ["P0", "P2"]
    (warning,) = capsys.readouterr().err.splitlines()  # once, however often the item is met
    assert warning.startswith(f"warning: {path}: skipping /wsi/enc/P1/a: ") and why in warning
    assert warning.endswith(f"Fix: `mmcli store verify --repair {path}`, then re-run `mmcli extract` to redo it.")
    assert s.patients("wsi", "enc") == ["P0", "P2"]
    assert not s.is_cached("wsi", "enc", "P1", "a", {"size": 1})
    assert s.is_cached("wsi", "enc", "P0", "a", {"size": 0})
    info = s.info()["modalities"]["wsi"]["enc"]
    assert (info["items"], info["incomplete_items"], info["corrupt_items"], info["rows"]) == (2, 1, 1, 12)
    with pytest.raises(StoreError, match="P1/a"):
        s.read_item("wsi", "enc", "P1", "a")
    (problem,) = s.verify()
    assert problem.where == "/wsi/enc/P1/a" and why in problem.message, problem

    w = open_store(path, "a")
    assert w.repair(w.verify()) == ["/wsi/enc/P1/a"]
    assert w.verify() == [] and [k.patient_id for k in w.iter_items(include_incomplete=True)] == ["P0", "P2"]
    f, c = _feats(1)
    w.write_item("wsi", "enc", "P1", "a", f, c, {"source_fingerprint": {"size": 1}})
    assert w.verify() == [] and w.is_cached("wsi", "enc", "P1", "a", {"size": 1})
    np.testing.assert_array_equal(w.read_item("wsi", "enc", "P1", "a").features, f)


def test_rewrite_over_a_corrupt_item_needs_no_repair(tmp_path: Path) -> None:
    """The next extract simply replaces a corrupt item (the cache check says it is not cached)."""
    for name, damage in (("s.zarr", z_truncated_meta), ("s.h5", h_features_deleted)):
        path = tmp_path / name
        _store(path)
        damage(path)
        s = open_store(path)
        s.write_item("wsi", "enc", "P1", "a", *_feats(1))
        assert s.verify() == [] and len(list(s.iter_items())) == 3


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_damaged_array_data_is_found_by_verify(tmp_path: Path, name: str) -> None:
    """Bytes of the features' data damaged (metadata intact): the cheap cache check cannot see it, a read names the
    item and the fix, verify reports it and repair removes it."""
    path = tmp_path / name
    _store(path)
    if name.endswith(".zarr"):
        (chunk,) = [p for p in (_z(path) / "features").rglob("*") if p.is_file() and p.name != "zarr.json"]
        chunk.write_bytes(b"\x00garbage" * 3)
    else:
        with h5py.File(path, "r") as f:
            info = f["wsi/enc/P1/a/features"].id.get_chunk_info(0)
        with open(path, "r+b") as fh:
            fh.seek(info.byte_offset)
            fh.write(b"\xff" * info.size)
    s = open_store(path, "a")
    with pytest.raises(StoreError, match=r"P1/a is unreadable .*--repair"):
        s.read_item("wsi", "enc", "P1", "a")
    (problem,) = s.verify()
    assert problem.where == "/wsi/enc/P1/a" and "unreadable" in problem.message
    s.repair([problem])
    assert s.verify() == [] and [k.patient_id for k in s.iter_items()] == ["P0", "P2"]


def test_unreadable_group_metadata(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated encoder or patient zarr.json: items stay readable, encoder attrs read as empty with a warning,
    verify reports the group, repair resets its metadata and the next run restores the encoder attrs."""
    path = tmp_path / "s.zarr"
    _store(path)
    for group in (path / "wsi" / "enc", path / "wsi" / "enc" / "P2"):
        (group / "zarr.json").write_text('{"zarr_format": 3, "node_')
    s = open_store(path)
    assert s.encoder_attrs("wsi", "enc") == {}
    assert "encoder metadata" in capsys.readouterr().err
    assert [k.patient_id for k in s.iter_items()] == ["P0", "P1", "P2"]
    assert s.info()["modalities"]["wsi"]["enc"]["items"] == 3
    assert {p.where for p in s.verify()} == {"/wsi/enc", "/wsi/enc/P2"}
    s.repair()
    assert s.verify() == []
    s.set_encoder_attrs("wsi", "enc", {"encoder": "toy"})
    assert s.encoder_attrs("wsi", "enc") == {"encoder": "toy"}


def test_unreadable_root_is_a_clear_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    (path / "zarr.json").write_text("{")
    with pytest.raises(StoreError, match="zarr.json: unreadable metadata"):
        open_store(path, "r")


def test_corrupt_table_is_skipped_and_repaired(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pandas as pd

    for name in ("s.zarr", "s.h5"):
        path = tmp_path / name
        s = open_store(path)
        s.write_table("genes", pd.DataFrame({"A": [1.0, 2.0]}, index=["P0", "P1"]))
        s.write_table("prot", pd.DataFrame({"B": [1.0]}, index=["P0"]))
        if name.endswith(".zarr"):
            (path / "tabular" / "genes" / "zarr.json").write_text("{]")
        else:
            with h5py.File(path, "a") as f:
                del f["tabular/genes/values"]
        assert s.tables() == ["prot"]
        assert "skipping /tabular/genes" in capsys.readouterr().err
        with pytest.raises(StoreError, match="tabular/genes is corrupt"):
            s.read_table("genes")
        assert [p.where for p in s.verify()] == ["/tabular/genes"]
        s.repair()
        assert s.verify() == [] and s.tables() == ["prot"]


# ---- crafted stores: links, hidden and '..' keys -----------------------------------------------------------------
def _outside_item(tmp_path: Path) -> Path:
    """A valid-looking patient folder outside the store (what a symlink would make the store read)."""
    other = open_store(tmp_path / "elsewhere.zarr")
    other.write_item("wsi", "enc", "SECRET", "a", *_feats(9))
    return tmp_path / "elsewhere.zarr" / "wsi" / "enc" / "SECRET"


def _refused_everywhere(s, what: str) -> None:
    for read in (lambda: list(s.iter_items()), s.info, lambda: s.patients("wsi", "enc")):
        with pytest.raises(UnsafeEntry, match=what) as e:
            read()
        assert "mmcli never writes such a key" in str(e.value)


def test_symlinked_patient_folder_is_refused_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    target = _outside_item(tmp_path)
    (path / "wsi" / "enc" / "P9").symlink_to(target, target_is_directory=True)
    s = open_store(path, "r")
    _refused_everywhere(s, "/wsi/enc/P9: a symbolic link")
    (problem,) = s.verify()
    assert problem.where == "/wsi/enc/P9" and "symbolic link" in problem.message
    open_store(path).repair([problem])
    assert not (path / "wsi" / "enc" / "P9").is_symlink() and (target / "a" / "zarr.json").is_file()
    assert [k.patient_id for k in open_store(path, "r").iter_items()] == ["P0", "P1", "P2"]


def test_symlinked_item_and_array_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    target = _outside_item(tmp_path)
    (path / "wsi" / "enc" / "P0" / "b").symlink_to(target / "a", target_is_directory=True)
    with pytest.raises(UnsafeEntry, match="P0/b: a symbolic link"):
        list(open_store(path, "r").iter_items())
    (path / "wsi" / "enc" / "P0" / "b").unlink()
    # the features array of P1/a replaced by a link to another item's array: corrupt, never read
    shutil.rmtree(_z(path) / "features")
    (_z(path) / "features").symlink_to(target / "a" / "features", target_is_directory=True)
    s = open_store(path)
    assert [k.patient_id for k in s.iter_items()] == ["P0", "P2"] and not s.is_cached("wsi", "enc", "P1", "a")
    # a chunk file that is a link (metadata intact): read refuses it, verify reports it
    (chunk,) = [p for p in (path / "wsi/enc/P2/a/features").rglob("*") if p.is_file() and p.name != "zarr.json"]
    chunk.unlink()
    chunk.symlink_to(next(p for p in (target / "a" / "features").rglob("*") if p.is_file() and p.name != "zarr.json"))
    with pytest.raises(StoreError, match="holds links"):
        s.read_item("wsi", "enc", "P2", "a")
    assert {p.where for p in s.verify()} == {"/wsi/enc/P1/a", "/wsi/enc/P2/a"}
    s.repair()
    assert s.verify() == [] and [k.patient_id for k in s.iter_items()] == ["P0"]
    assert (target / "a" / "features" / "zarr.json").is_file()  # the link targets are untouched


@pytest.mark.parametrize("where", ["wsi/enc/.hidden", "wsi/.enc", ".wsi", "wsi/enc/P0/.a"])
def test_hidden_zarr_keys_are_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    shutil.copytree(path / "wsi" / "enc" / "P2", path / where)
    s = open_store(path, "r")
    with pytest.raises(UnsafeEntry, match="may not start with '.'"):
        list(s.iter_items())
    assert [p.where for p in s.verify()] == [f"/{where}"]
    open_store(path).repair()
    assert open_store(path, "r").verify() == [] and not (path / where).exists()


@pytest.mark.parametrize("kind", ["soft", "external", "dotdot", "hidden"])
def test_crafted_hdf5_keys_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "s.h5"
    _store(path)
    outside = tmp_path / "other.h5"
    open_store(outside).write_item("wsi", "enc", "SECRET", "a", *_feats(9))
    name, what = {"soft": ("P9", "soft link"), "external": ("P9", "external link"),
                  "dotdot": ("..", "may not start with '.'"), "hidden": (".x", "may not start with '.'")}[kind]
    with h5py.File(path, "a") as f:
        g = f["wsi/enc"]
        if kind == "soft":
            g[name] = h5py.SoftLink("/wsi/enc/P0")
        elif kind == "external":
            g[name] = h5py.ExternalLink(str(outside), "/wsi/enc/SECRET")
        else:
            f.copy(f["wsi/enc/P0"], g, name=name)
    s = open_store(path, "r")
    _refused_everywhere(s, f"/wsi/enc/{name}: .*{what}")
    assert [p.where for p in s.verify()] == [f"/wsi/enc/{name}"]
    open_store(path).repair()
    s = open_store(path, "r")
    assert s.verify() == [] and [k.patient_id for k in s.iter_items()] == ["P0", "P1", "P2"]
    assert open_store(outside, "r").patients("wsi", "enc") == ["SECRET"]


def test_explicit_symlinked_encoder_is_refused(tmp_path: Path) -> None:
    """fit names the encoder: that group being a link is refused too, not read as empty."""
    path = tmp_path / "s.zarr"
    _store(path)
    _outside_item(tmp_path)
    (path / "wsi" / "enc2").symlink_to(tmp_path / "elsewhere.zarr" / "wsi" / "enc", target_is_directory=True)
    with pytest.raises(UnsafeEntry, match="symbolic link"):
        list(open_store(path, "r").iter_items("wsi", "enc2"))


# ---- the store is not what the path says -----------------------------------------------------------------------
def test_store_path_of_the_wrong_kind(tmp_path: Path) -> None:
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a Zarr store"):
        open_store(tmp_path / "file.zarr")
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(StoreError, match="is a folder, not an HDF5 store"):
        open_store(tmp_path / "dir.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="junk.h5"):
        open_store(tmp_path / "junk.h5", "r")


def test_backends_come_from_the_registry() -> None:
    assert STORE_BACKENDS.names() == ["hdf5", "zarr"]
    assert STORE_BACKENDS.get("zarr") is ZarrStore and STORE_BACKENDS.get("hdf5") is H5Store
    assert [backend_for(p) for p in ("a.zarr", "a.h5", "a.HDF5", "a", "a.store")] == \
        ["zarr", "hdf5", "hdf5", "zarr", "zarr"]
    from mmcli.pipeline.errors import InputError

    with pytest.raises(InputError, match="unknown store backend 'parquet'"):
        open_store("x.zarr", backend="parquet")
