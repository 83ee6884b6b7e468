"""Breast MRI volumes of ``mmcli synth`` as gzipped NIfTI-1 with real, non-isotropic voxel spacing.

Each volume is a 64 x 64 x 24 crop around one breast: air in front of the skin, fat and
fibroglandular tissue, the pectoral muscle and the thorax behind it, and one lesion. ``T1`` is a
fat-saturated post-contrast (DCE-like) volume; ``T2`` a non-fat-saturated T2-weighted one.
Voxel spacing is 1.0-1.5 mm in plane and 2.0-4.0 mm between slices; the affine is LAS-oriented
(as many DICOM converters write it), sometimes slightly oblique, and placed at the breast's side.

Subtype signal: lesion enhancement follows the HER2 axis (and proliferation), lesion size follows
the pathological tumour size, central necrosis (rim enhancement, bright T2 core) and T2 brightness
follow the basal axis; spiculated margins follow the luminal axis. A bias field and Rician noise sit
on top. The ``.nii.gz`` bytes are reproducible: the gzip header carries ``mtime=0`` and no file name.
"""
from __future__ import annotations

import gzip
import math

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from mmcli.stages.synth.cohort import STREAM_MRI, Patient, observe, patient_rng

SHAPE: tuple[int, int, int] = (64, 64, 24)
MRI_VIEW_SD: dict[str, float] = {"her2": 0.9, "prolif": 1.2, "basal": 1.2, "lum": 1.5}
NOISE_SIGMA = 12.0


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


def _affine(rng: np.random.Generator, spacing: tuple[float, float, float], laterality: str) -> np.ndarray:
    """LAS voxel-to-world (RAS mm) affine centred on the breast, oblique by up to 4 degrees half the time."""
    sx, sy, sz = spacing
    theta = math.radians(rng.uniform(-4, 4)) if rng.random() < 0.5 else 0.0
    rot = np.array([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0],
                    [0.0, 0.0, 1.0]])
    lin = rot @ np.diag([-sx, sy, sz])
    side = 1.0 if laterality == "right" else -1.0  # RAS: +x is the patient's right
    centre_world = np.array([side * rng.uniform(70, 110), rng.uniform(40, 80), rng.uniform(-20, 40)])
    centre_vox = (np.asarray(SHAPE) - 1) / 2.0
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.round(centre_world - lin @ centre_vox, 3)
    return aff


def _to_nifti_gz(data: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    img = nib.Nifti1Image(np.clip(np.round(data), 0, 32767).astype(np.int16), affine)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = description.encode("ascii")[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def render_mri(seed: int, patient: Patient) -> dict[str, bytes]:
    """``{"T1": bytes, ["T2": bytes]}``: gzipped NIfTI files of the patient's MRI."""
    rng = patient_rng(seed, patient.index, STREAM_MRI)
    view = observe(rng, patient, MRI_VIEW_SD)
    inplane = float(rng.choice([1.0, 1.1, 1.2, 1.3, 1.4, 1.5]))
    thick = float(rng.choice([2.0, 2.5, 3.0, 3.5, 4.0]))
    spacing = (inplane, inplane, thick)
    affine = _affine(rng, spacing, patient.laterality)

    # Physical coordinates (mm) of voxel centres relative to the volume centre; +Y anterior.
    idx = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(SHAPE, spacing)]
    x, y, z = np.meshgrid(*idx, indexing="ij")
    fov = np.asarray(SHAPE) * np.asarray(spacing)
    y_cw = -fov[1] / 2 + rng.uniform(10, 18)  # chest wall
    ax, ay, az = fov[0] * rng.uniform(0.7, 0.9), fov[1] - (y_cw + fov[1] / 2) - rng.uniform(4, 10), fov[2] * 0.8
    rho_breast = np.sqrt((x / ax) ** 2 + ((y - y_cw) / ay) ** 2 + (z / az) ** 2)
    breast = (rho_breast < 1.0) & (y > y_cw)
    skin = breast & (rho_breast > 1.0 - 2.0 / ay)
    muscle = (y <= y_cw) & (y > y_cw - rng.uniform(8, 14))
    thorax = y <= y_cw - 8
    sig = [6.0 / s for s in spacing]
    fgt_field = gaussian_filter(rng.standard_normal(SHAPE), sig) - 0.4 * rho_breast
    density = rng.uniform(0.2, 0.5)  # share of fibroglandular tissue in the breast
    fgt = breast & (fgt_field > np.quantile(fgt_field[breast], 1.0 - density))

    # Lesion: irregular ellipsoid; size from the pathological size, margins from the luminal axis.
    size = patient.tumour_size_mm * math.exp(rng.normal(0.05, 0.12))
    rx = size / 2
    ry, rz = rx * rng.uniform(0.7, 1.0), rx * rng.uniform(0.7, 1.0)
    c = (rng.uniform(-0.25, 0.25) * fov[0], y_cw + rng.uniform(0.35, 0.55) * ay, rng.uniform(-0.2, 0.2) * fov[2])
    rho = np.sqrt(((x - c[0]) / rx) ** 2 + ((y - c[1]) / ry) ** 2 + ((z - c[2]) / rz) ** 2)
    spic = 0.08 + 0.22 * float(_sigmoid(1.5 * view["lum"]))
    bumps = gaussian_filter(rng.standard_normal(SHAPE), [2.5 / s for s in spacing])
    rho_eff = rho * (1.0 + spic * bumps / (bumps.std() + 1e-6))
    lesion = _sigmoid((1.0 - rho_eff) * rx / 1.2)  # soft edge of about 1 mm
    necrotic = rng.random() < float(_sigmoid(1.8 * view["basal"] + 0.04 * (size - 25) - 0.8))
    core = _sigmoid((0.55 - rho) * rx / 1.5) if necrotic else np.zeros(SHAPE)
    het = gaussian_filter(rng.standard_normal(SHAPE), [1.5 / s for s in spacing])
    hetero = 1.0 + 0.12 * het / (het.std() + 1e-6)
    enh = float(np.clip(0.55 + 0.35 * view["her2"] + 0.12 * view["prolif"] + rng.normal(0, 0.15), 0.1, 1.8))
    t2_lesion = float(np.clip(0.3 + 0.45 * view["basal"] + rng.normal(0, 0.25), 0.0, 1.5))

    bias = np.exp(0.12 * (rng.normal() * x / fov[0] + rng.normal() * y / fov[1] + 0.5 * rng.normal() * z / fov[2]))

    def compose(tissue: dict[str, float], lesion_value: np.ndarray, core_value: float) -> np.ndarray:
        vol = np.zeros(SHAPE)
        vol[thorax] = tissue["thorax"]
        vol[muscle] = tissue["muscle"]
        vol[breast] = tissue["fat"]
        vol[fgt] = tissue["fgt"]
        vol[skin] = tissue["skin"]
        lesion_in = lesion * breast
        vol = vol * (1 - lesion_in) + lesion_value * lesion_in
        vol = vol * (1 - core * lesion_in) + core_value * core * lesion_in
        vol = vol * bias
        n1, n2 = rng.normal(0, NOISE_SIGMA, SHAPE), rng.normal(0, NOISE_SIGMA, SHAPE)
        return np.sqrt((vol + n1) ** 2 + n2**2)  # Rician magnitude noise

    bpe = rng.uniform(0.0, 1.0)  # background parenchymal enhancement
    t1 = compose({"thorax": 40.0, "muscle": 170.0, "fat": 80.0, "fgt": 220.0 + 60 * bpe, "skin": 260.0},
                 (250.0 + 650.0 * enh) * hetero, 200.0)
    out = {"T1": _to_nifti_gz(t1, affine, "mmcli synth: T1 fat-sat post-contrast")}
    if patient.has_t2:
        t2 = compose({"thorax": 60.0, "muscle": 150.0, "fat": 420.0, "fgt": 260.0, "skin": 300.0},
                     (280.0 + 250.0 * t2_lesion) * hetero, 650.0)
        out["T2"] = _to_nifti_gz(t2, affine, "mmcli synth: T2-weighted TSE")
    return out
