"""Tile-feature h5 files of CLAM, TRIDENT and STAMP: what every layout shares, and the :data:`FORMATS` registry
(``--format`` of ``mmcli import`` / ``mmcli export`` takes its names).

One module per peer (:mod:`~mmcli.features.interop.clam`, :mod:`~mmcli.features.interop.trident`,
:mod:`~mmcli.features.interop.stamp`) registers its layout with ``@register_format("name", coords=...)``; the
registry's lazy table is read from those decorators. Each writer writes what the peer's own reading code needs, as
the peer itself writes it, and refuses (:meth:`H5Format.missing`) an item that lacks something the peer needs.

Slide-level embeddings are read too (:attr:`TileFeatures.level` ``"slide"``: TRIDENT's ``slide_features_<encoder>/``,
STAMP's slide encodings); they import as one row per slide. Every file is opened through
:func:`~mmcli.features.interop.h5safe.open_checked` (no external storage, virtual datasets or non-hard links; a cap
on the decompressed size). mmcli's writers add root attributes the peers ignore: ``mmcli_encoder_id``,
``mmcli_dtype`` and ``mmcli_geometry`` (JSON), so that ``mmcli import`` of an export gives back the same items
(same encoder_id, dtype, tile geometry). Inside mmcli coordinates are level-0 pixels (int64); magnification
follows ``magnification = 10 / mpp`` (20x = 0.5 µm/px).
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


def plain(v: Any) -> Any:
    """h5 attribute value -> JSON-able Python value."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def attrs_of(obj: Any) -> dict[str, Any]:
    return {str(k): plain(v) for k, v in obj.attrs.items()}


def num(v: Any) -> float | None:
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
    g = {k: float(v) for k, v in geo.items() if k in GEOMETRY_KEYS and num(v) is not None}
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


def dataset(h5: Any, key: str, path: Path) -> Any:
    """``h5[key]``, or a FormatError naming the dataset and the file."""
    if key not in h5:
        raise FormatError(f"missing dataset '{key}' in {path} (it has {sorted(h5.keys())})")
    return h5[key]


def slide_vector(path: Path, feats: Any, feat_name: str) -> np.ndarray:
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


def check_tiles(path: Path, feats: Any, coords: Any, feat_name: str) -> tuple[np.ndarray, np.ndarray | None]:
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


def mmcli_attrs(h5: Any, tf: TileFeatures) -> None:
    """Root attributes that mmcli's importer reads back (the peers ignore them)."""
    h5.attrs["exported_by"] = f"mmcli {__version__}"
    if tf.encoder_id:
        h5.attrs["mmcli_encoder_id"] = tf.encoder_id
    h5.attrs["mmcli_dtype"] = str(tf.dtype or tf.features.dtype)
    h5.attrs["mmcli_geometry"] = json.dumps(tf.geometry, sort_keys=True)
    if tf.encoder:
        h5.attrs["mmcli_encoder"] = tf.encoder


def mmcli_read(tf: TileFeatures) -> TileFeatures:
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
FORMATS.scan(Path(__file__).parent, __package__ or "mmcli.features.interop", "register_format")


def register_format(name: str, *, coords: str) -> Any:
    """Class decorator: the layout ``name`` (its coords unit, ``level-0 px`` or ``um``, in the registry's meta)."""
    return FORMATS.register(name, coords=coords)


def get_format(name: str) -> H5Format:
    """The layout called ``name`` (any case); an unknown name is an InputError listing :data:`FORMATS`."""
    return FORMATS.get(name.lower())()
