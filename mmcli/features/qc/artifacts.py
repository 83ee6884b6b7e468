"""Per-tile artefact detectors, run on a batch of tiles at the tile's working resolution (``--mpp``, the pixels the
encoder sees), and the rule that removes a tile.

Hand-written with numpy because no maintained library does this per tile in a batch: HistoQC works on whole-slide
thumbnails (and is an application, not a library), and histolab's pen filters pin scikit-image < 0.19.4. Every
detector is a plain per-pixel or per-tile statistic, vectorised over the batch (numpy releases the GIL, so the
reader threads compute them beside the encoder):

* ``sharpness`` (check ``blur``): variance of the Laplacian of the grey image after a 5-tap binomial smoothing
  (about a Gaussian of sigma 1 px, so pixel noise and JPEG blocks count little), over the tile's tissue pixels
  (not glass: HSV saturation >= 0.08 or value <= 0.85), in 8-bit grey levels squared. A tile is blurred when
  this is below ``blur_threshold`` (default 6). On real tissue texture (scikit-image's IHC image drawn as H&E,
  64-px tiles with sensor noise and JPEG q90; ``benchmarks/bench_wsi.py --skip throughput --skip read --skip
  memory``): sharp tiles score 44.8 or more (10th percentile), a Gaussian blur of sigma 2 px has median 5.4, sigma
  3 px at most 3.9; sigma 1.5 px (median 11.1) mostly passes.
* ``pen_fraction`` (check ``pen``): share of the tile's pixels that are marker ink: green (green the largest
  channel, i.e. hue 60-180 deg, saturation >= 0.15), blue (blue largest and green above red, hue 180-240 deg,
  saturation >= 0.40) or black (largest channel <= 40, HSV value < 0.16). No stain of H&E or DAB/haematoxylin
  IHC has these hues at these saturations (on scikit-image's IHC image the green-hue pixels have saturation
  <= 0.04, the blue ones <= 0.25 at the 99th percentile). Removed at ``pen_max`` (default 0.05) or more.
* ``dark_fraction`` (check ``dark``): share of pixels whose largest channel is below 64 (HSV value < 0.25:
  debris, folds' darkest parts, black ink, dust). Removed at ``dark_max`` (default 0.5) or more.
* ``grandqc_fraction`` (check ``grandqc``): share of the tile that GrandQC's artefact model (see
  :mod:`.segmentation`) labels as an artefact; computed from the model's mask, not here. Removed at
  ``grandqc_max`` (default 0.25) or more.

What they miss is listed in ``docs/extract.md`` ("Before a tile is encoded").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CHECKS = ("blur", "pen", "dark", "grandqc")
SCORES = ("sharpness", "pen_fraction", "dark_fraction", "grandqc_fraction")  # the score each check reads
_GREY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luma


@dataclass(frozen=True)
class ArtifactParams:
    """Which checks remove tiles and their thresholds (see the module docstring for units)."""

    checks: tuple[str, ...] = ()
    blur_threshold: float = 6.0
    pen_max: float = 0.05
    dark_max: float = 0.5
    grandqc_max: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        """Only what the chosen checks read (part of the encoder_id)."""
        d = asdict(self)
        used = {"blur": "blur_threshold", "pen": "pen_max", "dark": "dark_max", "grandqc": "grandqc_max"}
        return {"checks": list(self.checks), **{used[c]: d[used[c]] for c in self.checks}}


def _max_min(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest channel (uint8) of RGB ``(..., 3)``: HSV value x 255 and value - chroma."""
    r, g, b = tiles[..., 0], tiles[..., 1], tiles[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _saturated(mx: np.ndarray, mn: np.ndarray, num: int, den: int) -> np.ndarray:
    """HSV saturation (mx - mn) / mx >= num / den, in integers."""
    return (mx - mn).astype(np.uint16) * den >= mx.astype(np.uint16) * num


def _binomial(a: np.ndarray) -> np.ndarray:
    """5-tap binomial smoothing [1 4 6 4 1]/16 along the last two axes (valid part: 4 px smaller each way)."""
    a = (a[..., :-4] + 4 * a[..., 1:-3] + 6 * a[..., 2:-2] + 4 * a[..., 3:-1] + a[..., 4:]) / 16
    return (a[..., :-4, :] + 4 * a[..., 1:-3, :] + 6 * a[..., 2:-2, :] + 4 * a[..., 3:-1, :] + a[..., 4:, :]) / 16


def sharpness(tiles: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of the smoothed grey tile over its ``tissue`` pixels, (B,) float32."""
    grey = _binomial(tiles.astype(np.float32) @ _GREY)
    lap = 4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    m = tissue[:, 3:-3, 3:-3]  # the pixels the Laplacian is defined on
    n = m.sum(axis=(1, 2))
    few = n < 0.1 * m[0].size  # (almost) no tissue pixels: every pixel counts
    m = np.where(few[:, None, None], True, m)
    n = m.sum(axis=(1, 2)).astype(np.float32)
    mean = (lap * m).sum(axis=(1, 2)) / n
    return ((((lap - mean[:, None, None]) ** 2) * m).sum(axis=(1, 2)) / n).astype(np.float32)


def ink(tiles: np.ndarray) -> np.ndarray:
    """Marker-ink pixels of uint8 RGB ``(..., 3)``: green, blue or black (see the module docstring)."""
    r, g, b = tiles[..., 0], tiles[..., 1], tiles[..., 2]
    mx, mn = _max_min(tiles)
    green = (g > r) & (g >= b) & _saturated(mx, mn, 3, 20)  # hue (60, 180] deg, saturation >= 0.15
    blue = (b > g) & (g > r) & _saturated(mx, mn, 2, 5)  # hue (180, 240) deg, saturation >= 0.40
    return green | blue | (mx <= 40)


def tile_scores(tiles: np.ndarray) -> dict[str, np.ndarray]:
    """Every image-based score of a uint8 batch ``(B, P, P, 3)``: ``sharpness``, ``pen_fraction``,
    ``dark_fraction``, each (B,) float32. The two shares are counted on every second pixel of each row and
    column (a quarter of the pixels: the same share to within about 1%, at a quarter of the cost)."""
    if len(tiles) == 0 or tiles.shape[1] < 9:
        z = np.zeros(len(tiles), np.float32)
        return {"sharpness": z + np.float32(np.inf), "pen_fraction": z, "dark_fraction": z.copy()}
    mx, mn = _max_min(tiles)
    tissue = _saturated(mx, mn, 2, 25) | (mx <= 216)  # saturation >= 0.08 or value <= 0.85
    sub = tiles[:, ::2, ::2]
    return {"sharpness": sharpness(tiles, tissue),
            "pen_fraction": ink(sub).mean(axis=(1, 2), dtype=np.float32),
            "dark_fraction": (mx[:, ::2, ::2] < 64).mean(axis=(1, 2), dtype=np.float32)}


def removed_by(scores: dict[str, np.ndarray], params: ArtifactParams) -> np.ndarray:
    """Per tile: 0 = kept, else 1 + the index in :data:`CHECKS` of the first check that removes it (int8)."""
    n = len(next(iter(scores.values()))) if scores else 0
    out = np.zeros(n, np.int8)
    for code, check in enumerate(CHECKS, start=1):
        if check not in params.checks:
            continue
        if check == "blur":
            bad = scores["sharpness"] < params.blur_threshold
        elif check == "pen":
            bad = scores["pen_fraction"] >= params.pen_max
        elif check == "dark":
            bad = scores["dark_fraction"] >= params.dark_max
        else:
            bad = scores["grandqc_fraction"] >= params.grandqc_max
        out[(out == 0) & bad] = code
    return out


def counts(codes: np.ndarray) -> dict[str, int]:
    """Tiles removed per check (only the checks that removed any), from :func:`removed_by` codes."""
    return {c: int((codes == k).sum()) for k, c in enumerate(CHECKS, start=1) if (codes == k).any()}
