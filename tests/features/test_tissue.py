"""Tissue detection on thumbnails: HSV saturation + Otsu, clean-up, holes, small pieces, blank slides, QC."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.slides import GLASS, inside_ellipse, tissue_image
from mmcli.features.tissue import (
    TissueParams,
    detect_tissue,
    qc_image,
    save_png_atomic,
    thumbnail_mpp,
)

MPP = 4.0  # µm per thumbnail pixel in these tests


def _thumb(blank: bool = False) -> np.ndarray:
    return tissue_image(1024, 768, MPP, seed=5, blank=blank)  # 256 x 192 px


def test_mask_matches_tissue() -> None:
    thumb = _thumb()
    mask, thr = detect_tissue(thumb, MPP)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    truth = inside_ellipse(xx + 0.5, yy + 0.5, w, h)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9, iou
    assert 0.06 <= thr < 0.4


def test_blank_slide_has_no_tissue() -> None:
    mask, thr = detect_tissue(_thumb(blank=True), MPP)
    assert not mask.any()
    assert thr == pytest.approx(TissueParams().min_saturation)  # Otsu on noise is floored


def test_specks_dropped_small_holes_filled_large_holes_kept() -> None:
    img = np.full((200, 200, 3), GLASS, np.uint8)
    img[20:180, 20:180] = (220, 140, 190)  # a 640 µm square of tissue
    img[60:63, 60:63] = GLASS  # 12 µm hole: filled
    img[100:160, 100:160] = GLASS  # 240 µm hole: kept (fat / lumen)
    img[190:192, 5:7] = (220, 140, 190)  # 8 µm speck: dropped
    mask, _ = detect_tissue(img, MPP, TissueParams(close_um=0, open_um=0))
    assert mask[61, 61] and not mask[130, 130] and not mask[190, 5]
    assert mask[40, 40]
    keep_specks, _ = detect_tissue(img, MPP, TissueParams(close_um=0, open_um=0, min_area_um2=0, median_um=0))
    assert keep_specks[190, 5]


def test_fixed_threshold_and_dark_pixels() -> None:
    img = np.full((100, 100, 3), GLASS, np.uint8)
    img[10:50, 10:50] = (230, 200, 215)  # pale tissue, saturation ~0.13
    img[60:90, 60:90] = (10, 10, 30)  # pen / black border: saturated but dark
    p = TissueParams(close_um=0, open_um=0, min_area_um2=0, saturation_threshold=0.1)
    mask, thr = detect_tissue(img, MPP, p)
    assert thr == 0.1 and mask[30, 30] and not mask[75, 75]
    strict, _ = detect_tissue(img, MPP, TissueParams(close_um=0, open_um=0, min_area_um2=0,
                                                      saturation_threshold=0.2))
    assert not strict[30, 30]


def test_thumbnail_mpp_bounds() -> None:
    p = TissueParams()
    assert thumbnail_mpp(0.5, (40_000, 30_000), 112.0, p) == 8.0
    assert thumbnail_mpp(0.5, (2_000, 2_000), 16.0, p) == 4.0  # small tiles: finer mask
    assert thumbnail_mpp(0.5, (2_000, 2_000), 1.0, p) == 0.5  # never finer than the slide
    # a 50 x 40 mm slide: coarser mask so the thumbnail stays at 8 Mpx (bounded memory)
    assert thumbnail_mpp(0.5, (100_000, 80_000), 112.0, p) == pytest.approx((50_000 * 40_000 / 8e6) ** 0.5)


def test_qc_image_shows_mask_and_tiles(tmp_path: Path) -> None:
    thumb = _thumb()
    mask, _ = detect_tissue(thumb, MPP)
    coords = np.array([[400, 300], [464, 300]])  # level-0 px at 0.5 µm/px: thumbnail scale 8
    img = qc_image(thumb, mask, coords, 64, (8.0, 8.0), min_side=512)
    assert img.size == (512, 384)
    arr = np.asarray(img)
    assert (arr == (30, 60, 220)).all(axis=-1).any()  # tile outlines
    out = save_png_atomic(img, tmp_path / "qc" / "P1" / "a.png")
    assert Image.open(out).size == (512, 384)
    assert [p.name for p in out.parent.iterdir()] == ["a.png"]  # no temporary left behind
