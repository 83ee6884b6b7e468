"""One tile plan per slide, shared by every encoder.

Tissue detection and tiling depend on the slide and the tiling/tissue parameters only, never on the encoder.
A plan (tissue mask, its scale and threshold, tile coordinates and tissue fractions, the level read from) is
computed once and kept beside the store as ``<store>.plans/<fingerprint hash>-<params hash>.npz`` (written
atomically), keyed by the source fingerprint (path, size, mtime, head hash) so an edited slide is planned
again. A second encoder on the same cohort loads it and skips segmentation; its QC image is copied from the
plan's (``<key>.qc.png``) instead of being drawn again.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.tiling import TilePlan
from mmcli.pipeline.fingerprint import params_hash
from mmcli.pipeline.io import atomic_write_with

FORMAT = 1  # bump when the saved fields change: older plans are then recomputed


def plans_dir_for(store: str | Path) -> Path:
    """``<store>.plans/`` beside the store."""
    p = Path(store).resolve()
    return p.with_name(p.name + ".plans")


@dataclass
class SlidePlan:
    """Tissue mask and tile plan of one slide (what every encoder needs before reading tiles)."""

    plan: TilePlan
    mask: np.ndarray  # bool, thumbnail pixels
    mask_scale: tuple[float, float]  # level-0 pixels per mask pixel (x, y)
    threshold: float
    mask_mpp: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def plan_key(fingerprint: dict[str, Any], params: dict[str, Any]) -> str:
    """``<fingerprint hash>-<params hash>``: the file name of a plan."""
    return f"{params_hash(fingerprint, 16)}-{params_hash({'format': FORMAT, **params}, 16)}"


class PlanCache:
    """The plans of one store (``root`` = ``<store>.plans``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def qc_path(self, key: str) -> Path:
        return self.root / f"{key}.qc.png"

    def load(self, key: str) -> SlidePlan | None:
        """The saved plan, or None when absent or unreadable (then it is simply computed again)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                m = z["meta"]
                plan = TilePlan(z["coords"].astype(np.int64), z["tissue"].astype(np.float32), int(m[0]), float(m[1]),
                                int(m[2]), int(m[3]), int(m[4]), float(m[5]), float(m[6]), float(m[7]))
                return SlidePlan(plan, z["mask"].astype(bool), (float(m[8]), float(m[9])), float(m[10]),
                                 float(m[11]))
        except (OSError, KeyError, ValueError, IndexError):
            return None

    def save(self, key: str, sp: SlidePlan) -> Path:
        p = sp.plan
        meta = np.array([p.level, p.level_downsample, p.read_size, p.patch_size, p.patch_size_level0, p.target_mpp,
                         p.slide_mpp, p.min_tissue, sp.mask_scale[0], sp.mask_scale[1], sp.threshold, sp.mask_mpp],
                        np.float64)
        self.root.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: numpy adds no ".npz" to the temporary name
                np.savez_compressed(fh, coords=p.coords, tissue=p.tissue, mask=sp.mask, meta=meta)

        return atomic_write_with(self.path(key), write)

    def copy_qc(self, key: str, dest: Path) -> bool:
        """Copy the plan's QC image to ``dest`` (atomically); False when the plan has none."""
        src = self.qc_path(key)
        if not src.is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(dest, lambda tmp: shutil.copyfile(src, tmp))
        return True
