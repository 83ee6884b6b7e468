"""Annotations in (``--tissue-geojson``, ``--geojson-classes``): QuPath and TRIDENT GeoJSON layouts, polygons with
holes and multipolygons, class filters; tiles only inside, checked against an independent point-in-polygon."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.qc_slides import write_qc_slide
from mmcli.features.qc.annotations import AnnotationError, read_annotation
from mmcli.features.qc.record import OUTSIDE, load_record
from mmcli.features.runner import ItemError
from mmcli.features.wsi import make_spec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import ManifestRow
from mmcli.stages.extract import extract

QC = dict(encoder="timm:test_resnet", patch_size=64, mpp=0.5, batch_size=32, read_threads=2)
TILE = 64
# level-0 rings (x, y): a tumour polygon with a hole, a second tumour piece (MultiPolygon), a stroma polygon
OUTER = [[200, 180], [1000, 200], [1050, 820], [240, 860], [200, 180]]
HOLE = [[450, 400], [700, 400], [700, 620], [450, 620], [450, 400]]
PIECE = [[1150, 250], [1390, 250], [1390, 500], [1150, 500], [1150, 250]]
STROMA = [[1100, 600], [1400, 600], [1400, 880], [1100, 880], [1100, 600]]


def _qupath(classes: tuple[str, str, str] = ("Tumor", "Tumor", "Stroma")) -> dict:
    """A FeatureCollection as QuPath 0.4+ exports it (objectType, classification name + color)."""
    def feat(geom: dict, cls: str) -> dict:
        return {"type": "Feature", "id": "5f0c8f0e-7d1b-4b7a-9d53-2f1f3c9a1b11", "geometry": geom,
                "properties": {"objectType": "annotation", "classification": {"name": cls, "color": [200, 0, 0]}}}
    return {"type": "FeatureCollection", "features": [
        feat({"type": "Polygon", "coordinates": [OUTER, HOLE]}, classes[0]),
        feat({"type": "MultiPolygon", "coordinates": [[PIECE]]}, classes[1]),
        feat({"type": "Polygon", "coordinates": [STROMA]}, classes[2]),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
    ]}


def _in_ring(x: float, y: float, ring: list) -> bool:
    """Ray casting (even-odd), independent of shapely."""
    inside = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _in_tumour(x: float, y: float) -> bool:
    return (_in_ring(x, y, OUTER) and not _in_ring(x, y, HOLE)) or _in_ring(x, y, PIECE)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qc_slide(tmp_path_factory.mktemp("ann") / "S1.svs", seed=2).path


def _extract(slide: Path, store: Path, **kw):
    spec = make_spec(store, **QC, **kw)
    return spec, spec.build().extract(ManifestRow("P1", "wsi", slide, slide.stem, 2))


def test_tiles_only_inside_the_tumour_annotation(slide: Path, tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "S1.geojson").write_text(json.dumps(_qupath()))
    plain, r0 = _extract(slide, tmp_path / "s.zarr")
    spec, r1 = _extract(slide, tmp_path / "s.zarr", tissue_geojson=str(ann), geojson_classes="Tumor")
    assert spec.encoder_id != plain.encoder_id
    centre = TILE / 2
    inside = np.array([_in_tumour(x + centre, y + centre) for x, y in r1.coords])
    assert len(r1.coords) >= 30 and inside.all()  # every tile centre lies inside the Tumor regions
    default_there = [tuple(c) for c in r0.coords.tolist() if _in_tumour(c[0] + centre, c[1] + centre)]
    kept = {tuple(c) for c in r1.coords.tolist()}
    assert sum(c in kept for c in default_there) >= 0.8 * len(default_there)
    # none in the hole, none in the stroma (filtered by class), some in the second piece
    assert not any(_in_ring(x + centre, y + centre, HOLE) for x, y in r1.coords)
    assert not any(_in_ring(x + centre, y + centre, STROMA) for x, y in r1.coords)
    assert any(_in_ring(x + centre, y + centre, PIECE) for x, y in r1.coords)
    a = r1.attrs["annotation"]
    assert a["features"] == 2 and a["classes_filter"] == ["Tumor"] and a["classes_found"] == ["Stroma", "Tumor"]
    arrays, meta = load_record(r1.attrs["tile_qc"]["record"])
    assert meta["outside_annotation"] == int((arrays["code"] == OUTSIDE).sum()) == len(r0.coords) - len(r1.coords)
    # all classes: the stroma tiles come back
    _, r2 = _extract(slide, tmp_path / "s.zarr", tissue_geojson=str(ann))
    assert any(_in_ring(x + centre, y + centre, STROMA) for x, y in r2.coords)


def test_an_edited_annotation_is_another_encoder_id(tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "S1.geojson").write_text(json.dumps(_qupath()))
    a = make_spec(tmp_path / "s.zarr", **QC, tissue_geojson=str(ann)).encoder_id
    (ann / "S1.geojson").write_text(json.dumps(_qupath(("Tumor", "Stroma", "Stroma"))))
    b = make_spec(tmp_path / "s.zarr", **QC, tissue_geojson=str(ann)).encoder_id
    c = make_spec(tmp_path / "s.zarr", **QC, tissue_geojson=str(ann), geojson_classes="Tumor").encoder_id
    assert len({a, b, c}) == 3


def test_layouts_qupath_list_single_feature_and_trident(tmp_path: Path) -> None:
    doc = _qupath()
    variants = {
        "list": doc["features"],  # QuPath with "export as FeatureCollection" off
        "feature": doc["features"][0],
        "geometry": doc["features"][0]["geometry"],
        # TRIDENT's contours_geojson (geopandas): tissue_id, no classification, a crs member
        "trident": {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:3857"}},
                    "features": [{"type": "Feature", "properties": {"tissue_id": 0},
                                  "geometry": {"type": "Polygon", "coordinates": [OUTER, HOLE]}}]},
        "old_qupath": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [OUTER]},
                        "properties": {"classification": "Tumor"}}],
    }
    for name, d in variants.items():
        p = tmp_path / f"{name}.geojson"
        p.write_text(json.dumps(d))
        a = read_annotation(p)
        assert a.n_features >= 1 and a.contains_centres(np.array([[300, 300]]), 0)[0], name
        assert not a.contains_centres(np.array([[1500, 100]]), 0)[0], name
    tri = read_annotation(tmp_path / "trident.geojson")
    assert not tri.contains_centres(np.array([[575, 510]]), 0)[0]  # in the hole
    assert read_annotation(tmp_path / "old_qupath.geojson", ("Tumor",)).n_features == 1
    assert read_annotation(tmp_path / "trident.geojson", ("Tumor",)).n_features == 0


def test_bad_or_missing_annotation_fails_that_slide_by_name(slide: Path, tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "S1.geojson").write_text("{not json")
    with pytest.raises(AnnotationError, match="S1.geojson: not readable GeoJSON"):
        read_annotation(ann / "S1.geojson")
    with pytest.raises(ItemError, match="S1.geojson"):
        _extract(slide, tmp_path / "s.zarr", tissue_geojson=str(ann))
    # a cohort: the slide without an annotation fails by name, the annotated one is done
    other = write_qc_slide(tmp_path / "S2.svs", 512, 512, seed=4, margin=64).path
    (ann / "S1.geojson").unlink()
    (ann / "S2.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [512, 0], [512, 512],
                                                                                    [0, 512], [0, 0]]]}))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"patient_id,modality,path,item_id\nP1,wsi,{slide},S1\nP2,wsi,{other},S2\n")
    s = extract("wsi", manifest, tmp_path / "c.zarr", progress=False, tissue_geojson=str(ann), **QC)
    by = {o.item_id: o for o in s.outcomes}
    assert by["S1"].status == "failed" and "S1.geojson: no annotation file" in by["S1"].reason
    assert by["S2"].status == "done" and by["S2"].n > 0


def test_no_polygon_of_the_class_warns_and_stores_zero_tiles(slide: Path, tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "S1.geojson").write_text(json.dumps(_qupath()))
    _, r = _extract(slide, tmp_path / "s.zarr", tissue_geojson=str(ann), geojson_classes="Necrosis")
    assert len(r.coords) == 0 and any("no polygon of class Necrosis" in w and "Stroma, Tumor" in w
                                      for w in r.warnings)


def test_geojson_flags_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--tissue-geojson .*not a folder"):
        make_spec(tmp_path / "s.zarr", **QC, tissue_geojson=str(tmp_path / "nope"))
    with pytest.raises(InputError, match="--geojson-classes"):
        make_spec(tmp_path / "s.zarr", **QC, geojson_classes="Tumor")
