"""The before-encoding steps that act on a slide's tile plan before any tile is read: the learned tissue mask,
the annotation filter and GrandQC's artefact mask. Each marks tiles in a
:class:`~mmcli.features.qc.record.TileSelection`; the extractor reads only the tiles still in."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.qc.annotations import Annotation, annotation_path, read_annotation
from mmcli.features.qc.artifacts import CHECKS
from mmcli.features.qc.record import OUTSIDE, TileSelection
from mmcli.features.qc.resolve import load_segmenter
from mmcli.features.qc.segmentation import ARTIFACT_MODEL, segment_slide
from mmcli.features.tiling import tissue_fractions
from mmcli.features.tissue import TissueMask, TissueParams, clean_mask, thumbnail_mpp


def model_tissue_mask(reader: Any, slide_mpp: float, tile_um: float, params: TissueParams, model: str,
                      weights: str, device: str = "cpu") -> tuple[TissueMask, np.ndarray]:
    """The tissue mask of ``--tissue-model`` on the tissue-mask grid (the thumbnail's), cleaned like the default
    mask (small holes filled, small pieces dropped); returns it and the thumbnail (for the QC image)."""
    mpp = thumbnail_mpp(slide_mpp, reader.dimensions, tile_um, params)
    thumb, scale = reader.thumbnail(mpp / slide_mpp, strip_pixels=1 << 21)
    seg = load_segmenter(model, weights, device)
    share = segment_slide(reader, slide_mpp, seg, thumb.shape[:2], scale)
    return TissueMask(clean_mask(share >= 0.5, mpp, params), scale, seg.threshold, mpp), thumb


def restrict_to_annotation(folder: str | Path, classes: tuple[str, ...], slide: str | Path, coords: np.ndarray,
                           tile_level0: int, sel: TileSelection) -> tuple[Annotation, str | None]:
    """Mark the tiles whose centre is outside the slide's annotation; returns it and a warning when it has no
    polygon of ``classes``. :class:`~mmcli.features.qc.annotations.AnnotationError` for a missing or bad file."""
    path = annotation_path(folder, slide)
    ann = read_annotation(path, classes)
    sel.code[~ann.contains_centres(coords, tile_level0)] = OUTSIDE
    warning = None
    if ann.n_features == 0:
        warning = (f"{path.name}: no polygon of class {','.join(classes) or 'any'} (classes in the file: "
                   f"{', '.join(ann.classes) or 'none'}): stored with 0 tiles")
    return ann, warning


def grandqc_artifacts(reader: Any, slide_mpp: float, mask_shape: tuple[int, int], mask_scale: tuple[float, float],
                      coords: np.ndarray, tile_level0: int, sel: TileSelection, max_share: float, weights: str,
                      device: str = "cpu") -> None:
    """GrandQC's artefact share of every tile (``grandqc_fraction``), from its mask on the tissue-mask grid;
    tiles at or above ``max_share`` are marked removed by ``grandqc``."""
    seg = load_segmenter(ARTIFACT_MODEL, weights, device)
    share = segment_slide(reader, slide_mpp, seg, mask_shape, mask_scale)
    frac = tissue_fractions(share >= 0.5, mask_scale, coords, tile_level0).astype(np.float32)
    sel.scores["grandqc_fraction"] = frac
    sel.code[(frac >= max_share) & (sel.code == 0)] = CHECKS.index("grandqc") + 1
