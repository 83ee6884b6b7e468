"""Small feature stores with a planted signal, written directly with the store API (no extractors).

* ``wsi`` (bag): 1-2 slides per patient, ``tiles`` rows of ``dim`` Gaussian features with coords. Positive
  (or high-risk) patients carry a few *key instances* shifted along a fixed direction; ``key`` records their
  (item_id, index) so attention can be checked.
* ``mri`` (vector, items T1/T2): a weaker class/risk shift; some patients miss it (``mri_missing``).
* ``genes`` (table): 12 columns, the first two shifted by class/risk, some NaN values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmcli.pipeline.store import open_store


@dataclass
class Planted:
    store: Path
    labels: pd.DataFrame  # patient_id index
    key: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # positive patient -> key instances
    latent: dict[str, float] = field(default_factory=dict)


def make_store(
    path: Path, n: int = 80, task: str = "binary", seed: int = 0, dim: int = 16, tiles: tuple[int, int] = (12, 24),
    key_frac: float = 0.15, shift: float = 3.0, modalities: tuple[str, ...] = ("wsi", "mri", "genes"),
    mri_missing: float = 0.25, wsi_missing: float = 0.0, n_classes: int = 3, prefix: str = "P",
) -> Planted:
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    direction = np.zeros(dim, dtype=np.float32)
    direction[:4] = 1.0
    if task == "survival":
        z = rng.normal(size=n)
        hazard = np.exp(1.2 * z)
        t_event = rng.exponential(30.0 / hazard)
        t_cens = rng.uniform(20, 90, size=n)
        time = np.maximum(np.minimum(t_event, t_cens), 0.5).round(2)
        event = (t_event <= t_cens).astype(int)
        labels = pd.DataFrame({"time": time, "event": event}, index=pd.Index(ids, name="patient_id"))
        strength = 1.0 / (1.0 + np.exp(-2.0 * z))  # 0..1, higher = higher risk
        positive = strength > 0.5
        latent = z
        vec_signal = 1.2 * z
    else:
        k = 2 if task == "binary" else n_classes
        cls = np.arange(n) % k
        rng.shuffle(cls)
        names = ["neg", "pos"] if k == 2 else [f"C{j}" for j in range(k)]
        labels = pd.DataFrame({"label": [names[c] for c in cls]}, index=pd.Index(ids, name="patient_id"))
        strength = cls / (k - 1)
        positive = cls > 0
        latent = cls.astype(float)
        vec_signal = 2.0 * strength
    fs = open_store(path, "a")
    planted = Planted(path, labels, {}, {p: float(v) for p, v in zip(ids, latent)})
    genes = []
    for i, pid in enumerate(ids):
        if "wsi" in modalities and rng.random() >= wsi_missing:
            key: set[tuple[str, int]] = set()
            for s in range(int(rng.integers(1, 3))):
                n_t = int(rng.integers(*tiles))
                f = rng.normal(size=(n_t, dim)).astype(np.float32)
                if positive[i] or task == "survival":
                    n_key = max(1, int(round(key_frac * n_t)))
                    idx = rng.choice(n_t, n_key, replace=False)
                    f[idx] += shift * strength[i] * direction
                    if positive[i]:
                        key |= {(f"slide{s}", int(j)) for j in idx}
                coords = np.stack([np.arange(n_t) * 224, np.zeros(n_t)], 1).astype(np.int64)
                fs.write_item("wsi", "enc-wsi", pid, f"slide{s}", f.astype(np.float16), coords)
            if key:
                planted.key[pid] = key
        if "mri" in modalities and rng.random() >= mri_missing:
            for seq in ("T1", "T2")[: int(rng.integers(1, 3))]:
                v = rng.normal(size=(1, 8)).astype(np.float32)
                v[0, :2] += vec_signal[i]
                fs.write_item("mri", "enc-mri", pid, seq, v)
        g = rng.normal(size=12)
        g[:2] += vec_signal[i]
        g[rng.random(12) < 0.08] = np.nan
        genes.append(g)
    if "genes" in modalities:
        fs.write_table("genes", pd.DataFrame(genes, index=pd.Index(ids, name="patient_id"),
                                             columns=[f"g{j}" for j in range(12)]))
    return planted


def shuffled(labels: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    """The same label values assigned to patients at random (no signal left)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    out[:] = labels.to_numpy()[rng.permutation(len(labels))]
    return out


def assert_attention_per_tile(csv: Path, store: Path, tol: float = 1e-6) -> pd.DataFrame:
    """``predict --attention``'s per-tile file: its columns, each patient's attention summing to 1, and one row per
    tile of each item (indices 0..N-1 of the store's ``wsi`` features). Returns the frame."""
    att = pd.read_csv(csv)
    assert list(att.columns) == ["patient_id", "item_id", "index", "attention"]
    fs = open_store(store, "r")
    for pid, g in att.groupby("patient_id"):
        assert abs(g["attention"].sum() - 1) < tol
        for iid, gi in g.groupby("item_id"):
            assert sorted(gi["index"]) == list(range(fs.read_item("wsi", "enc-wsi", pid, iid).features.shape[0]))
    return att
