"""TRIDENT's tile-feature layout (``<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``, ``<encoder>``
TRIDENT's name, :mod:`~mmcli.features.interop.names`): as CLAM with int64 coords, plus attrs on ``coords``:
``patch_size`` (px at the target magnification), ``patch_size_level0``, ``target_magnification``,
``level0_magnification``, ``overlap``, ``name``, ``savetodir`` (and ``level0_width``/``level0_height`` when known),
and ``name``/``savetodir``/``encoder`` on ``features``. ``savetodir`` is the folder relative to the export root,
never an absolute path of this machine (TRIDENT writes its job-dir-relative folder; none of its readers use it). A
slide without tissue is an empty (0, D) / (0, 2) file, as TRIDENT writes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.interop import names
from mmcli.features.interop.clam import ClamFormat
from mmcli.features.interop.formats import (
    TileFeatures,
    appendable,
    complete_geometry,
    mmcli_attrs,
    num,
    register_format,
    write_atomic,
)

TRIDENT_NEEDS = ("patch_size", "patch_size_level0", "target_magnification", "level0_magnification")


@register_format("trident", coords="level-0 px")
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
        geo = {k: c[k] for k in TRIDENT_NEEDS if num(c.get(k)) is not None}
        for k, src in (("level0_width", "level0_width"), ("level0_height", "level0_height")):
            if num(c.get(src)) is not None:
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
            mmcli_attrs(h5, tf)

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


