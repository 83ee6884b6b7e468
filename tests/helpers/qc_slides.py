"""Slides of real tissue texture with known artefacts, for the before-encoding steps (artefact QC, stain
normalisation, annotations, learned segmentation).

The texture is scikit-image's IHC image (real colon tissue, 512 x 512): its haematoxylin and DAB concentrations
(``skimage.color.rgb2hed``) are mirror-tiled to the slide's size and drawn as H&E with a chosen pair of stain
vectors, so the same tissue can be rendered as two labs would stain it. Artefacts are painted on top in
level-0 pixels: a Gaussian-blurred (out-of-focus) region, a green marker band (ink multiplies the light it
lets through), glass around the tissue. Slides are Aperio SVS (JPEG q90) written with ``helpers.slides``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from helpers.slides import GLASS, write_aperio

MPP = 0.5
# Macenko's reference H&E vectors (torchstain's HERef) and another lab's: Ruifrok & Johnston's H&E vectors
# (skimage.color.rgb_from_hed rows), with stronger haematoxylin and paler eosin
CLEAN_STAINS = (np.array([0.5626, 0.7201, 0.4062]), np.array([0.2159, 0.8012, 0.5581]), 1.0, 1.0)
OTHER_LAB = (np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11]), 1.35, 0.7)
INK = np.array([0.28, 0.72, 0.42])  # transmission of green marker ink at full density


def concentrations(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 2) haematoxylin and eosin-channel concentrations of real tissue, mirror-tiled with a seeded offset,
    scaled so their 99th percentiles are Macenko's reference maxima (1.9705, 1.0308)."""
    from skimage import color, data

    hed = color.rgb2hed(data.immunohistochemistry())
    out = []
    for ch, top in ((0, 1.9705), (2, 1.0308)):
        c = np.clip(hed[..., ch] - np.percentile(hed[..., ch], 1), 0, None)
        out.append(c * (top / np.percentile(c, 99)))
    c = np.stack(out, axis=-1)
    rng = np.random.default_rng(seed)
    oy, ox = rng.integers(0, 512, 2)
    reps = (-(-(height + oy) // 512) + 1, -(-(width + ox) // 512) + 1)
    tiled = np.pad(c, ((0, (reps[0] - 1) * 512), (0, (reps[1] - 1) * 512), (0, 0)), mode="symmetric")
    return tiled[oy:oy + height, ox:ox + width]


def render(conc: np.ndarray, stains: tuple = CLEAN_STAINS) -> np.ndarray:
    """RGB float32 of concentrations drawn with (h vector, e vector, h scale, e scale); I0 = 240."""
    h, e, sh, se = stains
    od = conc[..., :1] * sh * h + conc[..., 1:] * se * e
    return (240.0 * np.exp(-od)).astype(np.float32)


@dataclass
class QCSlide:
    """A written slide and where its regions are (level-0 pixel boxes ``(x0, y0, x1, y1)`` and masks)."""

    path: Path
    size: tuple[int, int]  # (width, height)
    tissue_box: tuple[int, int, int, int]
    blur_box: tuple[int, int, int, int] | None
    ink: np.ndarray | None  # (H, W) ink density in [0, 1]


def write_qc_slide(path: str | Path, width: int = 1536, height: int = 1024, seed: int = 0, margin: int = 128,
                   blur_box: tuple[int, int, int, int] | None = None, blur_sigma: float = 3.0,
                   ink_band: tuple[float, float] | None = None, stains: tuple = CLEAN_STAINS) -> QCSlide:
    """A slide of ``width x height`` level-0 px at 0.5 µm/px: tissue in a box ``margin`` px inside the edges,
    optionally blurred in ``blur_box`` (Gaussian, ``blur_sigma`` px) and crossed by a green ink band
    ``ink_band = (offset, half_width)``: the pixels with ``|x - y - offset| < half_width`` (a diagonal stroke)."""
    conc = concentrations(width, height, seed)
    img = render(conc, stains)
    if blur_box is not None:
        x0, y0, x1, y1 = blur_box
        pad = int(4 * blur_sigma)
        a, b = max(0, y0 - pad), max(0, x0 - pad)
        region = img[a:y1 + pad, b:x1 + pad]
        blurred = np.stack([ndimage.gaussian_filter(region[..., c], blur_sigma) for c in range(3)], axis=-1)
        img[y0:y1, x0:x1] = blurred[y0 - a:y1 - a, x0 - b:x1 - b]
    rng = np.random.default_rng(seed + 1)
    img += rng.normal(0, 1.5, img.shape).astype(np.float32)  # sensor noise
    glass = np.ones((height, width), bool)
    glass[margin:height - margin, margin:width - margin] = False
    img[glass] = np.asarray(GLASS, np.float32) + rng.normal(0, 1.5, (int(glass.sum()), 3)).astype(np.float32)
    ink = None
    if ink_band is not None:
        off, half = ink_band
        yy, xx = np.mgrid[0:height, 0:width]
        d = np.abs(xx - yy - off)
        ink = np.clip((half - d) / 8.0, 0, 1)  # soft 8-px edges
        ink *= 0.85 + 0.15 * ndimage.gaussian_filter(rng.random((height, width)), 3) * 2  # stroke texture
        ink = np.clip(ink, 0, 1).astype(np.float32)
        img *= INK[None, None, :] ** ink[..., None]
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    write_aperio(path, rgb, MPP, downsamples=(1, 4))
    return QCSlide(Path(path), (width, height), (margin, margin, width - margin, height - margin), blur_box, ink)


def tiles_in_box(coords: np.ndarray, tile: int, box: tuple[int, int, int, int], inset: int = 0) -> np.ndarray:
    """Which tiles (level-0 top-left ``coords``, side ``tile``) lie wholly inside ``box`` shrunk by ``inset``."""
    x0, y0, x1, y1 = box
    c = np.asarray(coords)
    return ((c[:, 0] >= x0 + inset) & (c[:, 1] >= y0 + inset) & (c[:, 0] + tile <= x1 - inset)
            & (c[:, 1] + tile <= y1 - inset))


def ink_share(coords: np.ndarray, tile: int, ink: np.ndarray) -> np.ndarray:
    """Share of each tile covered by ink of density >= 0.5."""
    m = ink >= 0.5
    return np.array([m[y:y + tile, x:x + tile].mean() for x, y in np.asarray(coords)], np.float32)
