"""Export of stored tile features to CLAM / TRIDENT / STAMP h5 layouts, so features made here feed those tools.

One file per item (slide), named by its ``item_id`` (``<patient_id>__<item_id>`` when two patients share an
item id), written atomically. Beside the files: ``manifest.csv`` (``patient_id,modality,path,item_id``, which
``mmcli import`` reads back) and, for CLAM, ``clam_dataset.csv`` (``case_id,slide_id``; add your label column).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.features.interop.formats import (
    GEOMETRY_KEYS,
    FormatError,
    TileFeatures,
    complete_geometry,
    get_format,
    write_rows,
)
from mmcli.pipeline.errors import InputError


@dataclass
class ExportSummary:
    """Files written and items that could not be exported (with the reason)."""

    format: str
    store: str
    out: str
    modality: str
    encoder_id: str
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def item_geometry(attrs: dict[str, Any], default_mpp: float | None = None) -> dict[str, float]:
    """Tile geometry from an item's attrs (top level or one nested dict deep); ``default_mpp`` fills a
    missing level-0 µm/px."""
    geo: dict[str, Any] = {}
    for d in [attrs, *[v for v in attrs.values() if isinstance(v, dict)]]:
        for k in GEOMETRY_KEYS:
            if k in d and k not in geo:
                geo[k] = d[k]
    if default_mpp and "slide_mpp" not in geo and "level0_magnification" not in geo:
        geo["slide_mpp"] = default_mpp
    return complete_geometry(geo)


def choose_encoder(store: Any, modality: str, encoder_id: str | None) -> str:
    """The encoder_id to export: the one given, or the only one in the store."""
    encoders = store.encoders(modality)
    if encoder_id:
        if encoder_id not in encoders:
            raise InputError(f"{store.path}: no {modality} features of encoder_id {encoder_id!r}; "
                             f"the store has {encoders}.")
        return encoder_id
    if len(encoders) != 1:
        raise InputError(f"{store.path}: {len(encoders)} {modality} encoders {encoders}. "
                         "Fix: choose one with --encoder-id." if encoders else
                         f"{store.path}: no {modality} features to export.")
    return encoders[0]


def _name_of(encoder_attrs: dict[str, Any], encoder_id: str) -> str:
    name = encoder_attrs.get("source_encoder") or encoder_attrs.get("encoder") or encoder_id
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-") or encoder_id


def export_features(fmt: str, store_path: str | Path, out: str | Path, modality: str = "wsi",
                    encoder_id: str | None = None, mpp: float | None = None) -> ExportSummary:
    """Write every complete item of ``modality``/``encoder_id`` in layout ``fmt`` under ``out``."""
    from mmcli.pipeline.store import open_store

    layout = get_format(fmt)
    store = open_store(store_path, "r")
    eid = choose_encoder(store, modality, encoder_id)
    enc_attrs = store.encoder_attrs(modality, eid)
    name = _name_of(enc_attrs, eid)
    out = Path(out)
    keys = list(store.iter_items(modality, eid))
    clash = {k for k, n in Counter(k.item_id for k in keys).items() if n > 1}
    summary = ExportSummary(fmt, str(store_path), str(out), modality, eid)
    rows: list[tuple[str, str, str, str]] = []
    for key in keys:
        slide_id = f"{key.patient_id}__{key.item_id}" if key.item_id in clash else key.item_id
        try:
            item = store.read_item(key.modality, key.encoder_id, key.patient_id, key.item_id)
            geo = item_geometry(item.attrs, mpp)
            tf = TileFeatures(item.features, item.coords, geo, name)
            rel = layout.relative_dir(name, geo) / f"{slide_id}.h5"
            layout.write(out / rel, tf, slide_id)
        except (FormatError, OSError, ValueError) as e:
            summary.failed.append((f"{key.patient_id}/{key.item_id}", str(e)))
            continue
        if item.coords is None:
            summary.warnings.append(f"{key.patient_id}/{key.item_id}: no coords stored; file has features only")
        summary.written.append(str(out / rel))
        rows.append((key.patient_id, modality, rel.as_posix(), key.item_id))
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    write_rows(manifest, ["patient_id", "modality", "path", "item_id"], rows)
    layout.write_index(out, [(pid, Path(path).stem) for pid, _, path, _ in rows])
    summary.manifest = str(manifest)
    return summary
