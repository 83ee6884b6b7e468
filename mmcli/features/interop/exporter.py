"""Export of stored tile features to CLAM / TRIDENT / STAMP layouts, so features made here feed those tools.

One file per item (slide), named by the slide's file stem (the name CLAM's and STAMP's heatmap steps look
features up by; ``<patient_id>__<stem>`` when two patients share a stem), written atomically. Every item is
checked first against what the target format's tools need (:meth:`H5Format.missing`: coords, tile size in px
and µm, ``patch_size_level0``, magnifications, the extractor name); an item that cannot be completed from the
store (and ``--mpp``) is not written and is listed as failed with the missing fields (exit 1), never
exported as a file the peer cannot read. Beside the files: ``manifest.csv`` (``patient_id,modality,path,
item_id``, which ``mmcli import`` reads back) and, for CLAM, ``clam_dataset.csv`` (``case_id,slide_id``).

The encoder is named as the peer names it (:mod:`~mmcli.features.interop.names`: ``uni`` is TRIDENT's
``features_uni_v1`` and STAMP's ``uni``); a store whose encoder the peer has no name for needs ``--extractor-name``,
and a name the peer does not know is warned about. A slide without tissue is skipped for CLAM and STAMP (they
write no file for one), written empty for TRIDENT (which does). STAMP's ``virchow2`` is the 1280-d CLS token:
a 2560-d Virchow2 store is written as its CLS half.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.features.interop import names
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
    if "level0_width" not in geo and isinstance(attrs.get("level0_size"), list) and len(attrs["level0_size"]) == 2:
        geo["level0_width"], geo["level0_height"] = attrs["level0_size"]
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


def source_encoder_name(encoder_attrs: dict[str, Any]) -> str | None:
    """The encoder's own name (``uni_v1``, ``resnet50_trunc``), or None when the store does not know it."""
    name = encoder_attrs.get("source_encoder") or encoder_attrs.get("encoder")
    if not name or str(name).startswith("imported:"):
        return None
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-") or None


def slide_name(attrs: dict[str, Any], item_id: str) -> str:
    """The slide's file stem from the item's source path (a slide, or the h5 file it was imported from)."""
    from mmcli.features.interop.importer import slide_stem

    path = (attrs.get("source_fingerprint") or {}).get("path")
    stem = slide_stem(Path(str(path))) if path else ""
    return stem if stem and re.fullmatch(r"[A-Za-z0-9._ -]+", stem) and stem not in (".", "..") else item_id


def export_features(fmt: str, store_path: str | Path, out: str | Path, modality: str = "wsi",
                    encoder_id: str | None = None, mpp: float | None = None,
                    extractor_name: str | None = None) -> ExportSummary:
    """Write every complete item of ``modality``/``encoder_id`` in layout ``fmt`` under ``out``.

    ``extractor_name`` overrides the encoder name the layout states (STAMP's ``extractor``, TRIDENT's
    ``features_<name>`` folder); by default the store's name, mapped to STAMP's names for STAMP.
    """
    from mmcli.pipeline.store import open_store

    layout = get_format(fmt)
    store = open_store(store_path, "r")
    eid = choose_encoder(store, modality, encoder_id)
    enc_attrs = store.encoder_attrs(modality, eid)
    source_name = source_encoder_name(enc_attrs)
    origin = enc_attrs.get("imported_from")
    name = extractor_name or layout.export_encoder_name(source_name, origin)
    out = Path(out)
    keys = list(store.iter_items(modality, eid))
    summary = ExportSummary(fmt, str(store_path), str(out), modality, eid)
    if layout.needs_encoder_name and not name:
        known = f"the store does not know the encoder of {eid!r}" if not source_name else \
            f"{layout.name} has no extractor for {source_name!r} features"
        summary.failed += [(f"{k.patient_id}/{k.item_id}", f"missing extractor name: {known}. Fix: pass "
                            "--extractor-name (e.g. uni, conch1_5)") for k in keys]
        return summary
    if layout.needs_encoder_name and name and not layout.known_name(name):
        summary.warnings.append(f"encoder name {name!r} is not one of {layout.name.upper()}'s encoder names; its "
                                "slide encoders will not take these features. Fix: --extractor-name to name them "
                                f"as {layout.name.upper()} does")
    cls_width = names.STAMP_CLS_WIDTH.get(name or "") if layout.name == "stamp" else None
    items = [(k, store.read_item(k.modality, k.encoder_id, k.patient_id, k.item_id)) for k in keys]
    stems = [slide_name(it.attrs, k.item_id) for k, it in items]
    clash = {s for s, n in Counter(stems).items() if n > 1}
    rows: list[tuple[str, str, str, str]] = []
    for (key, item), stem in zip(items, stems, strict=True):
        label = f"{key.patient_id}/{key.item_id}"
        slide_id = f"{key.patient_id}__{stem}" if stem in clash else stem
        geo = item_geometry(item.attrs, mpp)
        tf = TileFeatures(item.features, item.coords, geo, name, encoder_id=eid, dtype=str(item.features.dtype))
        if cls_width and item.features.shape[1] == 2 * cls_width:  # STAMP's virchow2 is the CLS token only
            tf.features, tf.encoder_id = item.features[:, :cls_width], None  # not the store's features: no id
        miss = layout.missing(tf)
        if miss:
            summary.failed.append((label, f"cannot write a {fmt} file the peer can read: missing "
                                          + "; ".join(miss)))
            continue
        if len(tf.features) == 0 and not layout.writes_empty:
            summary.warnings.append(f"{label}: 0 tiles (no tissue): not written ({fmt.upper()} writes no file for "
                                    "such a slide, and its models fail on an empty bag)")
            continue
        try:
            rel = layout.relative_dir(name or "features", geo) / f"{slide_id}.h5"
            paths = layout.write(out / rel, tf, slide_id)
        except (FormatError, OSError, ValueError) as e:
            summary.failed.append((label, str(e)))
            continue
        if tf.coords is not None and len(tf.coords) == 0:
            summary.warnings.append(f"{label}: 0 tiles (no tissue); written as an empty file, as {fmt} does")
        if fmt.lower() == "stamp" and "patch_size" not in geo:
            summary.warnings.append(f"{label}: tile size in px unknown; STAMP reads the file but its heatmaps "
                                    "need tile_size_px")
        summary.written += [str(p) for p in paths]
        rows.append((key.patient_id, modality, rel.as_posix(), key.item_id))
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    write_rows(manifest, ["patient_id", "modality", "path", "item_id"], rows)
    layout.write_index(out, [(pid, Path(path).stem) for pid, _, path, _ in rows])
    summary.manifest = str(manifest)
    if cls_width and items and items[0][1].features.shape[1] == 2 * cls_width:
        summary.warnings.append(f"{name}: STAMP's {name} features are the {cls_width}-d CLS token; wrote the CLS "
                                f"half of the store's {2 * cls_width}-d CLS + mean-patch features")
    return summary


def n_files(summary: Any) -> int:
    """Slides exported (feature or GeoJSON files; CLAM also writes a .pt and a patches file per slide)."""
    return sum(1 for p in summary.written if p.endswith((".h5", ".geojson"))
               and "/patches/" not in p.replace("\\", "/"))

