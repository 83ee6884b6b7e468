"""Tile-feature h5 layouts of CLAM, TRIDENT and STAMP: one reader and one writer per layout, in the
:data:`FORMATS` registry (``--format`` of ``mmcli import`` / ``mmcli export`` takes its names).

- **CLAM** (``h5_files/<slide>.h5``): ``features`` (N, D) float32, ``coords`` (N, 2) level-0 pixels (x, y) of the
  tile's top-left; CLAM's patching step may leave ``patch_size``/``patch_level`` attrs on ``coords``. mmcli's
  exporter adds a root ``encoder`` attribute (ignored by CLAM) so that a re-import knows the encoder.
- **TRIDENT** (``<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``): as CLAM, plus attrs on
  ``coords``: ``patch_size`` (px at the target magnification), ``patch_size_level0``, ``target_magnification``,
  ``level0_magnification``, ``overlap``, ``name``.
- **STAMP** (``<extractor>[-<hash>]/<slide>.h5``): ``feats`` (N, D) float16, ``coords`` (N, 2) float in
  **micrometres** from the slide's top-left, root attrs ``extractor``, ``unit`` (``"um"``), ``tile_size_um``,
  ``tile_size_px`` (and ``feat_type``, ``stamp_version``, ``code_hash``). mmcli's exporter adds ``slide_mpp``
  (level-0 µm/px), which STAMP ignores and mmcli's importer uses to recover pixel coords exactly.

Inside mmcli coordinates are level-0 pixels (int64): STAMP's micrometres are divided by the slide's level-0
µm/px (``slide_mpp``) on import and multiplied back on export. Magnification follows the usual convention
``magnification = 10 / mpp`` (20x = 0.5 µm/px).
"""
from __future__ import annotations

import csv
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.pipeline.errors import FormatError
from mmcli.pipeline.io import atomic_write_text, atomic_write_with
from mmcli.pipeline.registry import Registry

# Tile-geometry keys shared with the WSI extractor's item attrs (TRIDENT-like names).
GEOMETRY_KEYS = ("mpp", "patch_size", "patch_size_level0", "slide_mpp", "target_magnification",
                 "level0_magnification")


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

    def resolve_coords(self, slide_mpp: float | None) -> None:
        """Turn micrometre coords into level-0 pixels with ``slide_mpp`` (µm/px); without it drop them loudly."""
        if self.coords_um is None:
            return
        if slide_mpp:
            self.coords = np.rint(self.coords_um / slide_mpp).astype(np.int64)
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


def complete_geometry(geo: dict[str, Any]) -> dict[str, float]:
    """Fill what follows from the rest (mpp <-> magnification, level-0 size <-> target size)."""
    g = {k: float(v) for k, v in geo.items() if k in GEOMETRY_KEYS and _num(v) is not None}
    for mpp, mag in (("mpp", "target_magnification"), ("slide_mpp", "level0_magnification")):
        if mpp not in g and mag in g:
            g[mpp] = 10.0 / g[mag]
        if mag not in g and mpp in g:
            g[mag] = round(10.0 / g[mpp], 3)
    if "patch_size_level0" not in g and {"patch_size", "mpp", "slide_mpp"} <= g.keys():
        g["patch_size_level0"] = float(round(g["patch_size"] * g["mpp"] / g["slide_mpp"]))
    if "patch_size" not in g and {"patch_size_level0", "mpp", "slide_mpp"} <= g.keys():
        g["patch_size"] = float(round(g["patch_size_level0"] * g["slide_mpp"] / g["mpp"]))
    return g


def _check(path: Path, feats: Any, coords: Any, feat_name: str) -> tuple[np.ndarray, np.ndarray | None]:
    f = np.asarray(feats)
    if f.ndim == 3 and f.shape[0] == 1:  # some tools keep a batch axis
        f = f[0]
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise FormatError(f"{path}: '{feat_name}' must be (N, D) with N, D > 0, got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.floating):
        raise FormatError(f"{path}: '{feat_name}' must be floating point, got {f.dtype}")
    if not np.isfinite(f).all():
        raise FormatError(f"{path}: '{feat_name}' holds NaN or inf")
    c = None
    if coords is not None:
        c = np.asarray(coords)
        if c.ndim == 3 and c.shape[0] == 1:
            c = c[0]
        if c.ndim != 2 or c.shape != (f.shape[0], 2):
            raise FormatError(f"{path}: 'coords' must be (N, 2) with N={f.shape[0]}, got shape {c.shape}")
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


class H5Format(ABC):
    """One tile-feature layout (stateless: :func:`get_format` builds one per lookup)."""

    name: str
    features_key: str = "features"

    @abstractmethod
    def read(self, path: Path) -> TileFeatures:
        """Tile features of ``path``; coords in level-0 px when the file allows it."""

    @abstractmethod
    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> None:
        """Write ``tf`` in this layout (atomically)."""

    @abstractmethod
    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        """Folder (under the export root) that this layout puts slide files in."""

    def write_index(self, out: Path, slides: list[tuple[str, str]]) -> None:  # noqa: B027 - optional hook
        """Extra index files this layout's own tools read, from ``(patient_id, slide_id)`` pairs (none here)."""

    def has_features(self, path: Path) -> bool:
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                return self.features_key in h5
        except OSError:
            return False


FORMATS: Registry[type[H5Format]] = Registry("format", flag="--format")


@FORMATS.register("clam", coords="level-0 px")
class ClamFormat(H5Format):
    """CLAM: ``features`` + ``coords`` (level-0 px) per slide under ``h5_files/``."""

    name = "clam"

    def read(self, path: Path) -> TileFeatures:
        import h5py

        with h5py.File(path, "r") as h5:
            if "features" not in h5:
                raise FormatError(f"{path}: no 'features' dataset; not a CLAM/TRIDENT features file")
            coords = h5.get("coords")
            f, c = _check(path, h5["features"][()], coords[()] if coords is not None else None, "features")
            cattrs = _attrs(coords) if coords is not None else {}
            attrs = {"root": _attrs(h5), "coords": cattrs, "features": _attrs(h5["features"])}
        warnings = [] if c is not None else [f"{path.name}: no 'coords' dataset; imported without coordinates"]
        geo: dict[str, Any] = {}
        if cattrs.get("patch_level") == 0 and _num(cattrs.get("patch_size")):
            geo["patch_size_level0"] = cattrs["patch_size"]
        encoder = attrs["root"].get("encoder")  # mmcli's exporter names it; CLAM itself does not
        return TileFeatures(f, None if c is None else np.rint(c).astype(np.int64), complete_geometry(geo),
                            str(encoder) if encoder else None, attrs, warnings)

    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> None:
        g = tf.geometry

        def fill(h5: Any) -> None:
            h5.create_dataset("features", data=np.asarray(tf.features, dtype=np.float32))
            if tf.coords is not None:
                ds = h5.create_dataset("coords", data=np.asarray(tf.coords, dtype=np.int64))
                if "patch_size_level0" in g:  # CLAM reads patch_size at patch_level (level 0 here)
                    ds.attrs["patch_size"] = int(g["patch_size_level0"])
                    ds.attrs["patch_level"] = 0
            if tf.encoder:
                h5.attrs["encoder"] = tf.encoder
            h5.attrs["exported_by"] = f"mmcli {__version__}"

        write_atomic(path, fill)

    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        return Path("h5_files")

    def write_index(self, out: Path, slides: list[tuple[str, str]]) -> None:
        """``clam_dataset.csv`` (``case_id,slide_id``): CLAM's dataset table; add the label column."""
        write_rows(out / "clam_dataset.csv", ["case_id", "slide_id"], slides)


@FORMATS.register("trident", coords="level-0 px")
class TridentFormat(ClamFormat):
    """TRIDENT: CLAM's datasets plus tile geometry attrs on ``coords``, one folder per encoder."""

    name = "trident"

    def read(self, path: Path) -> TileFeatures:
        tf = super().read(path)
        c = tf.attrs.get("coords", {})
        geo = {k: c[k] for k in ("patch_size", "patch_size_level0", "target_magnification", "level0_magnification")
               if _num(c.get(k)) is not None}
        tf.geometry = complete_geometry(geo)
        parent = path.parent.name
        tf.encoder = parent.removeprefix("features_") if parent.startswith("features_") else tf.encoder
        return tf

    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> None:
        g = tf.geometry

        def fill(h5: Any) -> None:
            h5.create_dataset("features", data=np.asarray(tf.features, dtype=np.float32))
            h5["features"].attrs["name"] = slide_id
            if tf.coords is not None:
                ds = h5.create_dataset("coords", data=np.asarray(tf.coords, dtype=np.int64))
                for k in ("patch_size", "patch_size_level0"):
                    if k in g:
                        ds.attrs[k] = int(round(g[k]))
                for k in ("target_magnification", "level0_magnification"):
                    if k in g:
                        ds.attrs[k] = float(g[k])
                ds.attrs["overlap"] = 0
                ds.attrs["name"] = slide_id
            h5.attrs["exported_by"] = f"mmcli {__version__}"

        write_atomic(path, fill)

    def write_index(self, out: Path, slides: list[tuple[str, str]]) -> None:
        """TRIDENT reads no dataset table."""

    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        mag, ps = geometry.get("target_magnification"), geometry.get("patch_size")
        job = Path(f"{mag:g}x_{int(ps)}px_0px_overlap") if mag and ps else Path(".")
        return job / f"features_{encoder}"


@FORMATS.register("stamp", coords="um")
class StampFormat(H5Format):
    """STAMP: ``feats`` (float16) + ``coords`` in micrometres, root attrs naming the extractor."""

    name = "stamp"
    features_key = "feats"

    def read(self, path: Path) -> TileFeatures:
        import h5py

        with h5py.File(path, "r") as h5:
            if "feats" not in h5:
                raise FormatError(f"{path}: no 'feats' dataset; not a STAMP features file")
            coords = h5["coords"][()] if "coords" in h5 else None
            f, c = _check(path, h5["feats"][()], coords, "feats")
            attrs = {"root": _attrs(h5)}
        root = attrs["root"]
        geo: dict[str, Any] = {}
        size_um, size_px = _num(root.get("tile_size_um")), _num(root.get("tile_size_px"))
        if size_um and size_px:
            geo.update(patch_size=size_px, mpp=size_um / size_px)
        tf = TileFeatures(f, None, complete_geometry(geo), str(root.get("extractor") or "") or None, attrs)
        unit = str(root.get("unit", "")).lower()
        if c is None:
            tf.warnings.append(f"{path.name}: no 'coords' dataset; imported without coordinates")
        elif unit in ("um", "µm", "micron", "microns", "micrometer", "micrometre"):
            tf.coords_um = c.astype(np.float64)  # turned into px once the slide mpp is known
            if _num(root.get("slide_mpp")):  # written by mmcli's exporter (STAMP itself ignores it)
                tf.resolve_coords(_num(root.get("slide_mpp")))
        elif unit in ("px", "pixel", "pixels"):
            tf.coords = np.rint(c).astype(np.int64)
        else:
            tf.warnings.append(f"{path.name}: coords unit {root.get('unit')!r} unknown (expected 'um'); "
                               "imported without coordinates")
        return tf

    def write(self, path: Path, tf: TileFeatures, slide_id: str) -> None:
        g = tf.geometry
        if tf.coords is not None and "slide_mpp" not in g:
            raise FormatError(f"{slide_id}: STAMP coords are micrometres and the slide's level-0 mpp is unknown. "
                              "Fix: pass --mpp (level-0 µm/px of the slides).")

        def fill(h5: Any) -> None:
            h5.create_dataset("feats", data=np.asarray(tf.features, dtype=np.float16))
            if tf.coords is not None:
                h5.create_dataset("coords", data=np.asarray(tf.coords, dtype=np.float64) * g["slide_mpp"])
            h5.attrs["extractor"] = tf.encoder or "unknown"
            h5.attrs["unit"] = "um"
            if "patch_size" in g and "mpp" in g:
                h5.attrs["tile_size_um"] = float(g["patch_size"] * g["mpp"])
                h5.attrs["tile_size_px"] = int(round(g["patch_size"]))
            h5.attrs["feat_type"] = "tile"
            if "slide_mpp" in g:  # extra attribute, so that mmcli can re-import pixel coords exactly
                h5.attrs["slide_mpp"] = float(g["slide_mpp"])
            h5.attrs["exported_by"] = f"mmcli {__version__}"

        write_atomic(path, fill)

    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        return Path(encoder)


def get_format(name: str) -> H5Format:
    """The layout called ``name`` (any case); an unknown name is an InputError listing :data:`FORMATS`."""
    return FORMATS.get(name.lower())()
