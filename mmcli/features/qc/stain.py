"""Stain normalisation of tile batches: Macenko (2009) and Reinhard (2001), as torchstain defines them.

torchstain is the reference: the reference image is fitted with the same statistics as its
``TorchMacenkoNormalizer.fit`` / ``TorchReinhardNormalizer.fit``, the default Macenko reference is torchstain's
(``HERef``, ``maxCRef`` of Macenko et al.), the colour conversions use its constants, and the tests check tile for
tile that :class:`StainNormalizer` gives torchstain's output. torchstain normalises one image per call (about
0.2 s per 224-px tile for Macenko and 0.5 s for Reinhard here), so the batch arithmetic is written out:

* Macenko: the stain matrix and the 99th-percentile concentrations are estimated per tile on a regular grid of
  about ``sample_pixels`` pixels (default 4096: every 3rd pixel of each row and column of a 224-px tile, every
  pixel of a 64-px one; ``sample_pixels=0`` uses every pixel, torchstain's estimate exactly), with masked batch
  statistics (covariance, ``eigh``, nearest-rank percentiles as torchstain's
  ``percentile``). Normalising is then one 3x3 map in optical density, ``OD' = HERef diag(maxCRef/maxC)
  pinv(HE) OD``, applied to every pixel (OD from a 256-entry table). A tile with fewer than ``min_stain_pixels``
  (default 5%) of stained pixels (OD >= beta in every channel) is left as it is and counted.
* Reinhard: per tile LAB means and (unbiased) standard deviations (on the same pixel grid) mapped onto the
  reference's; sRGB gamma both ways through tables.

The built-in reference (no ``--stain-reference``): Macenko uses torchstain's default ``HERef``/``maxCRef``;
Reinhard uses the LAB statistics of :func:`builtin_reference_image`, scikit-image's real IHC image re-rendered as
H&E with those same stain vectors, so both methods aim at the same look.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.errors import InputError

METHODS = ("macenko", "reinhard")
BUILTIN = "builtin:ihc-as-he-v1"
IO, ALPHA, BETA = 240.0, 1.0, 0.15  # torchstain's defaults: transmitted light, angle percentile, OD floor
HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], np.float64)  # torchstain's HERef
MAXC_REF = np.array([1.9705, 1.0308], np.float64)  # torchstain's maxCRef
_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]], np.float32)  # torchstain's rgb2lab constants
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1) / IO)).astype(np.float32)
_LIN_LUT = np.where(np.arange(256) / 255 > 0.04045, ((np.arange(256) / 255 + 0.055) / 1.055) ** 2.4,
                    np.arange(256) / 255 / 12.92).astype(np.float32)
_GAMMA_STEPS = (1 << 16) - 1  # linear light in [0, 1] quantised to uint16, then one uint8 table look-up
_g = np.linspace(0, 1, _GAMMA_STEPS + 1)
_GAMMA_LUT = (np.clip(np.where(_g > 0.0031308, 1.055 * _g ** (1 / 2.4) - 0.055, 12.92 * _g), 0, 1)
              * 255).astype(np.uint8)  # truncated, as torchstain's (x * 255).type(uint8)
del _g


class StainError(InputError, ValueError):
    """A reference image that cannot serve (unreadable, no stained pixels)."""


# ---- statistics -------------------------------------------------------------------------------------------
def _nearest_rank(sorted_vals: np.ndarray, n: np.ndarray, q: float) -> np.ndarray:
    """torchstain's ``percentile``: value of rank ``1 + round(q/100 (n-1))`` of each row (rows sorted ascending,
    the first ``n`` entries valid)."""
    k = np.round(0.01 * q * (n - 1)).astype(np.int64)
    return np.take_along_axis(sorted_vals, k[:, None], axis=1)[:, 0]


def macenko_stats(od: np.ndarray, min_pixels: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: stain matrix ``HE`` (B, 3, 2; haematoxylin first), 99th-percentile concentrations ``maxC``
    (B, 2) and ``ok`` (B,) from optical densities ``od`` (B, 3, N) float32 (channel-planar). ``ok`` is False
    where fewer than ``min_pixels`` pixels are stained; those rows hold the reference."""
    b, _, n = od.shape
    valid = (od >= BETA).all(axis=1)
    k = valid.sum(axis=1)
    ok = k >= max(3, min_pixels)
    kk = np.maximum(k, 2).astype(np.float32)
    xm = od * valid[:, None, :]
    mean = xm.sum(axis=2) / kk[:, None]
    xc = (od - mean[:, :, None]) * valid[:, None, :]
    cov = (xc @ xc.transpose(0, 2, 1)).astype(np.float64) / (kk - 1)[:, None, None]
    cov[~ok] = np.eye(3)
    _, vec = np.linalg.eigh(cov)
    vec = vec[:, :, 1:]  # the plane of the two largest eigenvalues
    # eigh's signs are arbitrary (LAPACK's choice): fix the main direction into the positive OD octant so the
    # result does not depend on the library (a flip only mirrors the angles; the two stain vectors are the same)
    vec[:, :, 1] *= np.where(vec[:, :, 1].sum(axis=1) < 0, -1.0, 1.0)[:, None]
    proj = vec.transpose(0, 2, 1).astype(np.float32) @ od  # (B, 2, N)
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    phi[~valid] = np.inf
    phi.sort(axis=1)
    lo = np.where(ok, _nearest_rank(phi, k, ALPHA), 0.0)  # rows without stain hold +inf: replaced below
    hi = np.where(ok, _nearest_rank(phi, k, 100 - ALPHA), 0.0)
    v_min = np.einsum("bij,bj->bi", vec, np.stack([np.cos(lo), np.sin(lo)], axis=1))
    v_max = np.einsum("bij,bj->bi", vec, np.stack([np.cos(hi), np.sin(hi)], axis=1))
    first = (v_min[:, 0] > v_max[:, 0])[:, None]
    he = np.stack([np.where(first, v_min, v_max), np.where(first, v_max, v_min)], axis=2)
    he[~ok] = HE_REF
    conc = np.linalg.pinv(he).astype(np.float32) @ od  # least squares, as torchstain's lstsq; (B, 2, N)
    top = int(np.round(0.99 * (n - 1)))  # the same rank in every row: a partition, not a sort
    max_c = np.partition(conc, top, axis=2)[:, :, top].astype(np.float64)
    bad = ~ok | ~np.isfinite(max_c).all(axis=1) | (max_c <= 1e-6).any(axis=1) | ~np.isfinite(he).all(axis=(1, 2))
    max_c[bad] = MAXC_REF
    he[bad] = HE_REF
    return he, max_c, ~bad


def _planar(tiles: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut`` of uint8 RGB ``(B, H, W, 3)`` as channel-planar float32 ``(B, 3, H*W)`` (matrix products on it are
    large BLAS calls)."""
    return lut[tiles.reshape(len(tiles), -1, 3).transpose(0, 2, 1)]


def _interleaved(planar: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(planar.transpose(0, 2, 1)).reshape(shape)


# LAB is linear in f = cbrt(XYZ / white): lab = _K f + _K0 (L = 116 fy - 16, a = 500 (fx - fy), b = 200 (fy - fz))
_K = np.array([[0, 116, 0], [500, -500, 0], [0, 200, -200]], np.float64)
_K0 = np.array([-16.0, 0, 0])


def _rgb_to_f(tiles: np.ndarray) -> np.ndarray:
    """``f = cbrt(XYZ / white)`` (the CIE LAB companding; linear for very dark pixels), channel-planar float32
    ``(B, 3, H*W)``, of uint8 RGB ``(B, H, W, 3)``."""
    xyz = (_RGB2XYZ / _WHITE[:, None]) @ _planar(tiles, _LIN_LUT)
    f = np.cbrt(xyz)
    low = xyz <= 0.008856  # very dark pixels only: the linear branch where it applies
    if low.any():
        f[low] = 7.787 * xyz[low] + np.float32(16 / 116)
    return f


def _f_to_rgb(f: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 RGB ``shape`` (B, H, W, 3) of planar ``f`` (inverse of :func:`_rgb_to_f`; truncated to integers as
    torchstain does)."""
    low = f <= 0.2068966
    xyz = f * f * f
    if low.any():
        xyz[low] = (f[low] - np.float32(16 / 116)) / np.float32(7.787)
    lin = (np.linalg.inv(_RGB2XYZ) * _WHITE[None, :]).astype(np.float32) @ xyz
    np.clip(lin, 0, 1, out=lin)
    lin *= _GAMMA_STEPS
    lin += 0.5
    return _interleaved(_GAMMA_LUT[lin.astype(np.uint16)], shape)


def rgb_to_lab(tiles: np.ndarray) -> np.ndarray:
    """CIE LAB (L in [0, 100]), channel-planar float32 ``(B, 3, H*W)``, of uint8 RGB ``(B, H, W, 3)``, with
    torchstain's constants."""
    return (_K.astype(np.float32) @ _rgb_to_f(tiles)) + _K0.astype(np.float32)[:, None]


def lab_to_rgb(lab: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 RGB ``shape`` (B, H, W, 3) of planar LAB (inverse of :func:`rgb_to_lab`)."""
    return _f_to_rgb(np.linalg.inv(_K).astype(np.float32) @ (lab - _K0.astype(np.float32)[:, None]), shape)


def reinhard_stats(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image LAB means and unbiased standard deviations, (B, 3) each, of planar ``lab`` (B, 3, N)."""
    return lab.mean(axis=2, dtype=np.float64), lab.std(axis=2, ddof=1, dtype=np.float64)


# ---- the reference ------------------------------------------------------------------------------------------
def builtin_reference_image() -> np.ndarray:
    """scikit-image's IHC image (real tissue, 512 x 512) re-rendered as H&E: its haematoxylin and DAB
    concentrations (``skimage.color.rgb2hed``) drawn with torchstain's ``HERef`` vectors, scaled to
    ``maxCRef`` at the 99th percentile; uint8 RGB."""
    from skimage import color, data

    hed = color.rgb2hed(data.immunohistochemistry())
    od = np.zeros(hed.shape[:2] + (3,))
    for ch, col, top in ((0, 0, MAXC_REF[0]), (2, 1, MAXC_REF[1])):
        c = np.clip(hed[..., ch] - np.percentile(hed[..., ch], 1), 0, None)
        od += (c * (top / np.percentile(c, 99)))[..., None] * HE_REF[:, col]
    return np.clip(IO * np.exp(-od), 0, 255).astype(np.uint8)


def read_reference(path: str | Path) -> np.ndarray:
    """RGB uint8 of an image file (PNG, JPEG, TIFF ...); :class:`StainError` naming it when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise StainError(f"cannot read it as an image ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class StainReference:
    """What a method normalises to, JSON-able (carried to every worker and into the provenance)."""

    method: str
    source: str  # BUILTIN or the reference image's path
    sha256: str  # of the reference file ("" for the built-in)
    stats: dict[str, list] = field(default_factory=dict)  # macenko: he (3x2), max_c (2); reinhard: means, stds

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "source": self.source, "sha256": self.sha256, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainReference:
        return cls(d["method"], d["source"], d["sha256"], dict(d["stats"]))


def fit_reference(method: str, image: str | Path | None = None) -> StainReference:
    """The reference of ``method`` from ``image`` (a path), or the built-in one when ``image`` is None."""
    if method not in METHODS:
        raise StainError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if image is None:
        if method == "macenko":
            return StainReference(method, BUILTIN, "", {"he": HE_REF.tolist(), "max_c": MAXC_REF.tolist()})
        rgb, source, sha = builtin_reference_image(), BUILTIN, ""
    else:
        rgb, source = read_reference(image), str(Path(image).resolve())
        sha = hashlib.sha256(Path(image).read_bytes()).hexdigest()
    if method == "macenko":
        he, max_c, ok = macenko_stats(_planar(rgb[None], _OD_LUT), min_pixels=100)
        if not ok[0]:
            raise StainError("it has too few stained pixels (OD >= 0.15 in every channel) to estimate stain "
                             "vectors; use an image of stained tissue")
        return StainReference(method, source, sha, {"he": he[0].round(6).tolist(), "max_c": max_c[0].round(6).tolist()})
    means, stds = reinhard_stats(rgb_to_lab(rgb[None]))
    if not (stds[0] > 1e-6).all():
        raise StainError("it has a constant colour channel; use an image of stained tissue")
    return StainReference(method, source, sha, {"means": means[0].round(6).tolist(), "stds": stds[0].round(6).tolist()})


# ---- normalising batches --------------------------------------------------------------------------------------
class StainNormalizer:
    """Normalises uint8 batches ``(B, P, P, 3)`` to a :class:`StainReference`; returns ``(tiles, n_left)``,
    ``n_left`` = tiles left unnormalised (too little stain, or a constant tile for Reinhard)."""

    def __init__(self, ref: StainReference, sample_pixels: int = 4096, min_stain_pixels: float = 0.05) -> None:
        self.ref, self.sample_pixels, self.min_stain_pixels = ref, int(sample_pixels), float(min_stain_pixels)
        if ref.method == "macenko":
            self.he = np.asarray(ref.stats["he"], np.float64)
            self.max_c = np.asarray(ref.stats["max_c"], np.float64)
        else:
            self.means = np.asarray(ref.stats["means"], np.float64)
            self.stds = np.asarray(ref.stats["stds"], np.float64)

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, int]:
        if len(tiles) == 0:
            return tiles, 0
        return self._macenko(tiles) if self.ref.method == "macenko" else self._reinhard(tiles)

    def stride(self, tiles: np.ndarray) -> int:
        """Every how many pixels (per row and column) the statistics are estimated on."""
        if self.sample_pixels <= 0:
            return 1
        return max(1, int((tiles.shape[1] * tiles.shape[2] / self.sample_pixels) ** 0.5))

    def _macenko(self, tiles: np.ndarray) -> tuple[np.ndarray, int]:
        k = self.stride(tiles)
        sub = tiles[:, ::k, ::k]
        least = int(self.min_stain_pixels * sub[0, ..., 0].size)
        he, max_c, ok = macenko_stats(_planar(sub, _OD_LUT), min_pixels=least)
        # OD' = HERef diag(maxCRef / maxC) pinv(HE) OD, one 3x3 map per tile
        a = np.einsum("ij,bj,bjk->bik", self.he, self.max_c[None, :] / max_c, np.linalg.pinv(he)).astype(np.float32)
        out = a @ _planar(tiles, _OD_LUT)
        np.negative(out, out=out)
        np.exp(out, out=out)
        out *= np.float32(IO)
        np.minimum(out, 255, out=out)
        res = _interleaved(out.astype(np.uint8), tiles.shape)  # truncation, as torchstain's .int()
        res[~ok] = tiles[~ok]
        return res, int((~ok).sum())

    def _reinhard(self, tiles: np.ndarray) -> tuple[np.ndarray, int]:
        # per channel lab' = s (lab - mu) + mu_ref, s = sd_ref / sd, is one affine map of f (LAB is linear in f):
        # f' = K^-1 diag(s) K f + K^-1 (s (K0 - mu) + mu_ref - K0); the LAB statistics come from f's mean and
        # covariance on the sampling grid
        f = _rgb_to_f(tiles)
        k = self.stride(tiles)
        fs = f if k == 1 else _rgb_to_f(tiles[:, ::k, ::k])
        n = fs.shape[2]
        mean_f = fs.mean(axis=2, dtype=np.float64)
        fc = fs - mean_f[:, :, None].astype(np.float32)
        cov_f = (fc @ fc.transpose(0, 2, 1)).astype(np.float64) / max(1, n - 1)
        mu = mean_f @ _K.T + _K0
        sd = np.sqrt(np.maximum(np.einsum("ij,bjk,ik->bi", _K, cov_f, _K), 0))
        ok = (sd > 1e-6).all(axis=1)
        scale = np.where(ok[:, None], self.stds[None] / np.where(sd > 1e-6, sd, 1.0), 1.0)
        k_inv = np.linalg.inv(_K)
        a = np.einsum("ij,bj,jk->bik", k_inv, scale, _K).astype(np.float32)
        c = ((scale * (_K0[None] - mu) + self.means[None] - _K0[None]) @ k_inv.T).astype(np.float32)
        out = a @ f
        out += c[:, :, None]
        res = _f_to_rgb(out, tiles.shape)
        res[~ok] = tiles[~ok]
        return res, int((~ok).sum())
