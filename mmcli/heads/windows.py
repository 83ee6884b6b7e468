"""Windowed vector items (a note encoded as token windows): each patient's rows and how they pool.

:func:`read_windows` reads, for the patients whose items of a modality carry ``row_weights``, the rows, the
coefficients that pool them into the patient's vector and each row's item, index, character span and token
count. Integrated gradients per window (:mod:`mmcli.heads.nn.attribution`) and the report use it; reading it
needs no torch.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Windows:
    """One patient's windowed rows of a vector modality: ``features`` (W, D), the coefficients ``coef`` (W,)
    that pool them into the patient's vector (sum 1), and per row its item, index in the item, character span
    and token count (spans and tokens -1 where the item has none)."""

    features: np.ndarray
    coef: np.ndarray
    item_ids: list[str]
    index: np.ndarray
    chars: np.ndarray  # (W, 2)
    tokens: np.ndarray


def read_windows(store: Any, modality: str, encoder_id: str, patients: Iterable[str]) -> dict[str, Windows]:
    """The :class:`Windows` of each of ``patients`` whose items of ``modality`` carry ``row_weights``, pooled as
    :func:`mmcli.heads.data.load_cohort` pools them: each weighted item into one row, then the mean of the
    patient's rows (an unweighted item counts each of its rows)."""
    out: dict[str, Windows] = {}
    wanted = set(patients)
    items: dict[str, list[str]] = {}
    for key in store.iter_items(modality, encoder_id):
        if key.patient_id in wanted:
            items.setdefault(key.patient_id, []).append(key.item_id)
    for pid, ids in items.items():
        parts, weighted = [], False
        for iid in sorted(ids):
            it = store.read_item(modality, encoder_id, pid, iid)
            f = np.asarray(it.features, dtype=np.float32)
            w = it.attrs.get("row_weights")
            chars = (it.attrs.get("text") or {}).get("window_chars")
            n = len(f)
            if w is not None and len(w) == n:
                weighted = True
                w = np.asarray(w, dtype=np.float64)
                c = np.asarray(chars, dtype=np.int64) if chars is not None and len(chars) == n else np.full((n, 2), -1)
                parts.append((iid, f, w / w.sum(), 1, c, w))
            else:
                parts.append((iid, f, np.full(n, 1.0 / max(n, 1)), n, np.full((n, 2), -1), np.full(n, -1.0)))
        if not weighted:
            continue
        n_rows = sum(p[3] for p in parts)  # the rows the patient's vector is the plain mean of
        out[pid] = Windows(
            features=np.concatenate([p[1] for p in parts]),
            coef=np.concatenate([p[2] * p[3] / n_rows for p in parts]),
            item_ids=[p[0] for p in parts for _ in range(len(p[1]))],
            index=np.concatenate([np.arange(len(p[1])) for p in parts]),
            chars=np.concatenate([p[4] for p in parts]).reshape(-1, 2),
            tokens=np.concatenate([p[5] for p in parts]).astype(np.int64),
        )
    return out
