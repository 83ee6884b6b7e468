"""Tiny whole-slide images for tests, written with tifffile: Aperio-style SVS and generic tiled pyramids.

``tissue_image`` draws an H&E-like blob (pink stroma, purple nuclei) on a glass background in physical units,
so the same ``seed`` gives the same tissue at any resolution (``mpp``). ``from helpers.slides import ...``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy.ndimage import maximum_filter

GLASS = (242, 240, 244)


def tissue_image(
    width_um: float, height_um: float, mpp: float, seed: int = 0, blank: bool = False,
    box: tuple[float, float, float, float] = (0.15, 0.2, 0.6, 0.55),
) -> np.ndarray:
    """RGB uint8 image of ``width_um x height_um`` at ``mpp``; tissue fills the ellipse in ``box``
    (x0, y0, x1, y1 as fractions of the slide); ``blank`` gives glass only."""
    rng = np.random.default_rng(seed)
    w, h = round(width_um / mpp), round(height_um / mpp)
    img = np.empty((h, w, 3), np.float32)
    img[:] = GLASS
    img += 1.5 * rng.standard_normal(img.shape, dtype=np.float32)
    if not blank:
        yy, xx = np.ogrid[0:h, 0:w]
        x0, y0, x1, y1 = box
        cx, cy, rx, ry = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h, (x1 - x0) / 2 * w, (y1 - y0) / 2 * h
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        img[inside] = (226, 150, 190)
        # nuclei: dark purple squares ~6 µm wide, placed in micrometres so every resolution shows the same
        n = int(inside.sum() * mpp * mpp / 150)
        pts = (rng.uniform([x0, y0], [x1, y1], size=(n, 2)) * [w, h]).astype(int)
        seeds = np.zeros((h, w), np.uint8)
        seeds[np.clip(pts[:, 1], 0, h - 1), np.clip(pts[:, 0], 0, w - 1)] = 1
        nuclei = maximum_filter(seeds, size=max(1, round(6.0 / mpp))).astype(bool) & inside
        img[nuclei] = (90, 50, 140)
        img[inside] += 6 * rng.standard_normal((int(inside.sum()), 3), dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _levels(img: np.ndarray, downsamples: tuple[int, ...]) -> list[np.ndarray]:
    h, w = img.shape[:2]
    out = []
    for d in downsamples:
        if d == 1:
            out.append(img)
        else:
            out.append(np.asarray(Image.fromarray(img).resize((max(1, w // d), max(1, h // d)), Image.BOX)))
    return out


def write_aperio(path: str | Path, img: np.ndarray, mpp: float, downsamples: tuple[int, ...] = (1, 4),
                 tile: int = 256, quality: int = 90) -> Path:
    """Aperio SVS: tiled JPEG levels, ImageDescription with ``MPP`` and ``AppMag`` (OpenSlide vendor aperio)."""
    path = Path(path)
    h, w = img.shape[:2]
    mag = round(10.0 / mpp)
    levels = _levels(img, downsamples)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        head = f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
        tif.write(levels[0], tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                  photometric="rgb", description=f"{head}|AppMag = {mag}|MPP = {mpp:.4f}", metadata=None)
        # IFD 1 is the (stripped) thumbnail in Aperio files; readers skip it when listing levels
        thumb = np.asarray(Image.fromarray(img).resize((max(1, w // 16), max(1, h // 16)), Image.BOX))
        tif.write(thumb, compression="jpeg", photometric="rgb", description=f"{head} -> thumbnail", metadata=None)
        for lv in levels[1:]:
            lh, lw = lv.shape[:2]
            tif.write(lv, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                      photometric="rgb", description=f"{head} -> {lw}x{lh} JPEG/RGB Q={quality}", metadata=None)
    return path


def write_generic(path: str | Path, img: np.ndarray, mpp: float | None, downsamples: tuple[int, ...] = (1, 2, 4),
                  tile: int = 256, compression: str = "jpeg") -> Path:
    """Generic tiled pyramidal TIFF, one page per level; mpp (if given) in the resolution tags (pixels/cm)."""
    path = Path(path)
    with tifffile.TiffWriter(path) as tif:
        for d, lv in zip(downsamples, _levels(img, downsamples)):
            kw = {}
            if mpp is not None:
                ppcm = 1e4 / (mpp * d)
                kw = dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            tif.write(lv, tile=(tile, tile), compression=compression, photometric="rgb", metadata=None,
                      subfiletype=0 if d == 1 else 1, **kw)
    return path


def ellipse_px(w: int, h: int, box: tuple[float, float, float, float] = (0.15, 0.2, 0.6, 0.55)
               ) -> tuple[float, float, float, float]:
    """Centre and radii ``(cx, cy, rx, ry)`` in pixels of the tissue ellipse of a ``w x h`` slide."""
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2 * w, (y0 + y1) / 2 * h, (x1 - x0) / 2 * w, (y1 - y0) / 2 * h


def inside_ellipse(x: np.ndarray, y: np.ndarray, w: int, h: int, grow: float = 1.0) -> np.ndarray:
    """Which level-0 points lie inside the tissue ellipse (radii scaled by ``grow``)."""
    cx, cy, rx, ry = ellipse_px(w, h)
    return ((x - cx) / (rx * grow)) ** 2 + ((y - cy) / (ry * grow)) ** 2 <= 1.0
