"""STAMP's tile-feature layout (``<extractor>/<slide>.h5``): ``feats`` (N, D), ``coords`` (N, 2) float32 in
**micrometres** from the slide's top-left, root attrs ``extractor`` (one of STAMP's names), ``unit`` (``"um"``),
``tile_size_um``, ``tile_size_px``, ``feat_type``. STAMP 2.0 files state ``tile_size`` (µm) with ``unit="um"``
instead; both are read. STAMP turns a tile size in µm into level-0 pixels with ``ceil(tile_size_um / slide_mpp)``;
so does the importer. A slide without tissue is not written (STAMP writes no file for it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.interop import names
from mmcli.features.interop.formats import (
    H5Format,
    TileFeatures,
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
)
from mmcli.features.interop.h5safe import open_checked
from mmcli.pipeline.errors import FormatError


@register_format("stamp", coords="um")
class StampFormat(H5Format):
    """STAMP: ``feats`` + ``coords`` in micrometres, root attrs naming the extractor and the tile size."""

    name = "stamp"
    features_key = "feats"
    needs_encoder_name = True
    writes_empty = False

    def read(self, path: Path) -> TileFeatures:
        with open_checked(path) as h5:
            feats = dataset(h5, "feats", path)
            root = attrs_of(h5)
            kind = str(root.get("feat_type") or "tile")
            if kind == "patient":
                raise FormatError(f"{path}: a STAMP patient encoding (feat_type 'patient', one vector per patient, "
                                  "named by patient id); import the slide encodings (feat_type 'slide') instead")
            if kind == "slide" or feats.ndim == 1:
                f = slide_vector(path, feats[()], "feats")
                tf = TileFeatures(f, None, {}, str(root.get("encoder") or root.get("extractor") or "") or None,
                                  {"root": root}, level="slide")
                return mmcli_read(tf)
            coords = h5["coords"][()] if "coords" in h5 else None
            f, c = check_tiles(path, feats[()], coords, "feats")
        attrs = {"root": root}
        unit = str(root.get("unit", "")).lower()
        is_um = unit in ("um", "µm", "micron", "microns", "micrometer", "micrometre")
        geo: dict[str, Any] = {}
        size_um, size_px = num(root.get("tile_size_um")), num(root.get("tile_size_px"))
        if size_um is None and is_um:  # STAMP 2.0: "tile_size" in µm with unit "um"
            size_um = num(root.get("tile_size"))
        if size_um:
            geo["tile_size_um"] = size_um
        if size_um and size_px:
            geo.update(patch_size=size_px, mpp=size_um / size_px)
        tf = TileFeatures(f, None, complete_geometry(geo), str(root.get("extractor") or "") or None, attrs)
        tf = mmcli_read(tf)
        if c is None:
            tf.warnings.append(f"{path.name}: no 'coords' dataset; imported without coordinates")
        elif is_um:
            tf.coords_um = c.astype(np.float64)  # turned into px once the slide mpp is known
            if num(root.get("slide_mpp")):  # written by mmcli's exporter (STAMP itself ignores it)
                tf.resolve_coords(num(root.get("slide_mpp")))
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
        return names.strip_hash(str(plain(enc))) if enc else None

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
            mmcli_attrs(h5, tf)

        write_atomic(path, fill)
        return [path]

    def relative_dir(self, encoder: str, geometry: dict[str, float]) -> Path:
        return Path(encoder)


