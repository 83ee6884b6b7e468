"""``mmcli export``: stored tile features to CLAM / TRIDENT / STAMP h5 files (see
:mod:`mmcli.features.interop.exporter`)."""
from __future__ import annotations

from pathlib import Path

from mmcli.features.interop.exporter import ExportSummary, export_features
from mmcli.pipeline.errors import InputError


def export(fmt: str, store: str | Path, out: str | Path, modality: str = "wsi", encoder_id: str | None = None,
           mpp: float | None = None) -> ExportSummary:
    """Export every complete ``modality`` item of one encoder; exit code 1 when some item could not be written."""
    if not Path(store).exists():
        raise InputError(f"{store}: no such feature store. Fix: check --store.")
    if mpp is not None and not mpp > 0:
        raise InputError(f"--mpp must be a positive number of µm per level-0 pixel, got {mpp}")
    return export_features(fmt, store, out, modality, encoder_id, mpp)
