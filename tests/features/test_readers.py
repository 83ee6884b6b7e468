"""Slide readers: one interface, same geometry, mpp and pixels (within JPEG tolerance) from every backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.slides import tissue_image, write_aperio, write_generic
from mmcli.features.readers import (
    READER_NAMES,
    READERS,
    SlideError,
    cucim_available,
    open_slide,
    reader_order,
    tiff_mpp,
)

AVAILABLE = ["openslide", "tiffslide"] + (["cucim"] if cucim_available() else [])


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("readers")
    img = tissue_image(512, 384, 0.5, seed=3)
    return {
        "aperio": write_aperio(d / "a.svs", img, 0.5, downsamples=(1, 4)),
        "generic": write_generic(d / "g.tif", img, 0.5, downsamples=(1, 2, 4)),
        "nompp": write_generic(d / "n.tif", img, None, downsamples=(1, 2)),
    }


@pytest.mark.parametrize("kind", ["aperio", "generic"])
@pytest.mark.parametrize("name", [n for n in AVAILABLE if n != "openslide"])
def test_readers_agree_with_openslide(slides: dict[str, Path], kind: str, name: str) -> None:
    with open_slide(slides[kind], "openslide") as ref, open_slide(slides[kind], name) as other:
        assert other.name == name
        assert other.level_dimensions == ref.level_dimensions
        assert np.allclose(other.level_downsamples, ref.level_downsamples, rtol=1e-3)
        assert other.mpp == pytest.approx(ref.mpp) == pytest.approx(0.5)
        rng = np.random.default_rng(0)
        for level in range(ref.level_count):
            lw, lh = ref.level_dimensions[level]
            ds = ref.level_downsamples[level]
            for _ in range(4):
                x, y = int(rng.integers(0, lw - 64) * ds), int(rng.integers(0, lh - 64) * ds)
                a = ref.read_region(x, y, level, 64, 64).astype(int)
                b = other.read_region(x, y, level, 64, 64).astype(int)
                assert a.shape == b.shape == (64, 64, 3) and a.dtype == b.dtype
                diff = np.abs(a - b)
                assert diff.mean() < 2.0 and diff.max() <= 48, (level, x, y, diff.mean(), diff.max())
        ta, _ = ref.thumbnail(8.0)
        tb, _ = other.thumbnail(8.0)
        assert ta.shape == tb.shape and np.abs(ta.astype(int) - tb).mean() < 2.0


def test_aperio_metadata(slides: dict[str, Path]) -> None:
    with open_slide(slides["aperio"], "openslide") as s:
        assert s.vendor == "aperio" and s.objective_power == 20 and s.mpp == pytest.approx(0.5)
        assert s.level_count == 2 and s.level_downsamples[1] == pytest.approx(4.0)
        info = s.info()
        assert info["reader"] == "openslide" and info["level0_size"] == [1024, 768]


def test_mpp_from_tiff_tags_and_missing(slides: dict[str, Path], tmp_path: Path) -> None:
    assert tiff_mpp(slides["generic"]) == pytest.approx(0.5)
    assert tiff_mpp(slides["nompp"]) is None
    for name in AVAILABLE:
        with open_slide(slides["nompp"], name) as s:
            assert s.mpp is None
    # 72 dpi is what many writers put in the tags by default: a placeholder, not a scan resolution
    import tifffile

    p = tmp_path / "dpi.tif"
    tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    assert tiff_mpp(p) is None


def test_thumbnail_in_strips_equals_one_read(slides: dict[str, Path]) -> None:
    with open_slide(slides["generic"], "openslide") as s:
        whole, scale = s.thumbnail(4.0)
        strips, scale2 = s.thumbnail(4.0, strip_pixels=256 * 10)  # 10-row strips of level 2
        assert whole.shape == (192, 256, 3) and scale == scale2 == (4.0, 4.0)
        assert np.abs(whole.astype(int) - strips).mean() < 1.0


def test_open_errors(slides: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_slide(tmp_path / "nope.svs")
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(SlideError, match="bad.svs"):
        open_slide(bad)
    with pytest.raises(ValueError, match="unknown reader"):
        open_slide(slides["aperio"], "bioformats")


def test_auto_order() -> None:
    """The reader set is read from the registry (``READERS.names()``; it was a dict before)."""
    order = reader_order("auto")
    assert order[-2:] == ["openslide", "tiffslide"]
    assert (order[0] == "cucim") == cucim_available()
    assert set(READERS.names()) == {"openslide", "cucim", "tiffslide"}
    assert READER_NAMES == ("cucim", "openslide", "tiffslide")  # the order auto tries them in


@pytest.mark.skipif(not cucim_available(), reason="cuCIM not installed (optional extra mmcli[cucim])")
def test_cucim_batched_reads_match_single(slides: dict[str, Path]) -> None:
    with open_slide(slides["aperio"], "cucim") as s:
        coords = np.array([[0, 0], [256, 128], [512, 256]])
        batch = list(s.read_regions(coords, 0, 64, 64))
        for (x, y), tile in zip(coords, batch):
            assert np.array_equal(np.asarray(tile), s.read_region(int(x), int(y), 0, 64, 64))
