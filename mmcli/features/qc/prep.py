"""The per-batch step between the tile reader and the encoder: score every tile (artefact QC), drop the tiles a
check removes, stain-normalise the rest. Runs in the reader threads (:func:`~mmcli.features.tiling.iter_tile_batches`
``transform``), so it overlaps with the encoder."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mmcli.features.qc.artifacts import ArtifactParams, removed_by, tile_scores
from mmcli.features.qc.stain import StainNormalizer


@dataclass
class Prepared:
    """One prepared batch of ``b`` read tiles."""

    tiles: np.ndarray  # (k, P, P, 3) uint8: the kept tiles, normalised when asked
    keep: np.ndarray  # (b,) bool
    scores: dict[str, np.ndarray]  # (b,) float32 each; empty without artefact QC
    codes: np.ndarray  # (b,) int8: 0 kept, else 1 + index of the removing check in CHECKS
    stain_left: int  # kept tiles left unnormalised (too little stain)


class TilePrep:
    """Callable on a uint8 batch ``(b, P, P, 3)``; returns :class:`Prepared`. ``artifacts`` is None without
    ``--remove-artifacts`` (then nothing is scored); its ``grandqc`` check is decided before the tiles are read
    and is ignored here."""

    def __init__(self, artifacts: ArtifactParams | None = None, stain: StainNormalizer | None = None) -> None:
        self.artifacts = None
        if artifacts is not None:
            self.artifacts = replace(artifacts, checks=tuple(c for c in artifacts.checks if c != "grandqc"))
        self.stain = stain

    def __call__(self, tiles: np.ndarray) -> Prepared:
        b = len(tiles)
        scores: dict[str, np.ndarray] = {}
        codes = np.zeros(b, np.int8)
        if self.artifacts is not None:
            scores = tile_scores(tiles)
            codes = removed_by(scores, self.artifacts)
        keep = codes == 0
        kept = tiles if keep.all() else tiles[keep]
        left = 0
        if self.stain is not None and len(kept):
            kept, left = self.stain(kept)
        return Prepared(kept, keep, scores, codes, left)
