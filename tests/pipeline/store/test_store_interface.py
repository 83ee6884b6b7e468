"""Feature store: round trip, atomic writes, concurrent readers, verify/repair, on both backends."""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmcli.pipeline.errors import InputError, StoreError
from mmcli.pipeline.store import H5Store, ZarrStore, open_store

BACKENDS = ["store.zarr", "store.h5"]


def _feats(seed: int, n: int = 7, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float16), rng.integers(0, 10_000, size=(n, 2))


@pytest.fixture(params=BACKENDS)
def store_path(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    return tmp_path / request.param


def test_round_trip(store_path: Path) -> None:
    s = open_store(store_path)
    assert isinstance(s, ZarrStore if store_path.suffix == ".zarr" else H5Store)
    f, c = _feats(0)
    s.write_item("wsi", "enc-1", "P001", "slide_a", f, c, {"mpp": 0.5, "source_fingerprint": {"size": 3}})
    s.write_item("wsi", "enc-1", "P001", "slide_b", f[:3], c[:3])
    s.write_item("text", "bert-1", "P002", "note", np.ones((1, 4), np.float32))
    s.set_encoder_attrs("wsi", "enc-1", {"encoder": "resnet50_trunc", "dim": 16})
    table = pd.DataFrame({"ESR1": [1.5, np.nan], "ERBB2": [0.2, 3.0]}, index=["P001", "P002"])
    s.write_table("genes", table)

    r = open_store(store_path, "r")
    item = r.read_item("wsi", "enc-1", "P001", "slide_a")
    np.testing.assert_array_equal(item.features, f)
    np.testing.assert_array_equal(item.coords, c)
    assert item.features.dtype == np.float16 and item.coords.dtype == np.int64
    assert item.attrs["mpp"] == 0.5 and item.attrs["complete"] is True and item.attrs["n"] == 7
    assert r.read_item("text", "bert-1", "P002", "note").coords is None
    assert r.modalities() == ["text", "wsi"]
    assert r.patients("wsi", "enc-1") == ["P001"]
    assert [k.item_id for k in r.iter_items("wsi")] == ["slide_a", "slide_b"]
    assert r.is_cached("wsi", "enc-1", "P001", "slide_a", {"size": 3})
    assert not r.is_cached("wsi", "enc-1", "P001", "slide_a", {"size": 4})
    got = r.read_table("genes")
    assert np.isnan(got.loc["P002", "ESR1"]) and got.loc["P002", "ERBB2"] == 3.0
    info = r.info()
    assert info["modalities"]["wsi"]["enc-1"]["items"] == 2
    assert info["modalities"]["wsi"]["enc-1"]["rows"] == 10
    assert info["modalities"]["wsi"]["enc-1"]["encoder"] == "resnet50_trunc"
    assert info["tables"]["genes"] == {"patients": 2, "features": 2}
    assert r.verify() == []
    with pytest.raises(StoreError):
        r.write_item("wsi", "enc-1", "P003", "x", f)


def test_overwrite_replaces_item(store_path: Path) -> None:
    s = open_store(store_path)
    s.write_item("wsi", "e", "P1", "a", *_feats(1, n=5))
    s.write_item("wsi", "e", "P1", "a", *_feats(2, n=3))
    assert s.read_item("wsi", "e", "P1", "a").features.shape == (3, 16)
    assert s.verify() == []


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "..", ".hidden", "x y", "p\\q"])
def test_unsafe_keys_refused(store_path: Path, bad: str) -> None:
    s = open_store(store_path)
    with pytest.raises(InputError):
        s.write_item("wsi", "e", bad, "a", np.ones((1, 2), np.float32))
    assert list(s.iter_items(include_incomplete=True)) == []


def test_bad_arrays_refused(store_path: Path) -> None:
    s = open_store(store_path)
    with pytest.raises(StoreError):
        s.write_item("wsi", "e", "P1", "a", np.ones(4, np.float32))
    with pytest.raises(StoreError):
        s.write_item("wsi", "e", "P1", "a", np.ones((4, 2), np.float32), np.ones((3, 2)))


def test_interrupted_write_leaves_nothing_complete(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(store_path)
    s.write_item("wsi", "e", "P1", "good", *_feats(0))

    calls = {"n": 0}
    if isinstance(s, ZarrStore):
        import zarr

        real = zarr.Group.create_array

        def boom(self, *a, **k):  # fail on the second array (coords), after features were written
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated crash mid-item")
            return real(self, *a, **k)

        monkeypatch.setattr(zarr.Group, "create_array", boom)
    else:
        import h5py

        real = h5py.Group.create_dataset

        def boom(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated crash mid-item")
            return real(self, *a, **k)

        monkeypatch.setattr(h5py.Group, "create_dataset", boom)

    with pytest.raises(RuntimeError):
        s.write_item("wsi", "e", "P2", "bad", *_feats(1))
    # replacing an existing complete item that crashes keeps the old one intact
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        s.write_item("wsi", "e", "P1", "good", *_feats(5, n=2))
    monkeypatch.undo()

    r = open_store(store_path, "r")
    assert [k.patient_id for k in r.iter_items()] == ["P1"]
    assert not r.is_cached("wsi", "e", "P2", "bad")
    np.testing.assert_array_equal(r.read_item("wsi", "e", "P1", "good").features, _feats(0)[0])
    with pytest.raises(StoreError):
        r.read_item("wsi", "e", "P2", "bad")
    assert all("/wsi/" not in p.where for p in r.verify())  # at most staging leftovers


def test_verify_reports_and_repair_removes(tmp_path: Path) -> None:
    s = open_store(tmp_path / "s.zarr")
    s.write_item("wsi", "e", "P1", "a", *_feats(0))
    s.write_item("wsi", "e", "P2", "a", *_feats(1))
    # simulate a half item left by an old writer: complete flag missing
    meta = tmp_path / "s.zarr" / "wsi" / "e" / "P2" / "a" / "zarr.json"
    meta.write_text(meta.read_text().replace('"complete": true', '"complete": false'))
    (tmp_path / "s.zarr" / ".staging" / "deadbeef").mkdir(parents=True)
    problems = s.verify()
    wheres = {p.where for p in problems}
    assert "/wsi/e/P2/a" in wheres and "/.staging/deadbeef" in wheres
    assert [k.patient_id for k in s.iter_items()] == ["P1"]
    s.repair(problems, staging_older_than_s=0)
    assert s.verify() == []
    assert [k.patient_id for k in s.iter_items(include_incomplete=True)] == ["P1"]


def test_verify_finds_nonfinite_and_dim_mismatch(store_path: Path) -> None:
    s = open_store(store_path)
    f, c = _feats(0)
    f[0, 0] = np.nan
    s.write_item("wsi", "e", "P1", "a", f, c)
    s.write_item("wsi", "e", "P2", "a", np.ones((2, 8), np.float16))
    msgs = " ".join(str(p) for p in s.verify())
    assert "non-finite" in msgs and "disagree on feature dim" in msgs


def test_open_readonly_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        open_store(tmp_path / "nope.zarr", "r")
    with pytest.raises(StoreError):
        open_store(tmp_path / "nope.h5", "r")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "file.txt").write_text("x")
    with pytest.raises(StoreError):
        open_store(tmp_path / "notastore")


# ---- concurrency: readers in other processes while one writer runs ------------------------------------------
N_ITEMS = 40


def _writer(path: str) -> None:
    s = open_store(path)
    for i in range(N_ITEMS):
        f, c = _feats(i, n=50 + i)
        s.write_item("wsi", "e", f"P{i:03d}", "a", f, c, {"i": i})


def _reader(path: str, q: mp.Queue) -> None:
    seen, errors = 0, []
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            try:
                s = open_store(path, "r")
            except StoreError:
                continue  # the writer has not created the store yet
            keys = list(s.iter_items())
            for k in keys:
                item = s.read_item(*k.__dict__.values())
                i = item.attrs["i"]
                exp_f, exp_c = _feats(i, n=50 + i)
                if not (np.array_equal(item.features, exp_f) and np.array_equal(item.coords, exp_c)):
                    errors.append(f"{k.path} differs")
            seen = max(seen, len(keys))
            if len(keys) == N_ITEMS:
                break
    except Exception as e:  # noqa: BLE001 - report to the parent
        errors.append(f"{type(e).__name__}: {e}")
    q.put((seen, errors))


@pytest.mark.parametrize("name", BACKENDS)
def test_concurrent_readers_while_writing(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    readers = [ctx.Process(target=_reader, args=(path, q)) for _ in range(2)]
    writer = ctx.Process(target=_writer, args=(path,))
    for p in readers:
        p.start()
    writer.start()
    writer.join(120)
    results = [q.get(timeout=120) for _ in readers]
    for p in readers:
        p.join(30)
    assert writer.exitcode == 0
    for seen, errors in results:
        assert errors == []
        assert seen == N_ITEMS


def test_verify_detects_changed_source(tmp_path: Path) -> None:
    from mmcli.pipeline.fingerprint import source_fingerprint

    src = tmp_path / "slide.svs"
    src.write_bytes(b"original")
    s = open_store(tmp_path / "s.zarr")
    s.write_item("wsi", "e", "P1", "a", *_feats(0), {"source_fingerprint": source_fingerprint(src)})
    assert s.verify() == []
    src.write_bytes(b"modified!")
    assert "changed since extraction" in str(s.verify())
    assert s.verify(check_sources=False) == []
    src.unlink()  # unreachable sources are not checked
    assert s.verify() == []


def test_pid_alive_treats_zombies_as_dead() -> None:
    """A killed process that its parent has not reaped yet (a dask worker before its nanny notices) is dead:
    its locks and staging are stale."""
    import os
    import subprocess

    from mmcli.pipeline.store import pid_alive

    p = subprocess.Popen(["sleep", "0"])
    deadline = time.monotonic() + 30
    while pid_alive(p.pid) and time.monotonic() < deadline:  # exited, not reaped: a zombie
        time.sleep(0.05)
    assert not pid_alive(p.pid)
    assert os.waitpid(p.pid, os.WNOHANG)[0] == p.pid  # it was still there to reap, i.e. a zombie
    assert pid_alive(os.getpid()) and not pid_alive(-5)
