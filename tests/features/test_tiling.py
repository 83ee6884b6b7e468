"""mpp-aware tile planning (level choice, level-0 coords, tissue fraction) and the streaming tile reader."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.slides import tissue_image, write_aperio
from mmcli.features.readers import SlideError, open_slide, slide_opener
from mmcli.features.tiling import (
    choose_level,
    grid,
    iter_tile_batches,
    plan_tiles,
    tissue_fractions,
)


def test_choose_level() -> None:
    ds = (1.0, 4.0, 16.0)
    assert [choose_level(ds, d) for d in (0.5, 1.0, 2.0, 3.9, 4.0, 8.0, 16.0, 64.0)] == [0, 0, 0, 0, 1, 1, 2, 2]
    assert choose_level((1.0, 4.0004), 4.0) == 1  # pyramid rounding


@pytest.mark.parametrize(("slide_mpp", "target", "level", "read", "tile0"), [
    (0.5, 0.5, 0, 224, 224),  # 20x slide, 20x tiles: level 0, no resize
    (0.25, 0.5, 0, 448, 448),  # 40x slide, 20x tiles: read 448 at level 0, resize to 224
    (0.25, 1.0, 1, 224, 896),  # 40x slide, 10x tiles: level 1 (4x) is exactly right
    (0.25, 2.0, 1, 448, 1792),  # 5x tiles from the 4x level
    (0.5, 0.25, 0, 112, 112),  # finer than the scan: upsampled
])
def test_plan_levels_at_two_magnifications(slide_mpp: float, target: float, level: int, read: int,
                                           tile0: int) -> None:
    dims = ((40_000, 30_000), (10_000, 7_500), (2_500, 1_875))
    plan = plan_tiles(dims, (1.0, 4.0, 16.0), slide_mpp, target, 224)
    assert (plan.level, plan.read_size, plan.patch_size_level0) == (level, read, tile0)
    assert plan.upsampled == (target < slide_mpp)
    assert plan.n == (40_000 // tile0) * (30_000 // tile0)
    assert plan.coords.dtype == np.int64 and (plan.coords % tile0 == 0).all()
    assert plan.attrs()["target_magnification"] == pytest.approx(10 / target)


def test_grid_whole_tiles_only() -> None:
    g = grid((1000, 500), 224)
    assert g.shape == (4 * 2, 2) and g[:, 0].max() + 224 <= 1000 and g[:, 1].max() + 224 <= 500
    assert g[1].tolist() == [224, 0]  # row-major


def test_tissue_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((50, 80)) < 0.4
    scale = (8.0, 8.0)
    coords = grid((640, 400), 64)
    frac = tissue_fractions(mask, scale, coords, 64)
    for (x, y), f in zip(coords, frac):
        assert f == pytest.approx(mask[y // 8:(y + 64) // 8, x // 8:(x + 64) // 8].mean())


def test_min_tissue_filters_tiles() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :3] = True  # left 30 % of the slide
    dims = ((1000, 1000),)
    all_tiles = plan_tiles(dims, (1.0,), 0.5, 0.5, 100, mask, (100.0, 100.0), min_tissue=0.0)
    assert all_tiles.n == 30 and (all_tiles.coords[:, 0] < 300).all()
    half = plan_tiles(dims, (1.0,), 0.5, 0.5, 150, mask, (100.0, 100.0), min_tissue=0.5)
    assert half.n > 0 and (half.tissue >= 0.5).all() and (half.coords[:, 0] + 150 <= 300 + 50).all()
    none = plan_tiles(dims, (1.0,), 0.5, 0.5, 100, np.zeros((10, 10), bool), (100.0, 100.0))
    assert none.n == 0 and none.coords.shape == (0, 2)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_aperio(tmp_path_factory.mktemp("tiling") / "s.svs", tissue_image(512, 384, 0.25, seed=2), 0.25,
                        downsamples=(1, 4))


def test_stream_equals_direct_reads(slide: Path) -> None:
    with open_slide(slide) as r:
        plan = plan_tiles(r.level_dimensions, r.level_downsamples, 0.25, 0.5, 32)  # read 64 at level 0 -> 32
        assert plan.read_size == 64 and plan.n == 32 * 24
        expected = [np.asarray(Image.fromarray(r.read_region(int(x), int(y), 0, 64, 64)).resize((32, 32),
                               Image.BILINEAR)) for x, y in plan.coords[:150]]
    sub = plan.__class__(**{**plan.__dict__, "coords": plan.coords[:150], "tissue": plan.tissue[:150]})
    got, starts = [], []
    stats: dict[str, float] = {}
    for start, batch in iter_tile_batches(slide_opener(slide, "openslide"), sub, batch_size=16, threads=3,
                                          stats=stats):
        assert batch.dtype == np.uint8 and batch.shape[1:] == (32, 32, 3)
        starts.append(start)
        got.extend(batch)
    assert starts == list(range(0, 150, 16))
    assert np.array_equal(np.stack(got), np.stack(expected))
    # the reader threads' time is accounted: decoding 150 tiles costs CPU, never more than the threads' wall time
    assert 0 < stats["read_cpu_s"] <= stats["read_wall_s"] * 1.05 + 0.01


class _SlowReader:
    """Counts concurrent batches in flight and open/closed handles."""

    live = 0
    peak = 0
    started = 0
    opened = 0
    closed = 0
    lock = threading.Lock()

    def read_regions(self, coords, level, w, h):
        with self.lock:
            _SlowReader.started += 1
            _SlowReader.live += 1
            _SlowReader.peak = max(_SlowReader.peak, _SlowReader.live)
        time.sleep(0.01)
        with self.lock:
            _SlowReader.live -= 1
        for x, _ in coords:
            if x < 0:
                raise SlideError("corrupt tile")
            yield np.zeros((h, w, 3), np.uint8)

    def close(self) -> None:
        _SlowReader.closed += 1


def _opener() -> _SlowReader:
    _SlowReader.opened += 1
    return _SlowReader()


def test_stream_is_bounded_and_closes_readers() -> None:
    coords = grid((64 * 100, 64 * 10), 64)
    plan = plan_tiles(((6400, 640),), (1.0,), 0.5, 0.5, 64)
    assert plan.n == len(coords) == 1000
    consumed = 0
    # room for 3 batches: at most 3 decoded batches wait beyond the one being consumed
    stream = iter_tile_batches(_opener, plan, batch_size=10, threads=4, max_bytes=10 * 64 * 64 * 3 * 3)
    for batches, (_start, batch) in enumerate(stream, start=1):
        consumed += len(batch)
        time.sleep(0.002)  # a slow consumer: readers must not run away
        assert _SlowReader.started - batches <= 3
    assert consumed == 1000
    assert _SlowReader.peak <= 4 and _SlowReader.opened <= 4 and _SlowReader.closed == _SlowReader.opened


def test_stream_propagates_read_errors() -> None:
    plan = plan_tiles(((640, 64),), (1.0,), 0.5, 0.5, 64)
    bad = plan.__class__(**{**plan.__dict__, "coords": np.array([[0, 0], [-64, 0]], np.int64),
                            "tissue": np.ones(2, np.float32)})
    with pytest.raises(SlideError, match="corrupt"):
        list(iter_tile_batches(_opener, bad, batch_size=1, threads=2))
