"""Checks of a QuPath GeoJSON FeatureCollection (``mmcli export --format geojson``): a JSON-schema check of the
structure, shapely validity of every polygon and the RFC 7946 winding (exterior counter-clockwise, holes
clockwise)."""
from __future__ import annotations

import jsonschema
import shapely
from shapely.geometry import shape

# GeoJSON (RFC 7946) FeatureCollection of Polygons, after the geojson.org JSON schema, plus QuPath's properties
POSITION = {"type": "array", "minItems": 2, "items": {"type": "number"}}
RING = {"type": "array", "minItems": 4, "items": POSITION}
SCHEMA = {
    "type": "object", "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {"type": "array", "items": {
            "type": "object", "required": ["type", "geometry", "properties"],
            "properties": {
                "type": {"const": "Feature"},
                "id": {"type": ["string", "number"]},
                "geometry": {"type": "object", "required": ["type", "coordinates"], "properties": {
                    "type": {"const": "Polygon"}, "coordinates": {"type": "array", "minItems": 1, "items": RING}}},
                "properties": {"type": "object", "required": ["objectType", "classification"], "properties": {
                    "objectType": {"enum": ["annotation", "tile", "detection"]},
                    "classification": {"type": "object", "required": ["name"], "properties": {
                        "name": {"type": "string"}, "color": {"type": "array", "items": {"type": "integer"}}}},
                    "measurements": {"type": "object", "additionalProperties": {"type": "number"}}}}}}}},
}


def check_feature_collection(fc: dict) -> tuple[list, list]:
    """Validate ``fc``; returns ``(tissue, tiles)``, each a list of ``(shapely geometry, properties)``."""
    jsonschema.validate(fc, SCHEMA)
    tissue, tiles = [], []
    for f in fc["features"]:
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]  # closed rings
        geom = shape(f["geometry"])
        assert geom.is_valid, shapely.validation.explain_validity(geom)
        ext = f["geometry"]["coordinates"][0]
        assert shapely.LinearRing(ext).is_ccw  # RFC 7946 right-hand rule (numeric coordinates)
        for hole in f["geometry"]["coordinates"][1:]:
            assert not shapely.LinearRing(hole).is_ccw
        (tissue if f["properties"]["objectType"] == "annotation" else tiles).append((geom, f["properties"]))
    return tissue, tiles
