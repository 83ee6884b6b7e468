"""QuPath GeoJSON export: a schema check of the FeatureCollection, shapely validity of every polygon, the
tissue outline equal to the union of the tiles (holes and diagonal neighbours included), scores as tile
measurements, and the CLI. The schema and the checks moved to ``helpers.geojson_check`` (unchanged) so that the demo
test (``tests/stages/test_demo.py``) validates its export with the same checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import box
from typer.testing import CliRunner

from helpers.geojson_check import check_feature_collection
from mmcli.cli import app
from mmcli.features.interop.geojson import feature_collection, tile_union
from mmcli.pipeline.store import open_store

_check = check_feature_collection


@pytest.mark.parametrize("seed", range(12))
def test_tissue_outline_is_the_exact_tile_union(seed: int) -> None:
    rng = np.random.default_rng(seed)
    grid = rng.random((9, 11)) < (0.3 + 0.05 * seed)
    grid[4, 5] = False  # likely a hole
    ys, xs = np.nonzero(grid)
    coords = np.c_[xs, ys] * 224 + [1000, 500]
    polys = tile_union(coords, 224)
    union = shapely.unary_union([box(x, y, x + 224, y + 224) for x, y in coords])
    mine = shapely.unary_union([shapely.Polygon(p[0], p[1:]) for p in polys])
    assert all(shapely.Polygon(p[0], p[1:]).is_valid for p in polys)
    assert mine.symmetric_difference(union).area == pytest.approx(0, abs=1e-6)
    parts = list(getattr(union, "geoms", [union]))
    assert len(polys) == len(parts)  # one polygon per connected part (corner-touching parts stay apart)
    assert sum(len(p) - 1 for p in polys) == sum(len(q.interiors) for q in parts)  # same holes


def test_diagonal_neighbours_and_holes() -> None:
    ring = [(x, y) for x in range(3) for y in range(3) if (x, y) != (1, 1)]  # a square ring: one hole
    polys = tile_union(np.array(ring) * 100, 100)
    assert len(polys) == 1 and len(polys[0]) == 2
    assert shapely.Polygon(polys[0][0], polys[0][1:]).area == 8 * 100 * 100
    diag = tile_union(np.array([[0, 0], [100, 100]]), 100)  # touching at one corner: two valid polygons
    assert len(diag) == 2 and all(shapely.Polygon(p[0]).is_valid for p in diag)
    overlapping = tile_union(np.array([[0, 0], [50, 0], [100, 0]]), 100)  # overlapping tiles, finer grid
    assert shapely.Polygon(overlapping[0][0]).area == 200 * 100


def test_feature_collection_with_scores() -> None:
    coords = np.array([[0, 0], [224, 0], [0, 224]])
    fc = feature_collection(coords, 224, {0: {"attention": 0.7, "risk": 1.5}, 2: {"attention": 0.1}}, "s1")
    tissue, tiles = _check(fc)
    assert len(tissue) == 1 and tissue[0][1]["classification"]["name"] == "Tissue"
    assert tissue[0][0].area == 3 * 224 * 224
    assert [t[1]["measurements"].get("attention") for t in tiles] == [0.7, None, 0.1]
    assert tiles[0][1]["measurements"] == {"tile_index": 0, "attention": 0.7, "risk": 1.5}
    assert tiles[1][0].bounds == (224, 0, 448, 224)


def test_cli_export_geojson(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    st = open_store(store, "a")
    xs, ys = np.meshgrid(np.arange(0, 1024, 128), np.arange(0, 768, 128))
    coords = np.c_[xs.ravel(), ys.ravel()]
    st.write_item("wsi", "enc", "P1", "a", np.zeros((len(coords), 4), np.float32), coords,
                  {"patch_size": 128, "mpp": 0.5, "slide_mpp": 0.5, "source_fingerprint": {"path": "/x/TCGA-9.svs"}})
    st.write_item("wsi", "enc", "P2", "b", np.zeros((2, 4), np.float32), None, {})
    pd.DataFrame({"patient_id": "P1", "item_id": "a", "index": range(len(coords)),
                  "attention": np.linspace(0, 1, len(coords))}).to_csv(tmp_path / "attention.csv", index=False)
    res = CliRunner().invoke(app, ["export", "--format", "geojson", "--store", str(store), "--out",
                                   str(tmp_path / "qp"), "--scores", str(tmp_path / "attention.csv")])
    assert res.exit_code == 1 and "failed: P2/b" in res.output and "coords" in res.output  # no coords: named
    fc = json.loads((tmp_path / "qp" / "TCGA-9.geojson").read_text())  # named by the slide stem
    tissue, tiles = _check(fc)
    assert len(tiles) == len(coords) and tiles[-1][1]["measurements"]["attention"] == pytest.approx(1.0)
    assert len(tissue) == 1 and tissue[0][0].equals(box(0, 0, 1024, 768))
    res = CliRunner().invoke(app, ["export", "--format", "geojson", "--store", str(store), "--out",
                                   str(tmp_path / "qp"), "--scores", str(tmp_path / "nope.csv")])
    assert res.exit_code == 2 and "--scores" in res.output
    res = CliRunner().invoke(app, ["export", "--format", "clam", "--store", str(store), "--out",
                                   str(tmp_path / "c"), "--scores", str(tmp_path / "attention.csv")])
    assert res.exit_code == 2 and "--format geojson" in res.output


def test_object_ids_are_stable_uuids(tmp_path: Path) -> None:
    """Issue 27 item 14: every object id is a UUID (QuPath replaces any other id on import), the same on a
    re-export of the same item, different for another item."""
    import uuid

    coords = np.array([[0, 0], [224, 0], [0, 224]])
    a = feature_collection(coords, 224, name="s1", scope="wsi/enc/P1/s1")
    ids = [f["id"] for f in a["features"]]
    assert all(str(uuid.UUID(i)) == i for i in ids) and len(set(ids)) == len(ids)
    assert ids == [f["id"] for f in feature_collection(coords, 224, name="s1", scope="wsi/enc/P1/s1")["features"]]
    other = {f["id"] for f in feature_collection(coords, 224, name="s1", scope="wsi/enc/P2/s1")["features"]}
    assert not other & set(ids)
    store = tmp_path / "s.zarr"
    open_store(store, "a").write_item("wsi", "enc", "P1", "a", np.zeros((3, 4), np.float32), coords,
                                      {"patch_size_level0": 224})
    for out in ("q1", "q2"):
        assert CliRunner().invoke(app, ["export", "--format", "geojson", "--store", str(store), "--out",
                                        str(tmp_path / out)]).exit_code == 0
    assert (tmp_path / "q1" / "a.geojson").read_text() == (tmp_path / "q2" / "a.geojson").read_text()
    assert uuid.UUID(json.loads((tmp_path / "q1" / "a.geojson").read_text())["features"][0]["id"])
