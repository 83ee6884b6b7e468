"""What every MIL head over one bag modality shares: the one-bag check, the in-fold instance scaler, padded
masked mini-batches read from the store under the memory budget, attention (or its analogue) per patient from
the predicting pass, and per-tile integrated gradients.

A subclass builds a network whose ``forward(x, mask, mean, scale)`` takes raw instances ``x`` (B, N, D) with
their mask (B, N) and the in-fold scaler's ``mean``/``scale`` (D,) and returns ``(logits (B, n_out), attention
(B, N), *aux)``: attention over each bag's real instances (padded positions 0), and optionally a dict of
training-time tensors for :meth:`~mmcli.heads.nn.torch_base.TorchHead._aux_loss`. Integrated gradients
(:func:`~mmcli.heads.nn.attribution.mil_integrated_gradients`) use the same call, so every bag head has them.

Bags are read one batch at a time through the cohort's :class:`~mmcli.heads.data.BagList` (only the sampled
rows of a bag beyond the budget during training): nothing here holds every bag.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from mmcli.heads.data import Cohort, pad_batch
from mmcli.heads.nn.torch_base import TorchHead, torch_env
from mmcli.heads.preprocess.vector import InstanceScaler
from mmcli.pipeline.errors import InputError

AUX = "aux"  # key of the network's training-time tensors in the extras of _forward


class BagHead(TorchHead):
    """Base of the MIL heads over exactly one bag modality (WSI tiles); subclasses give ``_build``."""

    tasks = ("classification", "survival", "regression")
    input_kind = "bag"
    needs_every_modality = True  # a patient without its bag has nothing to attend to

    def _check_modalities(self, X: Cohort) -> None:
        kinds = {n: m.spec.kind for n, m in X.modalities.items()}
        if len(kinds) != 1 or next(iter(kinds.values())) != "bag":
            raise InputError(f"{self.name} works on exactly one bag modality (tiles, e.g. wsi); got {kinds}. "
                             "Fix: --modalities wsi, or use --head fusion_mlp for several modalities.")

    @property
    def _bag_name(self) -> str:
        return self.spec_[0].name

    def _fit_preprocessing(self, X: Cohort) -> None:
        m = X.modalities[self._bag_name]
        assert m.bags is not None
        self.preprocessors_[self._bag_name] = InstanceScaler(seed=self.seed).fit(m.bags, X.patients)

    def _inputs(self, X: Cohort, idx: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        m = X.modalities[self._bag_name]
        assert m.bags is not None
        scaler = self.preprocessors_[self._bag_name]
        x, mask = pad_batch(m.bags, idx, m.spec.dim, self.max_instances if rng else None, rng)
        return {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask),
                "mean": torch.from_numpy(scaler.mean_), "scale": torch.from_numpy(scaler.scale_)}

    def _forward(self, inputs: dict[str, torch.Tensor], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """Training: extras ``{"aux": ..., "mask": ...}`` for the auxiliary loss; inference: ``attention``
        (B, N) float64 and ``n`` (B,) real instances per bag."""
        out, a, *rest = self.module_(inputs["x"], inputs["mask"], inputs["mean"], inputs["scale"])
        if train:
            return out, {AUX: rest[0] if rest else {}, "mask": inputs["mask"]}
        return out, {"attention": a.double().cpu().numpy(), "n": inputs["mask"].sum(1).cpu().numpy()}

    def _attention(self, X: Cohort, extras: list[dict[str, Any]]) -> dict[str, list[np.ndarray | None]]:
        """Each patient's attention over its bag's instances (order: items by item_id, rows in order), from the
        extras of the predicting pass; None for a patient without instances."""
        att: list[np.ndarray | None] = [None] * len(X)
        for extra in extras:
            for row, (i, n) in enumerate(zip(extra["idx"], extra["n"])):
                if n:
                    att[i] = extra["attention"][row, : int(n)].copy()
        return {self._bag_name: att}

    def tile_attributions(self, X: Cohort) -> pd.DataFrame:
        """Integrated gradients per tile (:func:`mmcli.heads.nn.attribution.mil_integrated_gradients`); only with
        ``--explain full``: a bag-level sum would only restate output minus baseline (completeness)."""
        from mmcli.heads.nn.attribution import mil_integrated_gradients

        with torch_env(None, self.n_threads):
            return mil_integrated_gradients(self, X)
