"""The WSI extractor: tiles only on tissue, blank slides, mpp at two magnifications, missing mpp, QC images,
options and encoder ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.slides import inside_ellipse, tissue_image, write_aperio, write_generic
from mmcli.features.runner import ItemError
from mmcli.features.wsi import make_spec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import ManifestRow

TINY = dict(encoder="timm:test_resnet", patch_size=32, mpp=1.0, batch_size=16, read_threads=2)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("wsi")
    return {
        "x20": write_aperio(d / "x20.svs", tissue_image(512, 384, 0.5, seed=4), 0.5, downsamples=(1, 4)),
        "x40": write_aperio(d / "x40.svs", tissue_image(512, 384, 0.25, seed=4), 0.25, downsamples=(1, 4)),
        "blank": write_generic(d / "blank.tif", tissue_image(512, 384, 0.5, blank=True), 0.5),
        "nompp": write_generic(d / "nompp.tif", tissue_image(512, 384, 0.5, seed=4), None),
    }


def _row(path: Path, pid: str = "P1") -> ManifestRow:
    return ManifestRow(pid, "wsi", path, path.stem, 2)


def _extract(path: Path, store: Path, **kw):
    spec = make_spec(store, **{**TINY, **kw})
    return spec, spec.build().extract(_row(path))


def test_tiles_only_on_tissue_and_qc(slides: dict[str, Path], tmp_path: Path) -> None:
    spec, res = _extract(slides["x20"], tmp_path / "s.zarr")
    n = res.features.shape[0]
    assert n > 10 and res.features.shape == (n, 96) and res.features.dtype == np.float16
    assert res.coords.shape == (n, 2) and res.coords.dtype == np.int64
    tile0 = res.attrs["patch_size_level0"]
    assert tile0 == 64 and res.attrs["level"] == 0 and res.attrs["read_size"] == 64
    centres = res.coords + tile0 / 2
    w, h = 1024, 768
    assert inside_ellipse(centres[:, 0], centres[:, 1], w, h, grow=1.1).all()  # no tile off the tissue
    # and the tissue is covered: every grid tile well inside the ellipse was kept
    gx, gy = np.meshgrid(np.arange(0, w - tile0 + 1, tile0), np.arange(0, h - tile0 + 1, tile0))
    inner = inside_ellipse(gx.ravel() + tile0 / 2, gy.ravel() + tile0 / 2, w, h, grow=0.8)
    kept = {tuple(c) for c in res.coords.tolist()}
    assert all((x, y) in kept for x, y, i in zip(gx.ravel(), gy.ravel(), inner) if i)
    assert np.isfinite(res.features.astype(np.float32)).all()
    a = res.attrs
    assert a["mpp"] == 1.0 and a["slide_mpp"] == 0.5 and a["mpp_source"] == "metadata" and a["n_tiles"] == n
    assert a["vendor"] == "aperio" and a["reader"] in ("openslide", "cucim")
    qc = Path(a["qc_png"])
    assert qc.is_file() and qc.parent.name == "P1" and f"{tmp_path / 's.zarr'}.qc" in str(qc)
    assert spec.encoder_id in str(qc)
    assert res.warnings == []
    # where the encode loop's time went: waiting on the reader threads + encoder compute fit in encode_seconds
    assert a["read_wait_seconds"] >= 0 and a["encoder_compute_seconds"] > 0 and a["read_cpu_seconds"] > 0
    assert a["read_wait_seconds"] + a["encoder_compute_seconds"] <= a["encode_seconds"] + 0.01


def test_blank_slide_zero_tiles_with_warning(slides: dict[str, Path], tmp_path: Path) -> None:
    _, res = _extract(slides["blank"], tmp_path / "s.zarr")
    assert res.features.shape == (0, 96) and res.coords.shape == (0, 2)
    assert any("no tissue" in w for w in res.warnings)


def test_two_magnifications_give_the_same_tiles(slides: dict[str, Path], tmp_path: Path) -> None:
    _, r20 = _extract(slides["x20"], tmp_path / "s.zarr")
    _, r40 = _extract(slides["x40"], tmp_path / "s.zarr")
    assert r40.attrs["slide_mpp"] == 0.25 and r40.attrs["patch_size_level0"] == 128
    assert r40.attrs["level"] == 1 and r40.attrs["read_size"] == 32  # 4x level read directly at 1 µm/px
    assert r20.attrs["level"] == 0 and r20.attrs["read_size"] == 64  # level 0 read at 64 px, resized to 32
    # same tissue in micrometres -> same tiles, level-0 coords scaled by the magnification
    assert np.array_equal(r40.coords, r20.coords * 2)
    f20, f40 = r20.features.astype(np.float32), r40.features.astype(np.float32)
    cos = (f20 * f40).sum(1) / np.linalg.norm(f20, axis=1) / np.linalg.norm(f40, axis=1)
    assert np.median(cos) > 0.9  # same content, differently scanned


def test_slide_without_mpp(slides: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ItemError, match=r"nompp\.tif.*--default-mpp"):
        _extract(slides["nompp"], tmp_path / "s.zarr")
    spec, res = _extract(slides["nompp"], tmp_path / "s.zarr", default_mpp=0.5)
    assert res.attrs["mpp_source"] == "--default-mpp" and res.features.shape[0] > 0
    assert any("--default-mpp" in w for w in res.warnings)
    assert spec.encoder_id == make_spec(tmp_path / "s.zarr", **TINY).encoder_id  # recorded per item instead


def test_encoder_id_covers_feature_parameters(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    base = make_spec(store, **TINY).encoder_id
    for change in (dict(mpp=0.5), dict(patch_size=64), dict(min_tissue=0.5), dict(tissue_threshold=0.2),
                   dict(seed=1), dict(min_tissue_area=0)):
        assert make_spec(store, **{**TINY, **change}).encoder_id != base, change
    for same in (dict(reader="tiffslide"), dict(batch_size=3), dict(device="cpu"),
                 dict(feature_dtype="float32"), dict(qc=False)):
        assert make_spec(store, **{**TINY, **same}).encoder_id == base, same
    assert base.startswith("timm_test_resnet-")
    # issue 27 item 8: the precision the encoder computes in is part of the id (bf16 and fp32 never mixed)
    fp32 = make_spec(store, **{**TINY, "precision": "fp32", "runtime": "torch"}).encoder_id
    assert make_spec(store, **{**TINY, "precision": "bf16", "runtime": "torch"}).encoder_id != fp32


@pytest.mark.parametrize("bad", [dict(mpp=0), dict(patch_size=4), dict(reader="bioformats"), dict(precision="int8"),
                                 dict(min_tissue=2), dict(device="tpu"), dict(feature_dtype="int8"),
                                 dict(encoder="r3d18"), dict(encoder="nope"), dict(weights="/no/such/file.pth")])
def test_bad_options_are_input_errors(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(InputError):
        make_spec(tmp_path / "s.zarr", **{**TINY, **bad})


def test_readers_and_float32_storage(slides: dict[str, Path], tmp_path: Path) -> None:
    _, a = _extract(slides["x20"], tmp_path / "s.zarr", reader="openslide", precision="fp32")
    _, b = _extract(slides["x20"], tmp_path / "s.zarr", reader="tiffslide", precision="fp32",
                    feature_dtype="float32", qc=False)
    assert b.features.dtype == np.float32 and b.attrs["qc_png"] is None and b.attrs["reader"] == "tiffslide"
    assert np.array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.features.astype(np.float32), b.features, rtol=2e-2, atol=2e-2)


def test_corrupt_slide_is_an_item_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 200)  # a TIFF header and nothing else
    with pytest.raises(ItemError, match="bad.svs"):
        _extract(bad, tmp_path / "s.zarr")
