"""The per-tile QC record of one slide item, kept beside the store so a user can re-filter without re-reading
the slide: ``<store>.qc/<encoder_id>/<patient_id>/<item_id>.tiles.npz`` (written atomically, before the item).

Arrays, one row per tile of the tissue plan (the tiles the default mask and ``--min-tissue`` give):
``coords`` (N, 2) int64 level-0 top-left; ``tissue`` (N,) tissue fraction; ``code`` (N,) int8: 0 kept (the
item's features, in the same order), -1 outside the annotation, else 1 + the index in
:data:`~mmcli.features.qc.artifacts.CHECKS` of the check that removed it (1 blur, 2 pen, 3 dark, 4 grandqc);
one float32 array per score (:data:`~mmcli.features.qc.artifacts.SCORES`: ``sharpness``, ``pen_fraction``,
``dark_fraction``, ``grandqc_fraction``), NaN where the tile was not read; ``meta``: the record's JSON
(checks, thresholds, counts). Stricter thresholds can be applied to a stored item by selecting its rows with
``code == 0`` and the new rule (e.g. ``sharpness[code == 0] >= 20``); looser ones need a re-extraction.

(The feature store keeps ``features`` and ``coords`` per item only; when it learns extra per-tile arrays this
record can move into the item.)
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.io import atomic_write_with


def record_path(root: str | Path, patient_id: str, item_id: str) -> Path:
    """Where the record of one item lives under ``root`` = ``<store>.qc/<encoder_id>``."""
    return Path(root) / patient_id / f"{item_id}.tiles.npz"


def save_record(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Write the record atomically; returns its sha256 (stored in the item's attrs)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8), **arrays)
    data = buf.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))
    return hashlib.sha256(data).hexdigest()


def load_record(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of a record written by :func:`save_record`."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(z["meta"].tobytes().decode())
    return arrays, meta


OUTSIDE = -1  # code of a tile whose centre is outside the annotation


class TileSelection:
    """What happens to each of a slide's ``n`` planned tiles: ``code`` (see the module docstring) and scores,
    filled as the steps run (annotation, GrandQC mask, then the image checks while the tiles are read)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.code = np.zeros(n, np.int8)
        self.scores: dict[str, np.ndarray] = {}
        self.stain_left = 0
        self._read: np.ndarray | None = None

    @property
    def to_read(self) -> np.ndarray:
        """Indices of the tiles still in after the steps that need no pixels (fixed at the first call)."""
        if self._read is None:
            self._read = np.flatnonzero(self.code == 0)
        return self._read

    def merge_read(self, keep: np.ndarray, codes: np.ndarray, scores: dict[str, np.ndarray]) -> None:
        """The image checks' results for the tiles of :attr:`to_read` (in that order)."""
        idx = self.to_read
        self.code[idx] = np.where(keep, 0, codes)
        for name, v in scores.items():
            full = self.scores.setdefault(name, np.full(self.n, np.nan, np.float32))
            full[idx] = v

    def removed_coords(self, coords: np.ndarray) -> dict[str, np.ndarray]:
        """Level-0 coords of the tiles each check removed (only checks that removed any)."""
        from mmcli.features.qc.artifacts import CHECKS

        return {c: coords[self.code == k] for k, c in enumerate(CHECKS, start=1) if (self.code == k).any()}

    def summary(self, kept: int, params: Any) -> dict[str, Any]:
        """Counts and settings for the item attrs, the run record and the record's ``meta``."""
        from mmcli.features.qc.artifacts import CHECKS

        removed = {c: int((self.code == k).sum()) for k, c in enumerate(CHECKS, start=1) if (self.code == k).any()}
        out: dict[str, Any] = {"candidates": self.n, "kept": int(kept), "removed": removed,
                               "outside_annotation": int((self.code == OUTSIDE).sum()),
                               "codes": {"kept": 0, "outside_annotation": OUTSIDE,
                                         **{c: k for k, c in enumerate(CHECKS, start=1)}}}
        if params is not None:
            out["artifacts"] = params.to_dict()
        return out

    def arrays(self, coords: np.ndarray, tissue: np.ndarray) -> dict[str, np.ndarray]:
        return {"coords": np.asarray(coords, np.int64), "tissue": np.asarray(tissue, np.float32), "code": self.code,
                **self.scores}
