"""Import of CLAM / TRIDENT / STAMP tile-feature files (and slide embeddings) into the store, through the shared
stage-1 runner.

Each manifest row (a slide of a patient) is matched to ``<slide stem>.h5`` (or ``<item_id>.h5``) anywhere under
the source folder; the h5 file becomes the item's source, so its fingerprint decides caching and a re-import
only redoes changed files. All files of one import share one ``encoder_id``: ``--encoder-id`` or one derived from
the format, the encoder the files name and the feature dimension; files of several encoders (a TRIDENT job root
with ``features_uni_v1/`` and ``features_musk/``) are refused, not mixed. Slide embeddings (TRIDENT's
``slide_features_<encoder>/``, STAMP's slide encodings) are stored as the ``slide`` modality: one row per slide,
a vector every vector head takes.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.interop.formats import FormatError, TileFeatures, complete_geometry, get_format
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


SLIDE_MODALITY = "slide"  # where slide-level embeddings are stored (one row per slide, no coords)


def slide_info(rows: list[ManifestRow]) -> dict[str, dict[str, Any]]:
    """Level-0 µm/px and level downsamples of each row's slide where the slide is reachable (key
    ``patient/item``): what micrometre coords (STAMP) and a CLAM ``--patch-level`` need."""
    from mmcli.features.readers import open_slide

    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        try:
            with open_slide(r.path) as slide:
                out[f"{r.patient_id}/{r.item_id}"] = {
                    "mpp": float(slide.mpp) if slide.mpp else None,
                    "downsamples": [float(d) for d in slide.level_downsamples]}
        except Exception:  # noqa: BLE001 - unreachable or unreadable slide: no info, said per item later
            continue
    return out


def one_encoder(layout: Any, found: list[ManifestRow]) -> str | None:
    """The one encoder the matched files name; InputError when they name several (a job root of several encoders
    would otherwise be stored under one encoder_id, features of different models mixed)."""
    by: dict[str, list[Path]] = defaultdict(list)
    for r in found:
        enc = layout.encoder_of(Path(r.path))
        if enc:
            by[str(enc)].append(Path(r.path))
    if len(by) > 1:
        shown = "; ".join(f"{len(v)} of {k!r} (e.g. {v[0]})" for k, v in sorted(by.items()))
        raise InputError(f"the matched {layout.name} files come from {len(by)} encoders: {shown}. One import stores "
                         "one encoder. Fix: point --from at one encoder's folder (e.g. .../features_uni_v1) and "
                         "import each encoder with its own run.")
    return next(iter(by), None)


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
    ``stamp_ctranspath-1a2b3c4d5e`` (stable for the same files; slide embeddings hash their level in)."""
    if first.encoder_id:
        try:
            return check_id(first.encoder_id, "mmcli_encoder_id")
        except InputError:
            pass
    name = first.encoder or "features"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{fmt}_{name}").strip("._-")
    params: dict[str, Any] = {"format": fmt, "encoder": name, "dim": int(first.features.shape[1])}
    if first.level != "tile":
        params["level"] = first.level
    return f"{safe}-{params_hash(params)}"


class ImportExtractor(ItemExtractor):
    """Reads one tile-feature (or slide-embedding) h5 file as an item (features float32/16, coords level-0 px,
    provenance)."""

    def __init__(self, fmt: str, encoder_id: str, dim: int, encoder: str | None = None, modality: str = "wsi",
                 mpp_file: str | None = None, default_mpp: float | None = None, level: str = "tile",
                 patch_size: int | None = None, patch_level: int = 0) -> None:
        self.fmt = fmt
        self.layout = get_format(fmt)
        self.modality = modality
        self._id = encoder_id
        self.dim = int(dim)
        self.encoder = encoder
        self.level = level
        self.patch_size, self.patch_level = patch_size, int(patch_level)
        # per-slide info travels as a small JSON file: spec kwargs stay small for cohorts of any size
        info = json.loads(Path(mpp_file).read_text()) if mpp_file else {}
        self.slide_info: dict[str, dict[str, Any]] = {k: v if isinstance(v, dict) else {"mpp": v}
                                                      for k, v in info.items()}
        self.default_mpp = default_mpp

    @property
    def encoder_id(self) -> str:
        return self._id

    def encoder_attrs(self) -> dict[str, Any]:
        return {"encoder": f"imported:{self.fmt}:{self.encoder or 'unknown'}", "dim": self.dim,
                "imported_from": self.fmt, "source_encoder": self.encoder, "pretrained": None, "level": self.level}

    def _stated_tile(self, tf: TileFeatures, key: str) -> None:
        """``--patch-size`` / ``--patch-level``: the tile size where the file does not state it (it wins over a
        size derived from the coords stride; a file that states another size keeps its own, with a warning)."""
        if not self.patch_size or tf.level != "tile":
            return
        geo: dict[str, Any] = {"patch_size": self.patch_size}
        if self.patch_level == 0:
            geo["patch_size_level0"] = self.patch_size
        else:
            downs = self.slide_info.get(key, {}).get("downsamples") or []
            if len(downs) > self.patch_level:
                geo.update(patch_size_level0=round(self.patch_size * downs[self.patch_level]),
                           level_downsample=downs[self.patch_level])
            else:
                tf.warnings.append(f"--patch-level {self.patch_level}: the slide's level downsamples are unknown "
                                   "(slide not reachable); the level-0 tile size is not recorded")
        derived = tf.attrs.get("geometry_source") == "coords stride"
        if not derived and "patch_size_level0" in tf.geometry:
            if geo.get("patch_size_level0") not in (None, tf.geometry["patch_size_level0"]):
                tf.warnings.append(f"--patch-size {self.patch_size} at level {self.patch_level} differs from the "
                                   f"file's {int(tf.geometry['patch_size_level0'])} level-0 px; the file's is kept")
            return
        kept = {k: v for k, v in tf.geometry.items() if k in ("slide_mpp", "level0_magnification", "level0_width",
                                                              "level0_height")}
        tf.geometry = complete_geometry({**kept, **geo})
        tf.warnings = [w for w in tf.warnings if "coords stride" not in w]
        tf.attrs["geometry_source"] = "--patch-size"

    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        try:
            tf = self.layout.read(Path(row.path))
        except FormatError as e:
            raise ItemError(str(e)) from e
        except OSError as e:
            raise ItemError(f"{Path(row.path).name}: not a readable HDF5 file ({e})") from e
        if tf.level != self.level:
            raise ItemError(f"{Path(row.path).name}: a {tf.level}-level file among the {self.level}-level files of "
                            f"encoder_id {self._id}. Fix: import slide embeddings and tile features separately.")
        if tf.features.shape[1] != self.dim:
            raise ItemError(f"{Path(row.path).name}: feature dim {tf.features.shape[1]} differs from {self.dim} "
                            f"of the other files of encoder_id {self._id} (feature dim mismatch)")
        key = f"{row.patient_id}/{row.item_id}"
        info = self.slide_info.get(key, {})
        tf.resolve_coords(info.get("mpp") or self.default_mpp)
        self._stated_tile(tf, key)
        if progress:
            progress(1, 1)
        attrs = {**tf.geometry, "imported_from": self.fmt, "source_encoder": tf.encoder, "level": tf.level,
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
                     mpp_file: str | Path | None = None, default_mpp: float | None = None,
                     patch_size: int | None = None, patch_level: int = 0) -> ExtractorSpec:
    """Spec of an :class:`ImportExtractor`; the dimension, encoder name and level (tile features, or slide
    embeddings stored as :data:`SLIDE_MODALITY`) come from the first readable file."""
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
    store_modality = SLIDE_MODALITY if first.level == "slide" else modality
    kwargs = dict(fmt=fmt, encoder_id=eid, dim=int(first.features.shape[1]), encoder=first.encoder,
                  modality=store_modality, mpp_file=str(mpp_file) if mpp_file else None, default_mpp=default_mpp,
                  level=first.level, patch_size=patch_size, patch_level=patch_level)
    return ExtractorSpec("mmcli.features.interop.importer:ImportExtractor", kwargs, store_modality, eid)
