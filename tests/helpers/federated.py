"""Planted multi-site feature stores for the ``federate`` tests: a classification site and a survival site.

Every site writes an ``mri`` vector, a ``genes`` table and small ``wsi`` bags whose first features carry the
signal; ``offset`` shifts every feature of a site (a scanner / batch effect that per-site standardisation
removes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mmcli.pipeline.store import open_store


def _write_site(path: Path, ids: list[str], signal: np.ndarray, rng: np.random.Generator, offset: float) -> None:
    n = len(ids)
    fs = open_store(path, "a")
    genes = rng.normal(size=(n, 6)) + offset
    genes[:, :2] += signal[:, None]
    for i, pid in enumerate(ids):
        v = rng.normal(size=(1, 6)).astype(np.float32) + offset
        v[0, :2] += signal[i]
        fs.write_item("mri", "enc-mri", pid, "T1", v)
        t = rng.normal(size=(5, 4)).astype(np.float32) + offset
        t[:2, :2] += signal[i]
        fs.write_item("wsi", "enc-wsi", pid, "s0", t.astype(np.float16),
                      np.stack([np.arange(5) * 224, np.zeros(5)], 1).astype(np.int64))
    fs.write_table("genes", pd.DataFrame(genes, index=pd.Index(ids, name="patient_id"),
                                         columns=[f"g{j}" for j in range(6)]))


def site_store(path: Path, site: str, n: int, seed: int, offset: float = 0.0, shift: float = 1.5) -> pd.DataFrame:
    """A classification site: class ``pos`` adds ``shift`` to the signal features. Returns its labels rows."""
    rng = np.random.default_rng(seed)
    ids = [f"{site}-{i:03d}" for i in range(n)]
    y = rng.permutation(np.arange(n) % 2)
    _write_site(path, ids, shift * y, rng, offset)
    return pd.DataFrame({"patient_id": ids, "label": np.where(y == 1, "pos", "neg")})


def survival_site_store(path: Path, site: str, n: int, seed: int, offset: float = 0.0, beta: float = 1.5,
                        shift: float = 1.0) -> pd.DataFrame:
    """A survival site: latent ``z ~ N(0, 1)`` adds ``shift * z`` to the signal features and sets the hazard
    ``exp(beta * z)`` (exponential times, uniform censoring, ~60 % events). Returns labels rows
    ``patient_id, os_months, os_event``."""
    rng = np.random.default_rng(seed)
    ids = [f"{site}-{i:03d}" for i in range(n)]
    z = rng.normal(size=n)
    t_event = rng.exponential(12.0 * np.exp(-beta * z))
    t_cens = rng.uniform(2.0, 40.0, size=n)
    _write_site(path, ids, shift * z, rng, offset)
    return pd.DataFrame({"patient_id": ids, "os_months": np.round(np.minimum(t_event, t_cens) + 0.01, 3),
                         "os_event": (t_event <= t_cens).astype(int)})
