"""Tissue detection on a slide thumbnail and the per-slide QC image.

Tissue is where the HSV saturation is high: stained tissue is pink/purple, glass is grey-white. The
threshold is Otsu's on the (median-filtered) saturation, floored at ``min_saturation`` so that a blank slide,
whose saturation is only noise, yields no tissue. Morphological closing then opening cleans the mask, holes
smaller than ``max_hole_um2`` are filled (small gaps inside tissue; large fat or lumen areas stay out) and
components smaller than ``min_area_um2`` (dust, specks) are dropped. Sizes are in micrometres so the
parameters mean the same at every thumbnail resolution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmcli.pipeline.io import atomic_write_with


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue`. Lengths in µm, areas in µm², saturation in [0, 1]."""

    thumb_mpp: float = 8.0  # resolution of the thumbnail the mask is computed on (coarsest allowed)
    saturation_threshold: float | None = None  # fixed threshold; None = Otsu
    min_saturation: float = 0.06  # floor for the Otsu threshold
    min_value: float = 0.12  # darker pixels (pen, slide edges, black borders) are not tissue
    median_um: float = 24.0  # median filter width before thresholding
    close_um: float = 16.0  # closing radius (joins nearby fragments)
    open_um: float = 8.0  # opening radius (removes thin debris)
    max_hole_um2: float = 20_000.0  # fill holes smaller than this
    min_area_um2: float = 20_000.0  # drop components smaller than this

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TissueMask:
    """Boolean mask over a thumbnail whose pixels are ``scale`` = (sx, sy) level-0 pixels wide/high."""

    mask: np.ndarray
    scale: tuple[float, float]
    threshold: float
    mpp: float  # µm per thumbnail pixel

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _radius(um: float, mpp: float) -> int:
    return max(0, round(um / mpp))


def detect_tissue(thumb: np.ndarray, mpp: float, params: TissueParams | None = None) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB ``thumb`` whose pixels are ``mpp`` µm wide; returns ``(mask, threshold)``."""
    from scipy import ndimage
    from skimage import filters

    p = params or TissueParams()
    sat, val = saturation_value(thumb)
    if (k := round(p.median_um / mpp)) >= 2:  # odd window, 3..7 px, about median_um wide
        sat = ndimage.median_filter(sat, size=min(7, k | 1))
    if p.saturation_threshold is not None:
        thr = float(p.saturation_threshold)
    else:
        try:
            thr = max(float(filters.threshold_otsu(sat)), p.min_saturation)
        except ValueError:  # a constant image has no Otsu threshold
            thr = p.min_saturation
    mask = sat > thr
    del sat
    mask &= val > round(p.min_value * 255)
    del val
    if (r := _radius(p.close_um, mpp)) >= 1:
        mask = _morph(ndimage.binary_closing, mask, r)
    if (r := _radius(p.open_um, mpp)) >= 1:
        mask = _morph(ndimage.binary_opening, mask, r)
    return clean_mask(mask, mpp, p), thr


def clean_mask(mask: np.ndarray, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Fill holes smaller than ``max_hole_um2`` and drop pieces smaller than ``min_area_um2`` of a mask whose
    pixels are ``mpp`` µm wide (also applied to a learned segmenter's mask)."""
    p = params or TissueParams()
    px_area = mpp * mpp
    if p.max_hole_um2 > 0:
        mask = fill_small_holes(mask, p.max_hole_um2 / px_area)
    if p.min_area_um2 > 0:
        mask = drop_small_components(mask, p.min_area_um2 / px_area)
    return mask.astype(bool)


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation (float32, [0, 1]) and value (uint8 max channel) without the float64 HSV image that
    ``skimage.color.rgb2hsv`` builds (memory matters on large thumbnails)."""
    mx = rgb.max(axis=-1)
    sat = mx - rgb.min(axis=-1)
    sat = sat.astype(np.float32)
    np.divide(sat, mx, out=sat, where=mx > 0)
    return sat, mx


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def _morph(op: Any, mask: np.ndarray, r: int) -> np.ndarray:
    """Binary morphology with a disk; padded so that tissue touching the thumbnail edge is not eroded."""
    padded = np.pad(mask, r + 1, mode="edge")
    return op(padded, structure=_disk(r))[r + 1:-(r + 1), r + 1:-(r + 1)]


def drop_small_components(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Remove 8-connected components with fewer than ``min_px`` pixels."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    keep = np.bincount(lab.ravel()) >= min_px
    keep[0] = False
    return keep[lab]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background regions smaller than ``max_px`` pixels that do not touch the thumbnail edge."""
    from scipy import ndimage

    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[edge] = False
    return mask | fill[lab]


def thumbnail_mpp(slide_mpp: float, level0_size: tuple[int, int], tile_um: float, params: TissueParams,
                  max_pixels: int = 8_000_000) -> float:
    """µm/px of the detection thumbnail: ``params.thumb_mpp``, finer when tiles are small (at least 4 mask
    pixels across a tile), never finer than the slide, and at most ``max_pixels`` pixels, so that tissue
    detection needs about the same memory on every slide (about 20 bytes per thumbnail pixel)."""
    mpp = min(params.thumb_mpp, tile_um / 4.0)
    area_um2 = level0_size[0] * level0_size[1] * slide_mpp * slide_mpp
    return max(mpp, slide_mpp, (area_um2 / max_pixels) ** 0.5)


def tissue_mask(reader: Any, slide_mpp: float, tile_um: float, params: TissueParams | None = None
                ) -> tuple[TissueMask, np.ndarray]:
    """Read a thumbnail from ``reader`` (a :class:`~mmcli.features.readers.SlideReader`) and detect tissue;
    returns the mask and the thumbnail (for the QC image)."""
    p = params or TissueParams()
    mpp = thumbnail_mpp(slide_mpp, reader.dimensions, tile_um, p)
    thumb, scale = reader.thumbnail(mpp / slide_mpp, strip_pixels=1 << 21)
    mask, thr = detect_tissue(thumb, mpp, p)
    return TissueMask(mask, scale, thr, mpp), thumb


KEPT_COLOUR = (30, 60, 220)
REMOVED_COLOURS = {"blur": (255, 140, 0), "pen": (220, 0, 220), "dark": (40, 40, 40), "grandqc": (220, 30, 30)}
ANNOTATION_COLOUR = (240, 200, 0)


def qc_image(thumb: np.ndarray, mask: np.ndarray, coords: np.ndarray, tile_level0: int,
             scale: tuple[float, float], max_side: int = 2048, min_side: int = 512,
             removed: dict[str, np.ndarray] | None = None, rings: list[np.ndarray] | None = None) -> Image.Image:
    """The thumbnail with tissue tinted green, its outline, every kept tile outlined in blue, the tiles that
    artefact QC removed outlined in their check's colour (``removed``: check -> level-0 coords; colours in
    :data:`REMOVED_COLOURS`: blur orange, pen magenta, dark black, grandqc red) and annotation ``rings``
    (level-0 (K, 2) arrays) in yellow; scaled to between ``min_side`` and ``max_side`` pixels on the long
    side."""
    from scipy import ndimage

    img = thumb.copy()
    tint = np.array([0, 60, 0], np.float32)
    for y in range(0, img.shape[0], 256):  # row blocks keep the temporaries small on big thumbnails
        block, m = img[y:y + 256], mask[y:y + 256]
        block[m] = (block[m] * np.float32(0.7) + tint).astype(np.uint8)
    img[mask & ~ndimage.binary_erosion(mask)] = (0, 140, 0)  # tissue outline
    out = Image.fromarray(img)
    f = min(max_side / max(out.size), max(1.0, min_side / max(out.size)))
    if f != 1.0:
        out = out.resize((max(1, round(out.width * f)), max(1, round(out.height * f))),
                         Image.BILINEAR if f < 1 else Image.NEAREST)
    draw = ImageDraw.Draw(out)
    sx, sy = scale[0] / f, scale[1] / f
    for ring in rings or []:
        if len(ring) >= 2:
            draw.line([(float(x) / sx, float(y) / sy) for x, y in ring], fill=ANNOTATION_COLOUR, width=2)
    groups = [(np.asarray(coords), KEPT_COLOUR)]
    groups += [(np.asarray(c), REMOVED_COLOURS.get(k, (220, 30, 30))) for k, c in (removed or {}).items()]
    for cs, colour in groups:
        for x, y in cs.reshape(-1, 2):
            draw.rectangle((x / sx, y / sy, (x + tile_level0) / sx - 1, (y + tile_level0) / sy - 1), outline=colour)
    return out


def save_png_atomic(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG through a temporary file and rename, so a reader never sees half an image."""
    return atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG"))
