"""High-resolution heatmaps (issue 29 item 4, ``mmcli export --format heatmap``): the overlapping tile grid, the
per-pixel mean of the covering tiles (against a brute-force recomputation), the pyramidal OME-TIFF read back with
tifffile, and end to end on a fitted attention_mil run: with overlap 0 at one pixel per tile the scores are
exactly the attention ``mmcli predict --attention`` gives; with overlap the map is finer than the tiles."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from mmcli.pipeline.errors import InputError
from mmcli.stages.heatmap import (
    HeatmapOptions,
    average_scores,
    export_heatmaps,
    overlapping_tiles,
    write_pyramid,
)

SIZE = 64


def _block(nx: int, ny: int, x0: int = 128, y0: int = 64) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(nx) * SIZE + x0, np.arange(ny) * SIZE + y0)
    return np.c_[xs.ravel(), ys.ravel()]


def test_overlap_zero_is_the_stored_grid() -> None:
    stored = _block(5, 4)
    stored = stored[np.random.default_rng(0).permutation(len(stored))[:15]]  # a ragged tissue shape
    got = overlapping_tiles(stored, SIZE, 0.0)
    assert {tuple(c) for c in got} == {tuple(c) for c in stored}


@pytest.mark.parametrize("overlap,per_pixel", [(0.5, 4), (0.75, 16)])
def test_overlapping_grid_covers_each_inner_pixel_k_times(overlap: float, per_pixel: int) -> None:
    stored = _block(6, 5)
    got = overlapping_tiles(stored, SIZE, overlap)
    stride = round(SIZE * (1 - overlap))
    assert set(np.unique(np.diff(np.unique(got[:, 0])))) == {stride}
    centres = got + SIZE // 2
    on = [any(sx <= cx < sx + SIZE and sy <= cy < sy + SIZE for sx, sy in stored) for cx, cy in centres]
    assert all(on)  # every grid tile is centred on tissue
    # pixel coverage inside the block, away from its border: 1 / (1 - overlap)^2 tiles
    cover = np.zeros((5 * SIZE + 64, 6 * SIZE + 128), int)
    for x, y in got:
        cover[y:y + SIZE, x:x + SIZE] += 1
    inner = cover[64 + SIZE:64 + 4 * SIZE, 128 + SIZE:128 + 5 * SIZE]
    assert (inner == per_pixel).all()


def test_average_scores_is_the_mean_of_the_covering_tiles() -> None:
    """Against a brute force: each output pixel's level-0 square, and the mean score of every tile whose footprint
    overlaps it; NaN where none does."""
    rng = np.random.default_rng(3)
    coords = rng.integers(0, 600, (40, 2))
    scores = rng.random(40)
    box, d = (50, 30, 500, 420), 7.0
    got = average_scores(coords, SIZE, scores, box, d)
    H, W = int(np.ceil(420 / d)), int(np.ceil(500 / d))
    assert got.shape == (H, W)
    want = np.full((H, W), np.nan)
    for r in range(H):
        for c in range(W):
            px0, py0 = box[0] + c * d, box[1] + r * d
            hit = ((coords[:, 0] < px0 + d) & (coords[:, 0] + SIZE > px0)
                   & (coords[:, 1] < py0 + d) & (coords[:, 1] + SIZE > py0))
            if hit.any():
                want[r, c] = scores[hit].mean()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_pyramid_is_an_ome_tiff_with_halving_levels(tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((2100, 1100, 3)) * 255).astype(np.uint8)
    path = write_pyramid(tmp_path / "h.ome.tif", rgb, mpp=2.0)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(2100, 1100, 3), (1050, 550, 3), (525, 275, 3)]  # down to 256 px
        np.testing.assert_array_equal(levels[0].asarray(), rgb)
        assert tf.pages[0].is_tiled and tf.pages[0].tilewidth == 256
        ome = tf.ome_metadata
    assert 'PhysicalSizeX="2.0"' in ome and 'PhysicalSizeXUnit="µm"' in ome


@pytest.mark.parametrize("given,match", [({"overlap": 0.99}, "--overlap 0.99"), ({"region": "1,2,3"}, "four integers"),
                                         ({"cmap": "nope"}, "colour map"), ({"heatmap_mpp": 0}, "--heatmap-mpp 0")])
def test_options_are_checked(given: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        HeatmapOptions.build(given)


# ---- end to end on a fitted run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mmcli.stages.extract import extract
    from mmcli.stages.fit import fit
    from mmcli.stages.synth import synth

    d = tmp_path_factory.mktemp("heatmap")
    cohort = synth(d / "cohort", patients=12, seed=0, workers=2)
    store = d / "s.zarr"
    summary = extract("wsi", cohort.manifest, store, encoder="timm:test_resnet", patch_size=32, mpp=4.0,
                      precision="fp32", runtime="torch", progress=False)
    assert summary.exit_code == 0, summary.lines()
    run = d / "run"
    fit("attention_mil", store, cohort.labels, run, target="subtype", folds=2, params={"epochs": 2}, n_boot=20,
        drop_unmatched=True)
    return {"dir": d, "store": store, "run": run, "manifest": pd.read_csv(cohort.manifest, dtype=str)}


@pytest.mark.slow
def test_overlap_zero_one_pixel_per_tile_gives_predicts_attention(fitted: dict) -> None:
    from mmcli.pipeline.store import open_store
    from mmcli.stages.predict import predict

    man = fitted["manifest"]
    slides = man[man["modality"] == "wsi"].groupby("patient_id")["item_id"].agg(list)
    pid = next(p for p, items in slides.items() if len(items) == 1)  # one slide: its bag is the patient's bag
    item = slides[pid][0]
    fs = open_store(fitted["store"], "r")
    eid = fs.encoders("wsi")[0]
    it = fs.read_item("wsi", eid, pid, item)
    size0, slide_mpp = it.attrs["patch_size_level0"], it.attrs["slide_mpp"]
    x0, y0 = it.coords.min(axis=0)
    x1, y1 = it.coords.max(axis=0) + size0
    opts = HeatmapOptions(overlap=0.0, heatmap_mpp=size0 * slide_mpp, normalise="raw", heatmap_formats=["tiff"],
                          region=f"{x0},{y0},{x1 - x0},{y1 - y0}")
    out = fitted["dir"] / "hm0"
    summary = export_heatmaps(fitted["run"], out, items=[f"{pid}/{item}"], options=opts)
    assert summary.exit_code == 0, summary.failed
    scores = tifffile.imread(out / pid / f"{item}.scores.tif")
    predict(fitted["run"], fitted["store"], fitted["dir"] / "pred.csv", attention=True)
    att = pd.read_csv(fitted["dir"] / "pred.attention.csv", dtype={"patient_id": str, "item_id": str})
    att = att[(att["patient_id"] == pid) & (att["item_id"] == item)].sort_values("index")
    assert len(att) == len(it.coords)
    got = [scores[(y - y0) // size0, (x - x0) // size0] for x, y in it.coords]
    np.testing.assert_allclose(got, att["attention"].to_numpy(), rtol=1e-4, atol=1e-6)
    assert np.isnan(scores).sum() == scores.size - len(it.coords)  # no tile, no score


@pytest.mark.slow
def test_overlapping_heatmap_files(fitted: dict) -> None:
    out = fitted["dir"] / "hm"
    summary = export_heatmaps(fitted["run"], out, options=HeatmapOptions(overlap=0.5, heatmap_mpp=2.0))
    assert summary.exit_code == 0 and len({s["patient_id"] for s in summary.slides}) == 3
    s = summary.slides[0]
    assert s["tiles"] > 3 * s["stored_tiles"]  # about 4x the tiles at overlap 0.5
    stem = out / s["patient_id"] / s["item_id"]
    with Image.open(stem.with_name(f"{s['item_id']}.heatmap.png")) as im:
        assert im.size == (s["width"], s["height"])
    scores = tifffile.imread(stem.with_name(f"{s['item_id']}.scores.tif"))
    finite = scores[np.isfinite(scores)]
    assert finite.min() > 0 and finite.max() <= 1  # within-slide percentiles
    assert len(np.unique(finite)) > s["stored_tiles"]  # overlapping tiles averaged: finer than the tile grid
    info = json.loads(stem.with_name(f"{s['item_id']}.heatmap.json").read_text())
    assert info["downsample"] == pytest.approx(2.0 / info["slide_mpp"]) and info["tiles"] == s["tiles"]
    assert info["overlap"] == 0.5 and info["encoder_id"]
    bad = export_heatmaps(fitted["run"], fitted["dir"] / "hm_bad", items=["nobody/x"], options=HeatmapOptions())
    assert bad.exit_code == 1 and bad.failed[0][0] == "nobody/x"


def test_cli_heatmap_flags_go_with_the_heatmap_format(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcli.cli import app

    r = CliRunner().invoke(app, ["export", "--format", "clam", "--store", str(tmp_path / "s.zarr"), "--out",
                                 str(tmp_path / "o"), "--overlap", "0.3"])
    assert r.exit_code == 2 and "--overlap go(es) with --format heatmap" in r.output
    r = CliRunner().invoke(app, ["export", "--format", "heatmap", "--store", str(tmp_path / "s.zarr"), "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "needs --run" in r.output


@pytest.mark.slow
def test_cli_export_format_heatmap(fitted: dict) -> None:
    from typer.testing import CliRunner

    from mmcli.cli import app

    out = fitted["dir"] / "hm_cli"
    r = CliRunner().invoke(app, ["export", "--format", "heatmap", "--store", str(fitted["store"]), "--run",
                                 str(fitted["run"]), "--out", str(out), "--overlap", "0.75", "--heatmap-mpp", "4",
                                 "--heatmap-formats", "png", "--cmap", "magma"])
    assert r.exit_code == 0, r.output
    pngs = sorted(out.rglob("*.heatmap.png"))
    assert pngs and not list(out.rglob("*.tif"))
    info = json.loads(pngs[0].with_name(pngs[0].name.replace(".png", ".json")).read_text())
    assert info["overlap"] == 0.75 and info["cmap"] == "magma" and info["heatmap_mpp"] == 4
