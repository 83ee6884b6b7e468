"""Import of CLAM / TRIDENT / STAMP tile-feature files into the store, through the shared stage-1 runner.

Each manifest row (a slide of a patient) is matched to ``<slide stem>.h5`` (or ``<item_id>.h5``) anywhere under
the source folder; the h5 file becomes the item's source, so its fingerprint decides caching and a re-import
only redoes changed files. All files of one import share one ``encoder_id``: ``--encoder-id`` or one derived from
the format, the encoder the files name and the feature dimension.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.interop.formats import FormatError, TileFeatures, get_format
from mmcli.features.runner import ExtractorSpec, ItemError, ItemExtractor, ItemResult, ProgressFn
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import params_hash
from mmcli.pipeline.ids import check_id
from mmcli.pipeline.manifest import ManifestRow


@dataclass
class Matched:
    """Manifest rows with their h5 file (``found``) and rows without one (``missing``, path = what was sought)."""

    found: list[ManifestRow]
    missing: list[ManifestRow]
    lacking: list[ManifestRow] = field(default_factory=list)  # found, but the file lacks the features dataset


def slide_stem(path: Path) -> str:
    """File name without its (double) extension: ``a.svs`` -> ``a``, ``a.ome.tiff`` -> ``a``."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def slide_mpps(rows: list[ManifestRow]) -> dict[str, float]:
    """Level-0 µm/px of each row's slide where the slide is reachable and states it (key ``patient/item``)."""
    from mmcli.features.readers import open_slide

    out: dict[str, float] = {}
    for r in rows:
        try:
            with open_slide(r.path) as slide:
                if slide.mpp:
                    out[f"{r.patient_id}/{r.item_id}"] = float(slide.mpp)
        except Exception:  # noqa: BLE001 - unreachable or unreadable slide: no mpp, said per item later
            continue
    return out


def index_h5(source: Path) -> dict[str, list[Path]]:
    """Every ``*.h5`` under ``source`` by file stem (hidden and temporary files skipped)."""
    if not source.is_dir():
        raise InputError(f"{source}: not a folder. Fix: --from must be the folder holding the .h5 files.")
    index: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(source.rglob("*.h5")):
        if not any(part.startswith(".") for part in p.relative_to(source).parts):
            index[p.stem].append(p)
    return index


def match_rows(rows: list[ManifestRow], source: Path, fmt: str) -> Matched:
    """Pair each row with its feature file: by the slide's file stem, then by item_id.

    Files without the layout's features dataset (e.g. CLAM's coords-only ``patches/*.h5``) are passed over
    when a file with it exists, and otherwise matched (so the import fails with the file's real defect, not
    "file not found"); two feature files for one slide are ambiguous and refused.
    """
    layout = get_format(fmt)
    index = index_h5(source)
    found, missing, matched_lacking = [], [], []
    for r in rows:
        names = list(dict.fromkeys([slide_stem(Path(r.path)), r.item_id]))
        named = list(dict.fromkeys(p for n in names for p in index.get(n, [])))
        cands = [p for p in named if layout.has_features(p)]
        lacks = False
        if not cands and named:  # only files without the features dataset: read one, so its reason is told
            cands, lacks = [next((p for p in named if p.parent.name != "patches"), named[0])], True
        if len(cands) > 1:
            raise InputError(
                f"manifest line {r.row}: {len(cands)} {fmt} feature files match slide {names[0]!r}: "
                f"{[str(c) for c in cands[:3]]}. Fix: point --from at the folder of one encoder.")
        if cands:
            found.append(ManifestRow(r.patient_id, r.modality, cands[0], r.item_id, r.row))
            if lacks:
                matched_lacking.append(found[-1])
        else:
            missing.append(ManifestRow(r.patient_id, r.modality, source / f"{names[0]}.h5", r.item_id, r.row))
    return Matched(found, missing, matched_lacking)


def derive_encoder_id(fmt: str, first: TileFeatures) -> str:
    """The encoder_id a file exported by mmcli states, else ``<format>_<encoder>-<hash>``, e.g.
    ``stamp_ctranspath-1a2b3c4d5e`` (stable for the same files)."""
    if first.encoder_id:
        try:
            return check_id(first.encoder_id, "mmcli_encoder_id")
        except InputError:
            pass
    name = first.encoder or "features"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{fmt}_{name}").strip("._-")
    return f"{safe}-{params_hash({'format': fmt, 'encoder': name, 'dim': int(first.features.shape[1])})}"


class ImportExtractor(ItemExtractor):
    """Reads one tile-feature h5 file as an item (features float32, coords level-0 px, provenance)."""

    def __init__(self, fmt: str, encoder_id: str, dim: int, encoder: str | None = None, modality: str = "wsi",
                 mpp_file: str | None = None, default_mpp: float | None = None) -> None:
        self.fmt = fmt
        self.layout = get_format(fmt)
        self.modality = modality
        self._id = encoder_id
        self.dim = int(dim)
        self.encoder = encoder
        # per-slide mpp travels as a small JSON file: spec kwargs stay small for cohorts of any size
        self.slide_mpp: dict[str, float] = json.loads(Path(mpp_file).read_text()) if mpp_file else {}
        self.default_mpp = default_mpp

    @property
    def encoder_id(self) -> str:
        return self._id

    def encoder_attrs(self) -> dict[str, Any]:
        return {"encoder": f"imported:{self.fmt}:{self.encoder or 'unknown'}", "dim": self.dim,
                "imported_from": self.fmt, "source_encoder": self.encoder, "pretrained": None}

    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        try:
            tf = self.layout.read(Path(row.path))
        except FormatError as e:
            raise ItemError(str(e)) from e
        except OSError as e:
            raise ItemError(f"{Path(row.path).name}: not a readable HDF5 file ({e})") from e
        if tf.features.shape[1] != self.dim:
            raise ItemError(f"{Path(row.path).name}: feature dim {tf.features.shape[1]} differs from {self.dim} "
                            f"of the other files of encoder_id {self._id} (feature dim mismatch)")
        tf.resolve_coords(self.slide_mpp.get(f"{row.patient_id}/{row.item_id}") or self.default_mpp)
        if progress:
            progress(1, 1)
        attrs = {**tf.geometry, "imported_from": self.fmt, "source_encoder": tf.encoder,
                 "source_file_attrs": tf.attrs, "source_dtype": str(tf.features.dtype)}
        if tf.dtype:  # the dtype the exporting store held (float16 written as CLAM's float32 comes back float16)
            feats = tf.features.astype(tf.dtype, copy=False)
        else:
            feats = tf.features if tf.features.dtype in (np.float16, np.float32) else tf.features.astype(np.float32)
        if feats.shape[0] == 0:
            warnings = [*tf.warnings, f"{Path(row.path).name}: 0 tiles (an empty slide): stored as a 0-tile item"]
            return ItemResult(feats, tf.coords, attrs, warnings)
        return ItemResult(feats, tf.coords, attrs, list(tf.warnings))


def make_import_spec(fmt: str, found: list[ManifestRow], encoder_id: str | None = None, modality: str = "wsi",
                     mpp_file: str | Path | None = None, default_mpp: float | None = None) -> ExtractorSpec:
    """Spec of an :class:`ImportExtractor`; the dimension and encoder name come from the first readable file."""
    layout = get_format(fmt)
    first: TileFeatures | None = None
    reasons: list[str] = []
    for r in found:
        try:
            first = layout.read(Path(r.path))
            break
        except FormatError as e:
            reasons.append(str(e))
        except OSError as e:
            reasons.append(f"{r.path}: not a readable HDF5 file ({e})")
    if first is None:
        shown = "; ".join(reasons[:3]) + (f"; ... ({len(reasons) - 3} more)" if len(reasons) > 3 else "")
        raise InputError(f"none of the {len(found)} matched files reads as {fmt} features: {shown}. "
                         "Fix: repair or re-export these files, or check --format.")
    eid = check_id(encoder_id, "--encoder-id") if encoder_id else derive_encoder_id(fmt, first)
    kwargs = dict(fmt=fmt, encoder_id=eid, dim=int(first.features.shape[1]), encoder=first.encoder,
                  modality=modality, mpp_file=str(mpp_file) if mpp_file else None, default_mpp=default_mpp)
    return ExtractorSpec("mmcli.features.interop.importer:ImportExtractor", kwargs, modality, eid)
