"""Whole-slide images of ``mmcli synth``: H&E-like rendering and Aperio SVS (pyramidal TIFF) writing.

Rendering works in physical units (micrometres), so a 40x slide (0.25 um/px) shows the same tissue
as a 20x one (0.5 um/px) at twice the pixel size. Smooth fields (tissue outline, fat/lumen holes,
tumour nests, stain colour, fibre texture) live on a 4 um grid and are upsampled; nuclei are drawn
at full resolution. Subtype signal: tumour-nuclei density and size and hematoxylin darkness follow
the proliferation axis; lymphocyte density and a purple shift of the stroma follow the basal axis;
glandular lumens follow low proliferation. Per-slide stain-batch colour jitter blurs the colour cue.

File layout (what OpenSlide's ``aperio`` driver expects): IFD 0 = level 0 (tiled 256x256 JPEG,
YCbCr 2x2), IFD 1 = thumbnail (stripped JPEG), IFD 2.. = levels downsampled 4x and 16x (tiled JPEG),
then the label (LZW) and macro (JPEG) images. ImageDescription in Aperio form with ``AppMag`` and
``MPP``; TIFF resolution tags in pixels per centimetre as well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from mmcli.pipeline.io import atomic_path
from mmcli.stages.synth.cohort import STREAM_SLIDES, Patient, observe, patient_rng

TILE = 256
JPEG_QUALITY = 80
GRID_UM = 4.0  # resolution of the smooth fields
SHARE_40X = 0.2  # share of slides scanned at 40x (0.25 um/px)
SLIDE_VIEW_SD: dict[str, float] = {"prolif": 0.9, "basal": 1.0}
_BACKGROUND = np.array([241.0, 239.0, 243.0])
_DESC_HEAD = "Aperio Image Library v12.0.0\r\n"


@dataclass(frozen=True)
class SlideLook:
    """Appearance parameters of one slide (units in the names)."""

    tumour_nuclei_per_mm2: float  # per mm2 of tumour nest
    nucleus_radius_um: float
    pleomorphism: float  # relative sd of nuclear radius
    lymphocytes_per_mm2: float  # per mm2 of stroma
    nest_share: float  # share of tissue that is tumour nests
    lumen_share: float  # share of tissue area that is fat / glandular lumen
    stroma_rgb: tuple[float, float, float]
    cytoplasm_rgb: tuple[float, float, float]
    hema_rgb: tuple[float, float, float]


@dataclass(frozen=True)
class SlideSpec:
    """One slide to write: id, scan resolution and the physical size of the scanned area."""

    slide_id: str
    mpp: float
    width_um: float
    height_um: float
    look: SlideLook


def _clip_rgb(rgb: np.ndarray) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in np.clip(rgb, 0, 255))
    return r, g, b


def plan_slides(seed: int, patient: Patient) -> list[SlideSpec]:
    """The patient's slides: one shared noisy view of the tumour plus per-slide variation."""
    rng = patient_rng(seed, patient.index, STREAM_SLIDES)
    view = observe(rng, patient, SLIDE_VIEW_SD)
    prolif, basal = view["prolif"], view["basal"]
    specs = []
    for k in range(patient.n_slides):
        mpp = 0.25 if rng.random() < SHARE_40X else 0.5
        batch = rng.normal(1.0, 0.035, size=3) * rng.normal(1.0, 0.02)  # stain batch / scanner
        stroma = np.array([236.0 - 10 * basal, 160.0 - 6 * basal, 198.0 + 4 * basal]) * batch
        cyto = np.array([205.0 - 6 * prolif, 140.0 - 5 * prolif, 196.0]) * batch
        hema = np.array([82.0 - 12 * prolif, 56.0 - 8 * prolif, 140.0 - 6 * prolif]) * batch
        look = SlideLook(
            tumour_nuclei_per_mm2=4800.0 * math.exp(0.25 * prolif + 0.1 * basal + rng.normal(0, 0.1)),
            nucleus_radius_um=3.1 * math.exp(0.1 * prolif + 0.05 * basal + rng.normal(0, 0.04)),
            pleomorphism=0.10 + 0.05 * max(prolif, 0.0),
            lymphocytes_per_mm2=500.0 * math.exp(0.75 * basal + rng.normal(0, 0.25)),
            nest_share=float(np.clip(0.45 + 0.12 * prolif + rng.normal(0, 0.05), 0.2, 0.8)),
            lumen_share=float(np.clip(0.16 - 0.07 * prolif + rng.normal(0, 0.03), 0.03, 0.35)),
            stroma_rgb=_clip_rgb(stroma), cytoplasm_rgb=_clip_rgb(cyto), hema_rgb=_clip_rgb(hema),
        )
        specs.append(SlideSpec(
            slide_id=f"{patient.patient_id}_{k + 1}", mpp=mpp,
            width_um=float(rng.uniform(800, 1200)), height_um=float(rng.uniform(750, 1150)), look=look,
        ))
    return specs


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    return f / (f.std() + 1e-6)


def _tissue_fields(rng: np.random.Generator, gh: int, gw: int, look: SlideLook) -> tuple[np.ndarray, ...]:
    """Tissue alpha (0..1), lumen holes (0..1) and tumour-nest weight (0..1) on the 4 um grid."""
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    envelope = np.full((gh, gw), -1.0, np.float32)
    for _ in range(int(rng.integers(1, 4))):  # 1-3 tissue fragments
        cy, cx = rng.uniform(0.32, 0.68) * gh, rng.uniform(0.32, 0.68) * gw
        a, b = rng.uniform(0.2, 0.4) * gw, rng.uniform(0.2, 0.4) * gh
        t = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
        v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        envelope = np.maximum(envelope, 1.0 - (u / a) ** 2 - (v / b) ** 2)
    rough = _smooth_noise(rng, (gh, gw), 14.0)
    tissue = np.clip((envelope + 0.3 * rough - 0.05) * 5.0, 0.0, 1.0)

    hole_field = _smooth_noise(rng, (gh, gw), 3.0)
    thr = np.quantile(hole_field, 1.0 - look.lumen_share)
    holes = np.clip((hole_field - thr) * 4.0, 0.0, 1.0)

    nest_field = _smooth_noise(rng, (gh, gw), 6.0)
    nthr = np.quantile(nest_field, 1.0 - look.nest_share)
    nests = np.clip((nest_field - nthr) * 2.5 + 0.5, 0.0, 1.0) * (1.0 - holes)
    return tissue * (1.0 - holes), holes, nests


def _sample_points(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    """``n`` points (x, y in grid units) with density proportional to ``weight`` on the grid."""
    if n <= 0 or weight.sum() <= 0:
        return np.zeros((0, 2))
    flat = weight.ravel().astype(np.float64)
    flat /= flat.sum()
    cells = rng.choice(flat.size, size=n, p=flat)
    gy, gx = np.divmod(cells, weight.shape[1])
    return np.stack([gx + rng.random(n), gy + rng.random(n)], axis=1)


def render_slide(seed: int, patient: Patient, k: int, spec: SlideSpec) -> Image.Image:
    """Level-0 RGB image of slide ``k`` of ``patient``."""
    rng = patient_rng(seed, patient.index, STREAM_SLIDES, k)
    look = spec.look
    w_px, h_px = round(spec.width_um / spec.mpp), round(spec.height_um / spec.mpp)
    gw, gh = math.ceil(spec.width_um / GRID_UM), math.ceil(spec.height_um / GRID_UM)
    box = (0.0, 0.0, spec.width_um / GRID_UM, spec.height_um / GRID_UM)
    tissue, holes, nests = _tissue_fields(rng, gh, gw, look)

    # Stain colours on the grid: stroma with fibre texture, tumour cytoplasm in nests.
    fibres = _smooth_noise(rng, (gh, gw), (0.7, 2.5) if rng.random() < 0.5 else (2.5, 0.7))
    shade = 1.0 + 0.05 * _smooth_noise(rng, (gh, gw), 10.0) + 0.035 * fibres
    stroma = np.asarray(look.stroma_rgb, np.float32)
    cyto = np.asarray(look.cytoplasm_rgb, np.float32)
    colour = (stroma * (1 - nests[..., None]) + cyto * nests[..., None]) * shade[..., None]
    colour = colour * (1 - holes[..., None]) + _BACKGROUND * holes[..., None]
    colour = colour * tissue[..., None] + _BACKGROUND * (1 - tissue[..., None])
    colour_img = Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8), "RGB")
    img = colour_img.resize((w_px, h_px), Image.Resampling.BILINEAR, box=box)

    # Nuclei: tumour cells in nests, lymphocytes in stroma, drawn as ellipses into an alpha mask
    # through which the hematoxylin colour is painted. The mask starts as faint tiled noise: the
    # slight grain of a real scan, on glass and tissue alike.
    grain = Image.fromarray(rng.integers(0, 9, size=(509, 509), dtype=np.uint8), "L")
    mask = Image.new("L", (w_px, h_px))
    for y in range(0, h_px, 509):
        for x in range(0, w_px, 509):
            mask.paste(grain, (x, y))
    draw = ImageDraw.Draw(mask)
    cell_mm2 = (GRID_UM / 1000.0) ** 2
    scale = GRID_UM / spec.mpp  # px per grid cell
    tumour_w = tissue * nests
    n_tumour = int(rng.poisson(look.tumour_nuclei_per_mm2 * tumour_w.sum() * cell_mm2))
    pts = _sample_points(rng, tumour_w, n_tumour) * scale
    radii = look.nucleus_radius_um / spec.mpp * np.exp(rng.normal(0, look.pleomorphism, size=(len(pts), 2)))
    dark = rng.integers(150, 225, size=len(pts))
    for (x, y), (rx, ry), a in zip(pts, radii, dark):
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(a))
    lymph_w = tissue * (1 - nests)
    n_lymph = int(rng.poisson(look.lymphocytes_per_mm2 * lymph_w.sum() * cell_mm2))
    pts = _sample_points(rng, lymph_w, n_lymph) * scale
    r_l = 2.3 / spec.mpp * np.exp(rng.normal(0, 0.08, size=len(pts)))
    for (x, y), r in zip(pts, r_l):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=250)
    img.paste(tuple(int(v) for v in look.hema_rgb), None, mask)
    return img


def _label_image(rng: np.random.Generator, slide_id: str) -> np.ndarray:
    """Slide label: id text and a pseudo 2-D barcode."""
    img = Image.new("RGB", (400, 320), (250, 250, 248))
    d = ImageDraw.Draw(img)
    d.text((20, 20), slide_id, fill=(10, 10, 10))
    d.text((20, 45), "H&E", fill=(10, 10, 10))
    bits = rng.random((16, 16)) < 0.5
    for i, j in zip(*np.nonzero(bits)):
        d.rectangle((200 + 10 * j, 120 + 10 * i, 209 + 10 * j, 129 + 10 * i), fill=(0, 0, 0))
    return np.asarray(img)


def _macro_image(thumb: Image.Image, label: np.ndarray) -> np.ndarray:
    """Photo of the whole glass slide: label area on the left, the tissue on the right."""
    macro = Image.new("RGB", (800, 320), (228, 230, 232))
    macro.paste(Image.fromarray(label).resize((260, 208)), (20, 56))
    t = thumb.copy()
    t.thumbnail((460, 300))
    macro.paste(t, (320, (320 - t.size[1]) // 2))
    return np.asarray(macro)


def write_svs(path: Path, img: Image.Image, spec: SlideSpec, seed: int, patient_index: int, k: int) -> None:
    """Write ``img`` (slide ``k`` of a patient) as an Aperio SVS pyramid at ``path``, atomically."""
    rng = patient_rng(seed, patient_index, STREAM_SLIDES, 1000 + k)
    w, h = img.size
    mag = 40 if spec.mpp < 0.375 else 20
    month, day, hour, minute = (int(rng.integers(1, 13)), int(rng.integers(1, 29)),
                                int(rng.integers(7, 19)), int(rng.integers(0, 60)))
    props = (f"|AppMag = {mag}|StripeWidth = 2040|ScanScope ID = SS{int(rng.integers(1000, 9999))}"
             f"|Filename = {spec.slide_id}|Date = {month:02d}/{day:02d}/21|Time = {hour:02d}:{minute:02d}:00"
             f"|Time Zone = GMT+00:00|User = mmcli-synth|MPP = {spec.mpp:.4f}"
             f"|Left = {rng.uniform(20, 30):.6f}|Top = {rng.uniform(15, 25):.6f}|Filtered = 5")
    base = f"{_DESC_HEAD}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE})"
    level1 = img.reduce(4)
    level2 = level1.reduce(4)
    thumb = level1.reduce(2)
    label = _label_image(rng, spec.slide_id)
    ppcm = 1e4 / spec.mpp
    jpeg = {"compression": "jpeg", "compressionargs": {"level": JPEG_QUALITY}, "photometric": "rgb",
            "metadata": None, "software": False}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        tw.write(np.asarray(img), tile=(TILE, TILE), description=f"{base} JPEG/RGB Q={JPEG_QUALITY}{props}",
                 resolution=(ppcm, ppcm), resolutionunit="CENTIMETER", **jpeg)
        tw.write(np.asarray(thumb), rowsperstrip=64,
                 description=f"{_DESC_HEAD}{w}x{h} -> {thumb.size[0]}x{thumb.size[1]} - {props}", **jpeg)
        for factor, lvl in ((4, level1), (16, level2)):
            tw.write(np.asarray(lvl), tile=(TILE, TILE), subfiletype=0,
                     description=f"{base} -> {lvl.size[0]}x{lvl.size[1]} JPEG/RGB Q={JPEG_QUALITY}{props}",
                     resolution=(ppcm / factor, ppcm / factor), resolutionunit="CENTIMETER", **jpeg)
        tw.write(label, compression="lzw", photometric="rgb", metadata=None, software=False, subfiletype=1,
                 description=f"{_DESC_HEAD}label {label.shape[1]}x{label.shape[0]}")
        macro = _macro_image(thumb, label)
        tw.write(macro, rowsperstrip=64, subfiletype=9,
                 description=f"{_DESC_HEAD}macro {macro.shape[1]}x{macro.shape[0]}", **jpeg)
