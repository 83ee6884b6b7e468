"""Annotations in: QuPath / TRIDENT GeoJSON regions that restrict a slide's tiles.

``--tissue-geojson DIR`` reads ``DIR/<slide stem>.geojson``: coordinates in level-0 pixels (as QuPath writes
them for an image opened at full resolution, and as TRIDENT writes its ``contours_geojson``). Accepted layouts:
a FeatureCollection, a bare list of Features (QuPath's "export as FeatureCollection" off), one Feature, or one
bare geometry. Polygons and MultiPolygons are used, holes respected (a GeometryCollection contributes its
polygons); points and lines, which have no area, are ignored. ``--geojson-classes Tumor,Stroma`` keeps the
features whose ``properties.classification.name`` (QuPath; older QuPath: ``properties.classification`` as a
string is read too) is one of them; without it every feature counts (TRIDENT's features have no class). A tile
is kept when its centre lies inside the union of the kept regions (shapely's ``contains_xy``), on top of the
tissue mask and ``--min-tissue``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.errors import InputError


class AnnotationError(InputError, ValueError):
    """An annotation file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Annotation:
    """The kept region of one slide (a shapely geometry in level-0 pixels) and where it came from."""

    geometry: Any
    path: Path
    sha256: str
    n_features: int  # features kept (after the class filter)
    classes: tuple[str, ...]  # every class name found in the file (for messages)

    def contains_centres(self, coords: np.ndarray, tile_level0: int) -> np.ndarray:
        """Whether each tile's centre (level-0 ``coords`` of top-left corners) lies inside the region."""
        import shapely

        if len(coords) == 0 or self.geometry.is_empty:
            return np.zeros(len(coords), bool)
        shapely.prepare(self.geometry)
        c = coords.astype(np.float64) + tile_level0 / 2.0
        return np.asarray(shapely.contains_xy(self.geometry, c[:, 0], c[:, 1]), bool)

    def rings(self) -> list[np.ndarray]:
        """Every exterior and interior ring as (K, 2) level-0 arrays (for the QC picture)."""
        out: list[np.ndarray] = []
        for poly in getattr(self.geometry, "geoms", [self.geometry]):
            if poly.is_empty:
                continue
            out.append(np.asarray(poly.exterior.coords))
            out += [np.asarray(r.coords) for r in poly.interiors]
        return out


def annotation_path(folder: str | Path, slide: str | Path) -> Path:
    """``<folder>/<slide stem>.geojson`` (the stem as TRIDENT and QuPath name exports: the file name without
    its last suffix)."""
    return Path(folder) / f"{Path(slide).stem}.geojson"


def folder_digest(folder: str | Path) -> str:
    """sha256 over the names and contents of every ``*.geojson`` in ``folder`` (part of the encoder_id, so an
    edited annotation never reuses features tiled under the old one)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*.geojson")):
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _class_name(props: Any) -> str | None:
    if not isinstance(props, dict):
        return None
    c = props.get("classification")
    if isinstance(c, dict):
        name = c.get("name")
        return str(name) if name is not None else None
    return str(c) if isinstance(c, str) else None


def _features(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, list):
        return [f for f in doc if isinstance(f, dict)]
    if not isinstance(doc, dict):
        return []
    kind = doc.get("type")
    if kind == "FeatureCollection":
        return [f for f in doc.get("features") or [] if isinstance(f, dict)]
    if kind == "Feature":
        return [doc]
    if "coordinates" in doc or kind == "GeometryCollection":
        return [{"type": "Feature", "geometry": doc, "properties": {}}]
    return []


def _polygonal(geom: Any) -> list[Any]:
    """The polygons of a shapely geometry (points and lines dropped), made valid."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if geom is None or geom.is_empty:
        return []
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    return [p for g in getattr(geom, "geoms", []) for p in _polygonal(g)]


def read_annotation(path: str | Path, classes: tuple[str, ...] = ()) -> Annotation:
    """The union of the polygonal features of ``path`` whose class is in ``classes`` (all when empty)."""
    import shapely
    from shapely.geometry import shape

    path = Path(path)
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError as e:
        raise AnnotationError(f"{path}: no annotation file for this slide. Fix: export one named "
                              "<slide stem>.geojson into the --tissue-geojson folder, or leave the slide out "
                              "of the manifest.") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: not readable GeoJSON ({type(e).__name__}: {e}). Fix: re-export it "
                              "from QuPath (File > Export objects as GeoJSON).") from e
    feats = _features(doc)
    found = tuple(sorted({n for f in feats if (n := _class_name(f.get("properties"))) is not None}))
    polys: list[Any] = []
    kept = 0
    for i, f in enumerate(feats):
        if classes and _class_name(f.get("properties")) not in classes:
            continue
        g = f.get("geometry")
        if g is None:
            continue
        try:
            parts = _polygonal(shape(g))
        except (ValueError, TypeError, AttributeError, KeyError, shapely.errors.ShapelyError) as e:
            raise AnnotationError(f"{path}: feature {i} has a broken geometry ({type(e).__name__}: {e}). Fix: "
                                  "correct or delete it in QuPath and export again.") from e
        if parts:
            kept += 1
            polys += parts
    geom = shapely.union_all(polys) if polys else shapely.Polygon()
    return Annotation(geom, path, hashlib.sha256(raw).hexdigest(), kept, found)
