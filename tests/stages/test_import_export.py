"""``mmcli export`` -> ``mmcli import`` round trips through the CLAM, TRIDENT and STAMP layouts (CLI level)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.pipeline.store import open_store

EID = "resnet50_trunc-0123456789"
TILE_ATTRS = {"mpp": 0.5, "patch_size": 224, "patch_size_level0": 448, "slide_mpp": 0.25,
              "target_magnification": 20.0, "level0_magnification": 40.0, "level": 0}
ITEMS = [("P1", "slideA", 7), ("P2", "slideB", 5), ("P2", "slideC", 1), ("P3", "slideA", 3)]  # slideA twice


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store as ``mmcli extract --modality wsi`` leaves it: float16 features, level-0 coords, tile attrs."""
    path = tmp_path / "native.zarr"
    st = open_store(path, "a")
    st.set_encoder_attrs("wsi", EID, {"encoder": "resnet50_trunc", "dim": 64})
    rng = np.random.default_rng(3)
    for pid, item, n in ITEMS:
        feats = rng.normal(size=(n, 64)).astype(np.float16)
        coords = rng.integers(0, 100, size=(n, 2)) * 448
        st.write_item("wsi", EID, pid, item, feats, coords, {"encoder": "resnet50_trunc", "tiles": TILE_ATTRS})
    return path


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.mark.parametrize("fmt", ["clam", "trident", "stamp"])
def test_export_then_import_round_trip(tmp_path: Path, store: Path, fmt: str) -> None:
    out = tmp_path / f"out_{fmt}"
    code, text = _run("export", "--format", fmt, "--store", store, "--out", out)
    assert code == 0, text
    assert "4 file(s)" in text
    back = tmp_path / "back.h5"
    code, text = _run("import", "--format", fmt, "--from", out, "--manifest", out / "manifest.csv", "--store", back,
                      "--encoder-id", "roundtrip", "--no-progress")
    assert code == 0, text
    assert "done 4" in text
    src, dst = open_store(store, "r"), open_store(back, "r")
    assert [(k.patient_id, k.item_id) for k in dst.iter_items("wsi", "roundtrip")] == \
        [(p, i) for p, i, _ in sorted(ITEMS)]
    for pid, item, _ in ITEMS:
        a, b = src.read_item("wsi", EID, pid, item), dst.read_item("wsi", "roundtrip", pid, item)
        np.testing.assert_array_equal(b.features.astype(np.float32), a.features.astype(np.float32))
        np.testing.assert_array_equal(b.coords, a.coords)
        # the file names the encoder as the peer does: TRIDENT's resnet50 is CLAM's resnet50_trunc (layer3 of
        # resnet50.tv_in1k, average-pooled)
        peer_name = "resnet50" if fmt == "trident" else "resnet50_trunc"
        assert b.attrs["imported_from"] == fmt and b.attrs["source_encoder"] == peer_name
        if fmt != "clam":  # CLAM files carry no magnification; TRIDENT and STAMP keep the tile geometry
            assert b.attrs["mpp"] == pytest.approx(0.5) and b.attrs["patch_size"] == 224
            assert b.attrs["slide_mpp"] == pytest.approx(0.25)
        assert b.attrs["patch_size_level0"] == 448
    # a second import of unchanged files reads nothing
    code, text = _run("import", "--format", fmt, "--from", out, "--manifest", out / "manifest.csv", "--store", back,
                      "--encoder-id", "roundtrip", "--no-progress")
    assert code == 0 and "cached 4" in text


def test_exported_files_follow_each_layout(tmp_path: Path, store: Path) -> None:
    """Changed with issue 15: CLAM coords are int32 (as CLAM writes them, was int64), CLAM exports also get
    ``pt_files/`` and ``patches/``; STAMP coords are float32 µm."""
    for fmt in ("clam", "trident", "stamp"):
        assert _run("export", "--format", fmt, "--store", store, "--out", tmp_path / fmt)[0] == 0
    with h5py.File(tmp_path / "clam" / "h5_files" / "slideB.h5", "r") as h:
        assert h["features"].dtype == np.float32 and h["features"].shape == (5, 64)
        assert h["coords"].dtype == np.int32 and h["coords"].attrs["patch_size"] == 448
        assert h["coords"].attrs["patch_level"] == 0 and h["features"].chunks == (1, 64)
    assert (tmp_path / "clam" / "pt_files" / "slideB.pt").is_file()
    with h5py.File(tmp_path / "clam" / "patches" / "slideB.h5", "r") as h:
        assert h["coords"].attrs["patch_size"] == 448 and h["coords"].attrs["patch_level"] == 0
    assert (tmp_path / "clam" / "h5_files" / "P1__slideA.h5").exists()  # item id shared by two patients
    assert (tmp_path / "clam" / "clam_dataset.csv").read_text().splitlines()[1] == "P1,P1__slideA"
    tri = tmp_path / "trident" / "20x_224px_0px_overlap" / "features_resnet50" / "slideB.h5"
    with h5py.File(tri, "r") as h:
        a = h["coords"].attrs
        assert (a["patch_size"], a["patch_size_level0"], a["target_magnification"], a["level0_magnification"]) \
            == (224, 448, 20.0, 40.0)
        assert a["name"] == "slideB"
    with h5py.File(tmp_path / "stamp" / "resnet50_trunc" / "slideB.h5", "r") as h:
        assert h["feats"].dtype == np.float16 and h.attrs["unit"] == "um" and h.attrs["extractor"] == "resnet50_trunc"
        assert h.attrs["tile_size_um"] == pytest.approx(112.0) and h.attrs["tile_size_px"] == 224
        src = open_store(store, "r").read_item("wsi", EID, "P2", "slideB")
        np.testing.assert_allclose(h["coords"][()], src.coords * 0.25)


def test_export_errors(tmp_path: Path, store: Path) -> None:
    """Changed with issue 15: an item without coords is refused (exit 1), no longer exported with a warning."""
    code, text = _run("export", "--format", "clam", "--store", tmp_path / "nope.zarr", "--out", tmp_path / "o")
    assert code == 2 and "no such feature store" in text
    open_store(store, "a").set_encoder_attrs("wsi", "other-enc", {"encoder": "x"})
    open_store(store, "a").write_item("wsi", "other-enc", "P1", "s", np.zeros((1, 4), np.float32))
    code, text = _run("export", "--format", "clam", "--store", store, "--out", tmp_path / "o")
    assert code == 2 and "--encoder-id" in text
    code, text = _run("export", "--format", "gigapath", "--store", store, "--out", tmp_path / "o",
                      "--encoder-id", EID)
    assert code == 2 and "unknown format" in text
    # STAMP needs the level-0 mpp for its micrometre coords: an item without it fails, named, exit 1
    open_store(store, "a").write_item("wsi", "other-enc", "P9", "t", np.zeros((2, 4), np.float32),
                                      np.zeros((2, 2), np.int64), {"mpp": 0.5, "patch_size": 224})
    code, text = _run("export", "--format", "stamp", "--store", store, "--out", tmp_path / "s",
                      "--encoder-id", "other-enc")
    assert code == 1 and "failed: P9/t" in text and "--mpp" in text
    code, text = _run("export", "--format", "stamp", "--store", store, "--out", tmp_path / "s",
                      "--encoder-id", "other-enc", "--mpp", "0.25")
    # issue 15 (F5): P1/s has no coords, which STAMP needs: refused by name (it was exit 0 with a warning)
    assert code == 1 and "failed: P1/s" in text and "missing coords" in text, text
    assert "failed: P9/t" not in text and (tmp_path / "s" / "x" / "t.h5").is_file()


def test_import_cli_reports_missing_and_usage_errors(tmp_path: Path, store: Path) -> None:
    out = tmp_path / "out"
    _run("export", "--format", "clam", "--store", store, "--out", out)
    manifest = tmp_path / "m.csv"
    manifest.write_text((out / "manifest.csv").read_text() + "P7,wsi,slides/lost.svs,lost\n")
    code, text = _run("import", "--format", "clam", "--from", out, "--manifest", manifest, "--store",
                      tmp_path / "s.zarr", "--no-progress")
    assert code == 1 and "missing: P7/lost" in text and "done 4" in text
    code, text = _run("import", "--format", "clam", "--from", out, "--manifest", manifest, "--store",
                      tmp_path / "s.zarr", "--encoder-id", "../evil", "--no-progress")
    assert code == 2 and "unsafe --encoder-id" in text


@pytest.mark.parametrize("fmt", ["clam", "trident", "stamp"])
def test_round_trip_gives_identical_items(tmp_path: Path, store: Path, fmt: str) -> None:
    """Issue 15 (F9): without --encoder-id the import gives back the same encoder_id, dtype (float16 stays
    float16 through CLAM's float32 files), features bit for bit and coords."""
    out = tmp_path / "out"
    assert _run("export", "--format", fmt, "--store", store, "--out", out, "--extractor-name", "uni")[0] == 0
    back = tmp_path / "back.zarr"
    code, text = _run("import", "--format", fmt, "--from", out, "--manifest", out / "manifest.csv", "--store", back,
                      "--no-progress")
    assert code == 0, text
    src, dst = open_store(store, "r"), open_store(back, "r")
    assert dst.encoders("wsi") == [EID]
    for pid, item, _ in ITEMS:
        a, b = src.read_item("wsi", EID, pid, item), dst.read_item("wsi", EID, pid, item)
        assert b.features.dtype == a.features.dtype == np.float16
        np.testing.assert_array_equal(b.features, a.features)
        np.testing.assert_array_equal(b.coords, a.coords)
        for k, v in TILE_ATTRS.items():
            if k != "level":
                assert b.attrs[k] == pytest.approx(v)


def test_clam_origin_round_trip_keeps_encoder_id(tmp_path: Path) -> None:
    """A CLAM import exported and imported again keeps its ``clam_features-...`` encoder_id (F9)."""
    src = tmp_path / "clam" / "h5_files"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    feats = {s: rng.normal(size=(4, 32)).astype(np.float32) for s in ("s1", "s2")}
    for s, f in feats.items():
        with h5py.File(src / f"{s}.h5", "w") as h:
            h["features"], h["coords"] = f, (np.arange(8).reshape(4, 2) * 256).astype(np.int32)
    (tmp_path / "m.csv").write_text("patient_id,modality,path\nA,wsi,s1.svs\nB,wsi,s2.svs\n")
    assert _run("import", "--format", "clam", "--from", tmp_path / "clam", "--manifest", tmp_path / "m.csv",
                "--store", tmp_path / "a.zarr", "--no-progress")[0] == 0
    (eid,) = open_store(tmp_path / "a.zarr", "r").encoders("wsi")
    assert eid.startswith("clam_features-")
    assert _run("export", "--format", "clam", "--store", tmp_path / "a.zarr", "--out", tmp_path / "x")[0] == 0
    code, text = _run("import", "--format", "clam", "--from", tmp_path / "x", "--manifest",
                      tmp_path / "x" / "manifest.csv", "--store", tmp_path / "b.zarr", "--no-progress")
    assert code == 0, text
    assert open_store(tmp_path / "b.zarr", "r").encoders("wsi") == [eid]
    item = open_store(tmp_path / "b.zarr", "r").read_item("wsi", eid, "A", "s1")
    assert item.features.dtype == np.float32
    np.testing.assert_array_equal(item.features, feats["s1"])


def test_export_refusals_name_item_and_field(tmp_path: Path) -> None:
    """Items the target tool could not read are refused by name (exit 1) and no file is written for them."""
    path = tmp_path / "s.zarr"
    st = open_store(path, "a")
    st.set_encoder_attrs("wsi", "enc", {"encoder": "imported:clam:unknown", "dim": 4})
    st.write_item("wsi", "enc", "P1", "a", np.zeros((2, 4), np.float32), np.zeros((2, 2), np.int64),
                  {"patch_size_level0": 256})
    code, text = _run("export", "--format", "trident", "--store", path, "--out", tmp_path / "t")
    assert code == 1 and "failed: P1/a" in text and "missing extractor name" in text and "--extractor-name" in text
    code, text = _run("export", "--format", "trident", "--store", path, "--out", tmp_path / "t",
                      "--extractor-name", "uni_v1")
    assert code == 1 and "failed: P1/a" in text and "level0_magnification" in text and "target_magnification" in text
    assert not list((tmp_path / "t").rglob("*.h5"))
    code, text = _run("export", "--format", "stamp", "--store", path, "--out", tmp_path / "s",
                      "--extractor-name", "uni")
    assert code == 1 and "slide_mpp" in text and "--mpp" in text
    code, text = _run("export", "--format", "stamp", "--store", path, "--out", tmp_path / "s",
                      "--extractor-name", "uni", "--mpp", "0.5")
    assert code == 0, text  # tile size from patch_size_level0 x mpp: 128 µm
    with h5py.File(tmp_path / "s" / "uni" / "a.h5", "r") as h:
        assert h.attrs["tile_size_um"] == 128.0
    code, text = _run("export", "--format", "stamp", "--store", path, "--out", tmp_path / "s",
                      "--extractor-name", "../x")
    assert code == 2 and "--extractor-name" in text


@pytest.fixture
def exported(tmp_path: Path, store: Path) -> Path:
    out = tmp_path / "out_trident"
    assert _run("export", "--format", "trident", "--store", store, "--out", out)[0] == 0
    return out


def test_import_force_into_a_read_only_store_stops_at_the_first_item(tmp_path: Path, exported: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25, item 11: the store's writes are refused (EROFS, injected at the first item's write): one failed
    item, one message with the fix, exit 2 (before: every item failed, one by one, exit 1)."""
    from mmcli.pipeline import faults

    back = tmp_path / "back.zarr"
    args = ("import", "--format", "trident", "--from", exported, "--manifest", exported / "manifest.csv",
            "--store", back, "--encoder-id", "ro", "--no-progress", "--force")
    assert _run(*args)[0] == 0
    faults._hits.clear()
    monkeypatch.setenv(faults.ENV, "store.staged:1:erofs")
    code, text = _run(*args)
    faults._hits.clear()
    assert code == 2, text
    assert text.count("read-only file system") == 3  # the failed item, its line in the summary, the stop line
    assert f"stopped: {back}: read-only file system: nothing can be written there. Fix: mount it read-write" in text
    assert "done 0, cached 0, failed 1, missing 0, locked 0, skipped 3" in text
    assert "Traceback" not in text


def test_import_force_on_a_read_only_mount(tmp_path: Path, exported: Path) -> None:
    """The same on a real read-only file system: a tmpfs holding the store, remounted read-only."""
    import subprocess

    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = ("import", "--format", "trident", "--from", exported, "--manifest", exported / "manifest.csv",
                "--store", mnt / "s.zarr", "--encoder-id", "ro", "--no-progress")
        assert _run(*args)[0] == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
        code, text = _run(*args, "--force")
        assert code == 2 and "Traceback" not in text, text
        assert [x for x in text.splitlines() if x.startswith("  failed: ")] == \
            [x for x in text.splitlines() if x.startswith("  failed: P1/slideA")]
        assert "stopped: " in text and "read-only file system: nothing can be written there" in text
        code, text = _run(*args)  # without --force: everything cached, nothing to write
        assert code == 0 and "cached 4" in text, text
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
