"""``mmcli export``: stored tile features to CLAM / TRIDENT / STAMP h5 files (see
:mod:`mmcli.features.interop.exporter`), or tiles and tissue outlines to QuPath GeoJSON
(:mod:`mmcli.features.interop.geojson`)."""
from __future__ import annotations

import re
from pathlib import Path

from mmcli.features.interop.exporter import ExportSummary, export_features
from mmcli.features.interop.geojson import export_geojson
from mmcli.pipeline.errors import InputError


def export(fmt: str, store: str | Path, out: str | Path, modality: str = "wsi", encoder_id: str | None = None,
           mpp: float | None = None, extractor_name: str | None = None,
           scores: str | Path | None = None) -> ExportSummary:
    """Export every complete ``modality`` item of one encoder; exit code 1 when some item could not be written.

    ``fmt`` ``geojson`` writes QuPath GeoJSON (tissue outline + tiles with the per-tile ``scores``) instead of
    feature files (:mod:`mmcli.features.interop.geojson`)."""
    if not Path(store).exists():
        raise InputError(f"{store}: no such feature store. Fix: check --store.")
    if mpp is not None and not mpp > 0:
        raise InputError(f"--mpp must be a positive number of µm per level-0 pixel, got {mpp}")
    if fmt.lower() == "geojson":
        return export_geojson(store, out, modality, encoder_id, scores)
    if scores is not None:
        raise InputError("--scores goes with --format geojson (feature files carry no per-tile scores).")
    if extractor_name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", extractor_name):
        raise InputError(f"--extractor-name {extractor_name!r}: use letters, digits, '.', '_' or '-' "
                         "(it names a folder and STAMP's extractor), e.g. uni")
    return export_features(fmt, store, out, modality, encoder_id, mpp, extractor_name)
