"""``attention_mil``: gated attention MIL (Ilse et al. 2018) over one bag modality (WSI tiles).

A patient's slides are concatenated into one bag. Instances are standardised with an in-fold
:class:`~mmcli.heads.preprocess.vector.InstanceScaler` (folded into the first layer), embedded
(Linear-ReLU-Dropout), pooled by gated attention
and classified (or scored for survival with the Cox loss). Bags are padded into masked mini-batches; during
training each bag contributes at most ``max_instances`` random instances per step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmcli.heads.data import Cohort, pad_batch
from mmcli.heads.nn.modules import GatedAttention, StandardisedEmbed
from mmcli.heads.nn.torch_base import TorchHead, TorchParams, torch_env
from mmcli.heads.preprocess.vector import InstanceScaler
from mmcli.heads.registry import register_head
from mmcli.pipeline.errors import InputError


class ABMIL(nn.Module):
    """Instance embedding -> gated attention pooling -> linear output."""

    def __init__(self, in_dim: int, hidden: int, attn_dim: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.embed = StandardisedEmbed(in_dim, hidden, dropout)
        self.pool = GatedAttention(hidden, attn_dim)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) raw features, mask (B, N); mean/scale (D,) of the in-fold instance scaler."""
        z, a = self.pool(self.embed(x, mean, scale), mask)
        return self.out(z), a


@register_head("attention_mil", aliases=("abmil", "gated_abmil"))
class AttentionMILHead(TorchHead):
    """Gated attention MIL over one bag modality; parameters: :class:`~mmcli.heads.nn.torch_base.TorchParams`."""

    tasks = ("classification", "survival", "regression")
    Params = TorchParams
    input_kind = "bag"
    needs_every_modality = True  # a patient without its bag has nothing to attend to

    def _check_modalities(self, X: Cohort) -> None:
        kinds = {n: m.spec.kind for n, m in X.modalities.items()}
        if len(kinds) != 1 or next(iter(kinds.values())) != "bag":
            raise InputError(f"attention_mil works on exactly one bag modality (tiles, e.g. wsi); got {kinds}. "
                             "Fix: --modalities wsi, or use --head fusion_mlp for several modalities.")

    @property
    def _bag_name(self) -> str:
        return self.spec_[0].name

    def _fit_preprocessing(self, X: Cohort) -> None:
        m = X.modalities[self._bag_name]
        assert m.bags is not None
        self.preprocessors_[self._bag_name] = InstanceScaler(seed=self.seed).fit(m.bags, X.patients)

    def _build(self) -> nn.Module:
        return ABMIL(self.spec_[0].dim, self.hidden, self.attn_dim, self.n_out, self.dropout)

    def _inputs(self, X: Cohort, idx: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        m = X.modalities[self._bag_name]
        assert m.bags is not None
        scaler = self.preprocessors_[self._bag_name]
        x, mask = pad_batch(m.bags, idx, m.spec.dim, self.max_instances if rng else None, rng)
        return {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask),
                "mean": torch.from_numpy(scaler.mean_), "scale": torch.from_numpy(scaler.scale_)}

    def _forward(self, inputs: dict[str, torch.Tensor], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        out, a = self.module_(inputs["x"], inputs["mask"], inputs["mean"], inputs["scale"])
        return out, {} if train else {"attention": a.double().cpu().numpy()}

    def _attention(self, X: Cohort, extras: list[dict[str, Any]]) -> dict[str, list[np.ndarray | None]]:
        """Each patient's attention over its bag's instances (order: items by item_id, rows in order)."""
        m = X.modalities[self._bag_name]
        assert m.bags is not None
        att: list[np.ndarray | None] = [None] * len(X)
        for extra in extras:
            for row, i in enumerate(extra["idx"]):
                n = m.bags.length(i)
                if n:
                    att[i] = extra["attention"][row, :n].copy()
        return {self._bag_name: att}

    def tile_attributions(self, X: Cohort) -> pd.DataFrame:
        """Integrated gradients per tile (:func:`mmcli.heads.nn.attribution.mil_integrated_gradients`); only with
        ``--explain full``: a bag-level sum would only restate output minus baseline (completeness)."""
        from mmcli.heads.nn.attribution import mil_integrated_gradients

        with torch_env(None, self.n_threads):
            return mil_integrated_gradients(self, X)
