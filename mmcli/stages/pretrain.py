"""``mmcli pretrain``: contrastive (CLIP-style) pretraining of per-modality encoders on a store's cached features.

Labels are not read: every store patient with at least two of the modalities counts. The output folder is what
``mmcli fit --head fusion_mlp --init DIR`` starts from (see :mod:`mmcli.heads.training.pretrain`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.training.pretrain import ContrastivePretrainer
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store


def pretrain(store: str | Path, modalities: Sequence[str], out: str | Path, *,
             encoders: dict[str, str] | None = None, hidden: int = 32, proj_dim: int = 32,
             temperature: float = 0.1, epochs: int = 100, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pretrain encoders of ``modalities`` (>= 2) on every patient of ``store``; write them to ``out``."""
    say = log or (lambda _m: None)
    if len(list(modalities)) < 2:
        raise InputError(f"--modalities {','.join(modalities)}: contrastive pretraining needs at least two.")
    for name, v in (("--hidden", hidden), ("--proj-dim", proj_dim), ("--epochs", epochs),
                    ("--batch-size", batch_size)):
        if v < 1:
            raise InputError(f"{name} {v}: must be >= 1.")
    fs = open_store(Path(store), "r")
    cohort = load_cohort(fs, resolve_sources(fs, list(modalities), encoders))
    two = cohort.presence().sum(axis=1) >= 2
    cohort = cohort.subset(np.flatnonzero(two))
    say(f"{len(cohort)} patients with >= 2 of {list(modalities)}")
    model = ContrastivePretrainer(hidden=hidden, proj_dim=proj_dim, temperature=temperature, epochs=epochs,
                                  batch_size=batch_size, lr=lr, seed=seed).fit(cohort)
    model.save(out)
    say(f"InfoNCE loss {model.losses_[0]:.3f} -> {model.losses_[-1]:.3f} over {epochs} epochs; wrote {out}")
    return {"patients": len(cohort), "pairs": model.pairs_, "loss_first": model.losses_[0],
            "loss_last": model.losses_[-1], "out": str(out)}
