"""CLAM's tile-feature layout (``h5_files/<slide>.h5`` + ``pt_files/<slide>.pt`` + ``patches/<slide>.h5``):
``features`` (N, D) float32 and ``coords`` (N, 2) int32 level-0 pixels (x, y) of the tile's top-left, both chunked
along N (CLAM's ``save_hdf5`` appends batches); ``pt_files`` holds ``torch.save`` of the plain float32 tensor that
CLAM's ``Generic_MIL_Dataset`` loads with ``weights_only=True``; ``patches/`` holds the coords with
``patch_size``/``patch_level`` (what CLAM's heatmap code reads). On import the ``patches/`` file beside
``h5_files/`` gives the tile size and level; without it (CLAM's documented layout keeps ``patches/`` in the patching
run's folder) the tile size is ``--patch-size`` / ``--patch-level``, else the coords stride as STAMP derives it. A
slide without tissue is not written (CLAM writes no file for it; ``CLAM_SB`` fails on one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.interop.formats import (
    H5Format,
    TileFeatures,
    appendable,
    attrs_of,
    check_tiles,
    complete_geometry,
    dataset,
    mmcli_attrs,
    mmcli_read,
    num,
    plain,
    register_format,
    slide_vector,
    write_atomic,
    write_rows,
)
from mmcli.features.interop.h5safe import open_checked
from mmcli.pipeline.errors import FormatError
from mmcli.pipeline.io import atomic_write_with


def _clam_patches_geometry(path: Path) -> dict[str, Any]:
    """``patch_size``/``patch_level``/``downsample`` of CLAM's ``patches/<slide>.h5`` beside ``h5_files/``."""
    patches = path.parent.parent / "patches" / path.name
    if path.parent.name != "h5_files" or not patches.is_file():
        return {}
    try:
        with open_checked(patches) as h5:
            return attrs_of(h5["coords"]) if "coords" in h5 else {}
    except (OSError, FormatError):
        return {}


def _clam_geometry(cattrs: dict[str, Any]) -> dict[str, Any]:
    """Tile geometry from CLAM's coords attrs: ``patch_size`` px at ``patch_level`` (``downsample`` of it)."""
    size, level = num(cattrs.get("patch_size")), cattrs.get("patch_level")
    if not size or level is None:
        return {}
    ds = cattrs.get("downsample")
    down = float(ds[0]) if isinstance(ds, list) and ds and num(ds[0]) else (1.0 if level == 0 else None)
    if down is None:
        return {"patch_size": size, "patch_level": int(level)}
    return {"patch_size": size, "patch_size_level0": float(round(size * down)), "level_downsample": down}


def coords_stride(coords: np.ndarray) -> float | None:
    """STAMP's ``get_stride``: the smallest step between distinct x or y coordinates (None below two)."""
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = [st[st > 0] for st in steps]
    found = [float(st.min()) for st in steps if st.size]
    return min(found) if found else None


@register_format("clam", coords="level-0 px")
class ClamFormat(H5Format):
    """CLAM: ``features`` + ``coords`` (level-0 px) per slide under ``h5_files/``, tensors under ``pt_files/``."""

    name = "clam"
    coords_dtype: Any = np.int32
    writes_empty = False

    def read(self, path: Path) -> TileFeatures:
        with open_checked(path) as h5:
            feats = dataset(h5, "features", path)
            coords = h5.get("coords")
            if path.parent.name.startswith("slide_features_") or (feats.ndim == 1 and feats.size > 0):
                return self._read_slide(path, h5)
            f, c = check_tiles(path, feats[()], coords[()] if coords is not None else None, "features")
            cattrs = attrs_of(coords) if coords is not None else {}
            attrs = {"root": attrs_of(h5), "coords": cattrs, "features": attrs_of(feats)}
        warnings = [] if c is not None else [f"{path.name}: no 'coords' dataset; imported without coordinates"]
        patches = _clam_patches_geometry(path)
        if patches:
            attrs["patches"] = patches
        geo = _clam_geometry(cattrs) or _clam_geometry(patches)
        encoder = attrs["root"].get("encoder") or attrs["features"].get("encoder")
        tf = TileFeatures(f, None if c is None else np.rint(c).astype(np.int64), complete_geometry(geo),
                          str(encoder) if encoder else None, attrs, warnings)
        tf = mmcli_read(tf)
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
        f = slide_vector(path, h5["features"][()], "features")
        attrs = {"root": attrs_of(h5), "features": attrs_of(h5["features"])}
        if "coords" in h5:
            attrs["coords"] = attrs_of(h5["coords"])
        parent = path.parent.name
        enc = parent.removeprefix("slide_features_") if parent.startswith("slide_features_") else None
        return mmcli_read(TileFeatures(f, None, {}, enc or attrs["root"].get("encoder"), attrs, level="slide"))

    def encoder_of(self, path: Path) -> str | None:
        try:
            with open_checked(path) as h5:
                enc = h5.attrs.get("encoder") or h5.attrs.get("mmcli_encoder")
                if "features" in h5:
                    enc = enc or h5["features"].attrs.get("encoder")
        except (OSError, FormatError):
            return None
        return plain(enc) if enc else None

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
            mmcli_attrs(h5, tf)

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


