"""``mmcli pretrain``: contrastive (CLIP-style) pretraining of per-modality encoders on a store's cached features.

Labels are not read: every store patient with at least two of the modalities counts, and ``pretrain.json`` lists
their ids (so a fit can audit which of its test patients the encoders saw). The output folder is what
``mmcli fit --head fusion_mlp --init DIR [--init-in-fold]`` starts from (see :mod:`mmcli.heads.training.pretrain`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmcli.heads.training.pretrain import pretrain_store
from mmcli.pipeline.errors import InputError


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
    model = pretrain_store(store, list(modalities), encoders, hidden=hidden, proj_dim=proj_dim,
                           temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    say(f"{len(model.patients_)} patients with >= 2 of {list(modalities)}")
    model.save(out)
    say(f"InfoNCE loss {model.losses_[0]:.3f} -> {model.losses_[-1]:.3f} over {epochs} epochs; wrote {out}")
    return {"patients": len(model.patients_), "pairs": model.pairs_, "loss_first": model.losses_[0],
            "loss_last": model.losses_[-1], "out": str(out)}
