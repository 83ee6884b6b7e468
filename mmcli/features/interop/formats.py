"""Tile-feature h5 layouts of CLAM, TRIDENT and STAMP: one reader and one writer per layout, in the
:data:`FORMATS` registry (``--format`` of ``mmcli import`` / ``mmcli export`` takes its names).

Each writer writes what the peer's own reading code needs, as the peer itself writes it, and refuses
(:meth:`H5Format.missing`) an item that lacks something the peer needs:

- **CLAM** (``h5_files/<slide>.h5`` + ``pt_files/<slide>.pt`` + ``patches/<slide>.h5``): ``features`` (N, D)
  float32 and ``coords`` (N, 2) int32 level-0 pixels (x, y) of the tile's top-left, both chunked along N
  (CLAM's ``save_hdf5`` appends batches); ``pt_files`` holds ``torch.save`` of the plain float32 tensor that
  CLAM's ``Generic_MIL_Dataset`` loads with ``weights_only=True``; ``patches/`` holds the coords with
  ``patch_size``/``patch_level`` (what CLAM's heatmap code reads). On import the ``patches/`` file beside
  ``h5_files/`` gives the tile size and level; without it (CLAM's documented layout keeps ``patches/`` in the
  patching run's folder) the tile size is ``--patch-size`` / ``--patch-level``, else the coords stride as STAMP
  derives it. A slide without tissue is not written (CLAM writes no file for it; ``CLAM_SB`` fails on one).
- **TRIDENT** (``<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``, ``<encoder>`` TRIDENT's
  name, :mod:`~mmcli.features.interop.names`): as CLAM with int64 coords, plus attrs on ``coords``:
  ``patch_size`` (px at the target magnification), ``patch_size_level0``, ``target_magnification``,
  ``level0_magnification``, ``overlap``, ``name``, ``savetodir`` (and ``level0_width``/``level0_height`` when
  known), and ``name``/``savetodir``/``encoder`` on ``features``. ``savetodir`` is the folder relative to the
  export root, never an absolute path of this machine (TRIDENT writes its job-dir-relative folder; none of its
  readers use it). A slide without tissue is an empty (0, D) / (0, 2) file, as TRIDENT writes it.
- **STAMP** (``<extractor>/<slide>.h5``): ``feats`` (N, D), ``coords`` (N, 2) float32 in **micrometres**
  from the slide's top-left, root attrs ``extractor`` (one of STAMP's names), ``unit`` (``"um"``),
  ``tile_size_um``, ``tile_size_px``, ``feat_type``. STAMP 2.0 files state ``tile_size`` (µm) with ``unit="um"``
  instead; both are read. STAMP turns a tile size in µm into level-0 pixels with ``ceil(tile_size_um /
  slide_mpp)``; so does the importer. A slide without tissue is not written (STAMP writes no file for it).

Slide-level embeddings are read too (:attr:`TileFeatures.level` ``"slide"``): TRIDENT's
``slide_features_<encoder>/<slide>.h5`` (``features`` of shape (D,)) and STAMP's slide encodings
(``<encoder>-slide-<hash>/<slide>.h5``, ``feats`` (D,), ``feat_type="slide"``); they import as one row per slide.

Every file is opened through :func:`~mmcli.features.interop.h5safe.open_checked` (no external storage, virtual
datasets or non-hard links; a cap on the decompressed size). mmcli's writers add root attributes the peers
ignore: ``mmcli_encoder_id``, ``mmcli_dtype`` and ``mmcli_geometry`` (JSON), so that ``mmcli import`` of an
export gives back the same items (same encoder_id, dtype, tile geometry). Inside mmcli coordinates are level-0
pixels (int64); magnification follows ``magnification = 10 / mpp`` (20x = 0.5 µm/px).
"""
from __future__ import annotations

import csv
import io
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.features.interop import names
from mmcli.features.interop.h5safe import open_checked
from mmcli.pipeline.errors import FormatError
from mmcli.pipeline.io import atomic_write_text, atomic_write_with
from mmcli.pipeline.registry import Registry

# Tile-geometry keys shared with the WSI extractor's item attrs (TRIDENT-like names).
GEOMETRY_KEYS = ("mpp", "patch_size", "patch_size_level0", "slide_mpp", "target_magnification",
                 "level0_magnification", "tile_size_um", "level_downsample", "level0_width", "level0_height")
UNKNOWN_ENCODERS = {"", "unknown", "features", "none"}

@dataclass
class TileFeatures:
    """Tile features of one slide: ``coords`` are level-0 pixels (x, y), or None when unknown."""

    features: np.ndarray
    coords: np.ndarray | None
    geometry: dict[str, float] = field(default_factory=dict)  # GEOMETRY_KEYS that are known
    encoder: str | None = None  # the encoder name the file states
    attrs: dict[str, Any] = field(default_factory=dict)  # the file's own attributes (provenance)
    warnings: list[str] = field(default_factory=list)
    coords_um: np.ndarray | None = None  # STAMP: micrometres, until the slide's mpp turns them into pixels
    encoder_id: str | None = None  # mmcli's exporter states the store key it came from
    dtype: str | None = None  # the dtype the store held (mmcli's exporter states it)
    level: str = "tile"  # "slide": one embedding per slide (TRIDENT slide_features, STAMP slide encodings)

    def resolve_coords(self, slide_mpp: float | None) -> None:
        """Turn micrometre coords into level-0 pixels with ``slide_mpp`` (µm/px); without it drop them loudly."""
        if self.coords_um is None:
            return
        if slide_mpp:
            self.coords = np.rint(self.coords_um.astype(np.float64) / slide_mpp).astype(np.int64)
            self.geometry = complete_geometry({**self.geometry, "slide_mpp": slide_mpp})
        else:
            self.warnings.append("coords are in micrometres and the slide's level-0 mpp is unknown (no --mpp, "
                                 "slide not reachable): imported without coordinates")
        self.coords_um = None


def _plain(v: Any) -> Any:
    """h5 attribute value -> JSON-able Python value."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _attrs(obj: Any) -> dict[str, Any]:
    return {str(k): _plain(v) for k, v in obj.attrs.items()}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def level0_size(tile_size_um: float, slide_mpp: float) -> int:
    """Level-0 pixels of a tile ``tile_size_um`` wide, as STAMP computes it: ``ceil(um / mpp)``."""
    return int(math.ceil(tile_size_um / slide_mpp - 1e-6))


def complete_geometry(geo: dict[str, Any]) -> dict[str, float]:
    """Fill what follows from the rest (mpp <-> magnification, level-0 size <-> target size <-> µm)."""
    g = {k: float(v) for k, v in geo.items() if k in GEOMETRY_KEYS and _num(v) is not None}
    for _ in range(2):  # two passes: a value found late can complete an earlier rule
        for mpp, mag in (("mpp", "target_magnification"), ("slide_mpp", "level0_magnification")):
            if mpp not in g and mag in g:
                g[mpp] = 10.0 / g[mag]
            if mag not in g and mpp in g:
                g[mag] = round(10.0 / g[mpp], 3)
        if "tile_size_um" not in g:
            if {"patch_size", "mpp"} <= g.keys():
                g["tile_size_um"] = g["patch_size"] * g["mpp"]
            elif {"patch_size_level0", "slide_mpp"} <= g.keys():
                g["tile_size_um"] = g["patch_size_level0"] * g["slide_mpp"]
        if "patch_size_level0" not in g and {"tile_size_um", "slide_mpp"} <= g.keys():  # STAMP's rule
            g["patch_size_level0"] = float(level0_size(g["tile_size_um"], g["slide_mpp"]))
        if "mpp" not in g and {"slide_mpp", "level_downsample"} <= g.keys():
            g["mpp"] = g["slide_mpp"] * g["level_downsample"]
            g["target_magnification"] = round(10.0 / g["mpp"], 3)
        if "patch_size_level0" not in g and {"patch_size", "mpp", "slide_mpp"} <= g.keys():
            g["patch_size_level0"] = float(round(g["patch_size"] * g["mpp"] / g["slide_mpp"]))
        if "patch_size" not in g and {"patch_size_level0", "level_downsample"} <= g.keys():
            g["patch_size"] = float(round(g["patch_size_level0"] / g["level_downsample"]))
        if "patch_size" not in g and {"patch_size_level0", "mpp", "slide_mpp"} <= g.keys():
            g["patch_size"] = float(round(g["patch_size_level0"] * g["slide_mpp"] / g["mpp"]))
        if "patch_size" not in g and {"tile_size_um", "mpp"} <= g.keys():
            g["patch_size"] = float(round(g["tile_size_um"] / g["mpp"]))
        if "mpp" not in g and {"tile_size_um", "patch_size"} <= g.keys():
            g["mpp"] = g["tile_size_um"] / g["patch_size"]
    return g


def _dataset(h5: Any, key: str, path: Path) -> Any:
    """``h5[key]``, or a FormatError naming the dataset and the file."""
    if key not in h5:
        raise FormatError(f"missing dataset '{key}' in {path} (it has {sorted(h5.keys())})")
    return h5[key]


def _slide_vector(path: Path, feats: Any, feat_name: str) -> np.ndarray:
    """A slide embedding of shape (D,) (or (1, D)) as one row (1, D); FormatError naming the defect."""
    f = np.asarray(feats)
    if f.size == 0:
        raise FormatError(f"{path}: '{feat_name}' is an empty slide embedding (TRIDENT writes one for a slide "
                          "without tissue); nothing to import for this slide")
    if f.ndim == 2 and f.shape[0] == 1:
        f = f[0]
    if f.ndim != 1:
        raise FormatError(f"{path}: a slide embedding '{feat_name}' must have shape (D,), got {f.shape}")
    if not np.issubdtype(f.dtype, np.floating):
        raise FormatError(f"{path}: '{feat_name}' must be floating point, got {f.dtype}")
    if not np.isfinite(f).all():
        raise FormatError(f"{path}: '{feat_name}' holds NaN or inf")
    return f[None, :]


def _check(path: Path, feats: Any, coords: Any, feat_name: str) -> tuple[np.ndarray, np.ndarray | None]:
    f = np.asarray(feats)
    if f.ndim == 3 and f.shape[0] == 1:  # some tools keep a batch axis
        f = f[0]
    if f.ndim != 2 or f.shape[1] == 0:
        raise FormatError(f"{path}: '{feat_name}' must be (N, D) with D > 0, got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.floating):
        raise FormatError(f"{path}: '{feat_name}' must be floating point, got {f.dtype}")
    if not np.isfinite(f).all():
        raise FormatError(f"{path}: '{feat_name}' holds NaN or inf")
    c = None
    if coords is not None:
        c = np.asarray(coords)
        if c.ndim == 3 and c.shape[0] == 1:
            c = c[0]
        if c.size == 0 and f.shape[0] == 0:  # an empty slide (TRIDENT writes (0, 2), some tools (0,))
            c = np.zeros((0, 2), dtype=c.dtype)
        if c.ndim != 2 or c.shape != (f.shape[0], 2):
            raise FormatError(f"{path}: 'coords' must be (N, 2) with N={f.shape[0]} (the rows of "
                              f"'{feat_name}'), got shape {c.shape}")
        if not np.isfinite(c.astype(np.float64)).all():
            raise FormatError(f"{path}: 'coords' holds NaN or inf")
    return f, c


def write_rows(path: Path, header: list[str], rows: Any) -> None:
    """A plain CSV, written atomically. Not formula-escaped: these files are read back by tools (mmcli
    import, CLAM), and their cells are safe ids and relative paths."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_atomic(path: Path, fill: Any) -> None:
    """Write an h5 file under a temporary name and rename it into place (no half files)."""
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as h5:
            fill(h5)

    atomic_write_with(path, write)


def appendable(h5: Any, key: str, data: np.ndarray) -> Any:
    """A dataset as CLAM's and TRIDENT's ``save_hdf5`` create it: chunks of one row, resizable along N."""
    data = np.asarray(data)
    return h5.create_dataset(key, data=data, maxshape=(None, *data.shape[1:]), chunks=(1, *data.shape[1:]))


def _mmcli_attrs(h5: Any, tf: TileFeatures) -> None:
    """Root attributes that mmcli's importer reads back (the peers ignore them)."""
    h5.attrs["exported_by"] = f"mmcli {__version__}"
    if tf.encoder_id:
        h5.attrs["mmcli_encoder_id"] = tf.encoder_id
    h5.attrs["mmcli_dtype"] = str(tf.dtype or tf.features.dtype)
    h5.attrs["mmcli_geometry"] = json.dumps(tf.geometry, sort_keys=True)
    if tf.encoder:
        h5.attrs["mmcli_encoder"] = tf.encoder


def _mmcli_read(tf: TileFeatures) -> TileFeatures:
    """Apply the ``mmcli_*`` root attributes of a file mmcli exported (its geometry is the store's, in full)."""
    root = tf.attrs.get("root", {})
    if root.get("mmcli_geometry"):
        try:
            extra = json.loads(root["mmcli_geometry"])
        except (TypeError, ValueError):
            extra = {}
        if isinstance(extra, dict) and extra:  # the store's own geometry, which the layout may state only in part
            tf.geometry = complete_geometry(extra)
    tf.encoder_id = str(root["mmcli_encoder_id"]) if root.get("mmcli_encoder_id") else None
    dtype = str(root.get("mmcli_dtype") or "")
    tf.dtype = dtype if dtype in ("float16", "float32", "float64") else None
    if root.get("mmcli_encoder") and not tf.encoder:
        tf.encoder = str(root["mmcli_encoder"])
    return tf


class H5Format(ABC):
    """One tile-feature layout (stateless: :func:`get_format` builds one per lookup)."""

    name: str
    features_key: str = "features"
    needs_encoder_name = False  # the layout names the encoder (folder or attribute) and its tools check it
    writes_empty = True  # a slide without tissue is written as an empty file (TRIDENT); CLAM and STAMP write none

    @abstractmethod
    def read(self, path: Path) -> TileFeatures:
        """Tile features of ``path``; coords in level-0 px when the file allows it."""

    @abstractmethod
    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> list[Path]:
        """Write ``tf`` in this layout (atomically); the paths written (the features file first)."""

    @abstractmethod
    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        """Folder (under the export root) that this layout puts slide files in."""

    def missing(self, tf: TileFeatures) -> list[str]:
        """What the peer needs that ``tf`` lacks, as field names with a hint (empty: complete)."""
        return [] if tf.coords is not None else ["coords (the item has none stored)"]

    def export_encoder_name(self, encoder: str | None, origin: str | None = None) -> str | None:
        """The encoder name as this layout's tools know it (None: unknown). ``origin``: the format the store's
        features were imported from (whose vocabulary ``encoder`` is in), None for mmcli's own."""
        return None if not encoder or encoder.lower() in UNKNOWN_ENCODERS else encoder

    def known_name(self, name: str) -> bool:
        """Whether the peer's own tools know an encoder called ``name`` (else the export warns)."""
        return True

    def encoder_of(self, path: Path) -> str | None:
        """The encoder a file names, read cheaply (its folder or its attributes; None when it names none)."""
        return None

    def write_index(self, out: Path, slides: list[tuple[str, str]]) -> None:  # noqa: B027 - optional hook
        """Extra index files this layout's own tools read, from ``(patient_id, slide_id)`` pairs (none here)."""

    def has_features(self, path: Path) -> bool:
        try:
            with open_checked(path) as h5:
                return self.features_key in h5
        except FormatError:
            return True  # a file that is refused is matched, so that the import names why it was refused
        except OSError:
            return False


FORMATS: Registry[type[H5Format]] = Registry("format", flag="--format")


def _clam_patches_geometry(path: Path) -> dict[str, Any]:
    """``patch_size``/``patch_level``/``downsample`` of CLAM's ``patches/<slide>.h5`` beside ``h5_files/``."""
    patches = path.parent.parent / "patches" / path.name
    if path.parent.name != "h5_files" or not patches.is_file():
        return {}
    try:
        with open_checked(patches) as h5:
            return _attrs(h5["coords"]) if "coords" in h5 else {}
    except (OSError, FormatError):
        return {}


def _clam_geometry(cattrs: dict[str, Any]) -> dict[str, Any]:
    """Tile geometry from CLAM's coords attrs: ``patch_size`` px at ``patch_level`` (``downsample`` of it)."""
    size, level = _num(cattrs.get("patch_size")), cattrs.get("patch_level")
    if not size or level is None:
        return {}
    ds = cattrs.get("downsample")
    down = float(ds[0]) if isinstance(ds, list) and ds and _num(ds[0]) else (1.0 if level == 0 else None)
    if down is None:
        return {"patch_size": size, "patch_level": int(level)}
    return {"patch_size": size, "patch_size_level0": float(round(size * down)), "level_downsample": down}


def coords_stride(coords: np.ndarray) -> float | None:
    """STAMP's ``get_stride``: the smallest step between distinct x or y coordinates (None below two)."""
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = [st[st > 0] for st in steps]
    found = [float(st.min()) for st in steps if st.size]
    return min(found) if found else None


@FORMATS.register("clam", coords="level-0 px")
class ClamFormat(H5Format):
    """CLAM: ``features`` + ``coords`` (level-0 px) per slide under ``h5_files/``, tensors under ``pt_files/``."""

    name = "clam"
    coords_dtype: Any = np.int32
    writes_empty = False

    def read(self, path: Path) -> TileFeatures:
        with open_checked(path) as h5:
            feats = _dataset(h5, "features", path)
            coords = h5.get("coords")
            if path.parent.name.startswith("slide_features_") or (feats.ndim == 1 and feats.size > 0):
                return self._read_slide(path, h5)
            f, c = _check(path, feats[()], coords[()] if coords is not None else None, "features")
            cattrs = _attrs(coords) if coords is not None else {}
            attrs = {"root": _attrs(h5), "coords": cattrs, "features": _attrs(feats)}
        warnings = [] if c is not None else [f"{path.name}: no 'coords' dataset; imported without coordinates"]
        patches = _clam_patches_geometry(path)
        if patches:
            attrs["patches"] = patches
        geo = _clam_geometry(cattrs) or _clam_geometry(patches)
        encoder = attrs["root"].get("encoder") or attrs["features"].get("encoder")
        tf = TileFeatures(f, None if c is None else np.rint(c).astype(np.int64), complete_geometry(geo),
                          str(encoder) if encoder else None, attrs, warnings)
        tf = _mmcli_read(tf)
        if "patch_size_level0" not in tf.geometry and tf.coords is not None:
            stride = coords_stride(tf.coords)
            if stride:  # CLAM's documented layout: patches/ lives in the patching run, not beside h5_files/
                tf.geometry = complete_geometry({**tf.geometry, "patch_size_level0": stride})
                tf.attrs["geometry_source"] = "coords stride"
                tf.warnings.append(f"{path.name}: tile size not stated; {int(stride)} level-0 px taken from the "
                                   "coords stride (as STAMP does). Fix: pass --patch-size (and --patch-level) to "
                                   "state it")
        return tf

    def _read_slide(self, path: Path, h5: Any) -> TileFeatures:
        """A slide embedding in a ``features`` dataset (TRIDENT's ``slide_features_<encoder>/``)."""
        f = _slide_vector(path, h5["features"][()], "features")
        attrs = {"root": _attrs(h5), "features": _attrs(h5["features"])}
        if "coords" in h5:
            attrs["coords"] = _attrs(h5["coords"])
        parent = path.parent.name
        enc = parent.removeprefix("slide_features_") if parent.startswith("slide_features_") else None
        return _mmcli_read(TileFeatures(f, None, {}, enc or attrs["root"].get("encoder"), attrs, level="slide"))

    def encoder_of(self, path: Path) -> str | None:
        try:
            with open_checked(path) as h5:
                enc = h5.attrs.get("encoder") or h5.attrs.get("mmcli_encoder")
                if "features" in h5:
                    enc = enc or h5["features"].attrs.get("encoder")
        except (OSError, FormatError):
            return None
        return _plain(enc) if enc else None

    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> list[Path]:
        import torch

        g = tf.geometry
        feats = np.asarray(tf.features, dtype=np.float32)  # CLAM's models are float32
        coords = np.asarray(tf.coords, dtype=self.coords_dtype)

        def fill(h5: Any) -> None:
            appendable(h5, "features", feats)
            ds = appendable(h5, "coords", coords)
            if "patch_size_level0" in g:  # CLAM ignores these here; mmcli's importer reads them
                ds.attrs["patch_size"] = int(round(g["patch_size_level0"]))
                ds.attrs["patch_level"] = 0
            if tf.encoder:
                h5.attrs["encoder"] = tf.encoder
            _mmcli_attrs(h5, tf)

        def fill_patches(h5: Any) -> None:  # what CLAM's create_patches_fp leaves, read by its heatmap code
            ds = appendable(h5, "coords", coords)
            ds.attrs["patch_size"] = int(round(g["patch_size_level0"]))
            ds.attrs["patch_level"] = 0
            ds.attrs["downsample"] = np.array([1.0, 1.0])
            ds.attrs["name"] = slide_id
            if {"level0_width", "level0_height"} <= g.keys():
                ds.attrs["level_dim"] = np.array([int(g["level0_width"]), int(g["level0_height"])])

        root = path.parent.parent
        pt = root / "pt_files" / f"{slide_id}.pt"
        write_atomic(path, fill)
        atomic_write_with(pt, lambda tmp: torch.save(torch.from_numpy(feats.copy()), tmp))
        written = [path, pt]
        if "patch_size_level0" in g:
            patches = root / "patches" / f"{slide_id}.h5"
            write_atomic(patches, fill_patches)
            written.append(patches)
        return written

    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        return Path("h5_files")

    def write_index(self, out: Path, slides: list[tuple[str, str]]) -> None:
        """``clam_dataset.csv`` (``case_id,slide_id``): CLAM's dataset table; add the label column."""
        write_rows(out / "clam_dataset.csv", ["case_id", "slide_id"], slides)


TRIDENT_NEEDS = ("patch_size", "patch_size_level0", "target_magnification", "level0_magnification")


@FORMATS.register("trident", coords="level-0 px")
class TridentFormat(ClamFormat):
    """TRIDENT: CLAM's datasets plus tile geometry attrs on ``coords``, one folder per encoder."""

    name = "trident"
    coords_dtype = np.int64
    needs_encoder_name = True
    writes_empty = True

    def read(self, path: Path) -> TileFeatures:
        tf = super().read(path)
        if tf.level == "slide":
            return tf
        c = tf.attrs.get("coords", {})
        geo = {k: c[k] for k in TRIDENT_NEEDS if _num(c.get(k)) is not None}
        for k, src in (("level0_width", "level0_width"), ("level0_height", "level0_height")):
            if _num(c.get(src)) is not None:
                geo[k] = c[src]
        if geo:
            tf.attrs.pop("geometry_source", None)
            tf.warnings = [w for w in tf.warnings if "coords stride" not in w]
        tf.geometry = complete_geometry({**tf.geometry, **geo})
        tf.encoder = self.encoder_of(path) or tf.encoder
        return tf

    def encoder_of(self, path: Path) -> str | None:
        parent = path.parent.name
        for prefix in ("slide_features_", "features_"):
            if parent.startswith(prefix):
                return parent.removeprefix(prefix)
        return super().encoder_of(path)

    def export_encoder_name(self, encoder: str | None, origin: str | None = None) -> str | None:
        return names.trident_name(encoder, origin)

    def known_name(self, name: str) -> bool:
        return name in names.TRIDENT_NAMES

    def missing(self, tf: TileFeatures) -> list[str]:
        miss = super().missing(tf)
        hints = {"level0_magnification": "level0_magnification (the slide's level-0 µm/px: pass --mpp)",
                 "target_magnification": "target_magnification (the tiles' µm/px is not stored)"}
        return miss + [hints.get(k, k) for k in TRIDENT_NEEDS if k not in tf.geometry]

    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> list[Path]:
        g = tf.geometry
        job = path.parent.parent  # <mag>x_<size>px_0px_overlap under the export root
        features_dir = Path(job.name) / path.parent.name  # relative, as TRIDENT writes it from its job dir

        def fill(h5: Any) -> None:
            ds = appendable(h5, "features", np.asarray(tf.features, dtype=np.float32))
            ds.attrs["name"] = slide_id
            ds.attrs["savetodir"] = features_dir.as_posix()
            if tf.encoder:
                ds.attrs["encoder"] = tf.encoder
            ds = appendable(h5, "coords", np.asarray(tf.coords, dtype=np.int64))
            ds.attrs["patch_size"] = int(round(g["patch_size"]))
            ds.attrs["patch_size_level0"] = int(round(g["patch_size_level0"]))
            ds.attrs["target_magnification"] = _mag(g["target_magnification"])
            ds.attrs["level0_magnification"] = _mag(g["level0_magnification"])
            ds.attrs["overlap"] = 0
            ds.attrs["name"] = slide_id
            ds.attrs["savetodir"] = job.name
            for k in ("level0_width", "level0_height"):
                if k in g:
                    ds.attrs[k] = int(g[k])
            _mmcli_attrs(h5, tf)

        write_atomic(path, fill)
        return [path]

    def write_index(self, out: Path, slides: list[tuple[str, str]]) -> None:
        """TRIDENT reads no dataset table."""

    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        mag, ps = geometry["target_magnification"], geometry["patch_size"]
        return Path(f"{_mag(mag):g}x_{int(round(ps))}px_0px_overlap") / f"features_{encoder}"


def _mag(m: float) -> float | int:
    """A magnification as TRIDENT writes it: an int when whole (20, 40), else the float (e.g. 19.8)."""
    return int(round(m)) if abs(m - round(m)) < 1e-3 else float(m)


@FORMATS.register("stamp", coords="um")
class StampFormat(H5Format):
    """STAMP: ``feats`` + ``coords`` in micrometres, root attrs naming the extractor and the tile size."""

    name = "stamp"
    features_key = "feats"
    needs_encoder_name = True
    writes_empty = False

    def read(self, path: Path) -> TileFeatures:
        with open_checked(path) as h5:
            feats = _dataset(h5, "feats", path)
            root = _attrs(h5)
            kind = str(root.get("feat_type") or "tile")
            if kind == "patient":
                raise FormatError(f"{path}: a STAMP patient encoding (feat_type 'patient', one vector per patient, "
                                  "named by patient id); import the slide encodings (feat_type 'slide') instead")
            if kind == "slide" or feats.ndim == 1:
                f = _slide_vector(path, feats[()], "feats")
                tf = TileFeatures(f, None, {}, str(root.get("encoder") or root.get("extractor") or "") or None,
                                  {"root": root}, level="slide")
                return _mmcli_read(tf)
            coords = h5["coords"][()] if "coords" in h5 else None
            f, c = _check(path, feats[()], coords, "feats")
        attrs = {"root": root}
        unit = str(root.get("unit", "")).lower()
        is_um = unit in ("um", "µm", "micron", "microns", "micrometer", "micrometre")
        geo: dict[str, Any] = {}
        size_um, size_px = _num(root.get("tile_size_um")), _num(root.get("tile_size_px"))
        if size_um is None and is_um:  # STAMP 2.0: "tile_size" in µm with unit "um"
            size_um = _num(root.get("tile_size"))
        if size_um:
            geo["tile_size_um"] = size_um
        if size_um and size_px:
            geo.update(patch_size=size_px, mpp=size_um / size_px)
        tf = TileFeatures(f, None, complete_geometry(geo), str(root.get("extractor") or "") or None, attrs)
        tf = _mmcli_read(tf)
        if c is None:
            tf.warnings.append(f"{path.name}: no 'coords' dataset; imported without coordinates")
        elif is_um:
            tf.coords_um = c.astype(np.float64)  # turned into px once the slide mpp is known
            if _num(root.get("slide_mpp")):  # written by mmcli's exporter (STAMP itself ignores it)
                tf.resolve_coords(_num(root.get("slide_mpp")))
        elif unit in ("px", "pixel", "pixels"):
            tf.coords = np.rint(c).astype(np.int64)
        else:
            tf.warnings.append(f"{path.name}: coords unit {root.get('unit')!r} unknown (expected 'um'); "
                               "imported without coordinates")
        return tf

    def encoder_of(self, path: Path) -> str | None:
        try:
            with open_checked(path) as h5:
                enc = h5.attrs.get("extractor") or h5.attrs.get("encoder")
        except (OSError, FormatError):
            return None
        return names.strip_hash(str(_plain(enc))) if enc else None

    def export_encoder_name(self, encoder: str | None, origin: str | None = None) -> str | None:
        return names.stamp_name(encoder, origin)

    def known_name(self, name: str) -> bool:
        return names.strip_hash(name) in names.STAMP_NAMES

    def missing(self, tf: TileFeatures) -> list[str]:
        g = tf.geometry
        miss = super().missing(tf)
        if "slide_mpp" not in g:
            miss.append("slide_mpp (STAMP coords are micrometres: pass --mpp, the slides' level-0 µm/px)")
        if "tile_size_um" not in g:
            miss.append("tile_size_um (the tile size is not stored)")
        return miss

    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> list[Path]:
        g = tf.geometry
        # STAMP writes float16; it reads any float (``.float()``), so a float32 item stays float32 (exact)
        dtype = np.float16 if tf.features.dtype == np.float16 else np.float32

        def fill(h5: Any) -> None:
            h5.create_dataset("feats", data=np.asarray(tf.features, dtype=dtype))
            h5.create_dataset("coords", data=(np.asarray(tf.coords, dtype=np.float64) * g["slide_mpp"])
                              .astype(np.float32))
            h5.attrs["extractor"] = tf.encoder or "unknown"
            h5.attrs["unit"] = "um"
            h5.attrs["tile_size_um"] = float(g["tile_size_um"])
            if "patch_size" in g:
                h5.attrs["tile_size_px"] = int(round(g["patch_size"]))
            h5.attrs["feat_type"] = "tile"
            h5.attrs["slide_mpp"] = float(g["slide_mpp"])  # extra: mmcli re-imports pixel coords exactly
            _mmcli_attrs(h5, tf)

        write_atomic(path, fill)
        return [path]

    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        return Path(encoder)


def get_format(name: str) -> H5Format:
    """The layout called ``name`` (any case); an unknown name is an InputError listing :data:`FORMATS`."""
    return FORMATS.get(name.lower())()
