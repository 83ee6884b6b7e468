"""``fusion_mlp``: per-modality projection -> fusion operator -> MLP, for any number of modalities.

* Bag modalities (WSI tiles): instances standardised in-fold (folded into the first layer), embedded, pooled
  by gated attention
  (``pool="attention"``) or a masked mean (``pool="mean"``).
* Vector modalities and tables: median-imputed and standardised in-fold, embedded (Linear-ReLU-Dropout).
* Modality-presence flags: a missing modality's embedding is zeroed and the flags are appended to the fused
  vector, so patients missing a modality are trained on and predicted.
* Modality dropout: in training, each present modality of a patient is hidden with probability
  ``modality_dropout`` (at least one always kept), so the model learns to predict from partial data.
* Fusion operators: see :mod:`mmcli.heads.nn.fusion`; their per-modality weights are reported by
  :meth:`FusionMLPHead.modality_weights`.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from mmcli.heads.data import Cohort, pad_batch
from mmcli.heads.nn.fusion import FUSIONS
from mmcli.heads.nn.modules import GatedAttention, MeanPool, StandardisedEmbed, mlp_embed
from mmcli.heads.nn.pretrained import refit_to_standardisation
from mmcli.heads.nn.torch_base import TorchHead, TorchParams, torch_env
from mmcli.heads.preprocess.params import VectorPrepParams
from mmcli.heads.preprocess.vector import (
    InstanceScaler,
    VectorPrepHead,
    VectorPreprocessor,
    vector_preprocessor,
)
from mmcli.heads.registry import register_head
from mmcli.pipeline.errors import InputError


class FusionNet(nn.Module):
    """Embeddings per modality -> presence mask -> fusion operator -> MLP on [fused; presence]."""

    def __init__(self, kinds: list[str], dims: list[int], hidden: int, attn_dim: int, n_out: int,
                 dropout: float, fusion: str, pool: str, n_heads: int, bilinear_dim: int) -> None:
        super().__init__()
        self.kinds = kinds
        self.embed = nn.ModuleList([
            StandardisedEmbed(d, hidden, dropout) if k == "bag" else mlp_embed(d, hidden, dropout)
            for k, d in zip(kinds, dims)
        ])
        self.pools = nn.ModuleList([
            (GatedAttention(hidden, attn_dim) if pool == "attention" else MeanPool()) if k == "bag" else nn.Identity()
            for k in kinds
        ])
        self.fusion = FUSIONS.get(fusion)(len(kinds), hidden, attn_dim=attn_dim, dropout=dropout, n_heads=n_heads,
                                      bilinear_dim=bilinear_dim)
        M = len(kinds)
        self.head = nn.Sequential(nn.Linear(hidden + M, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_out))

    def forward(self, xs: list[torch.Tensor], masks: list[torch.Tensor | None], present: torch.Tensor,
                norms: list[tuple[torch.Tensor, torch.Tensor] | None]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """xs: per modality (B, N, D) raw bags or (B, D) preprocessed vectors; masks: (B, N) for bags;
        present (B, M) float; norms: (mean, scale) of each bag modality's instance scaler."""
        embs, atts = [], []
        for m, kind in enumerate(self.kinds):
            if kind == "bag":
                norm = norms[m]
                assert norm is not None
                z, a = self.pools[m](self.embed[m](xs[m], *norm), masks[m])
            else:
                z, a = self.embed[m](xs[m]), None
            embs.append(z)
            atts.append(a)
        E = torch.stack(embs, 1) * present.unsqueeze(-1)
        fused, w = self.fusion(E, present)
        return self.head(torch.cat([fused, present], 1)), w, atts


def _fusion_choices() -> str:
    return " | ".join(FUSIONS.names())


class FusionMLPParams(TorchParams, VectorPrepParams):
    """:class:`~mmcli.heads.nn.torch_base.TorchParams` (smaller defaults), the fusion settings, and the
    imputation / batch correction of vector modalities (:class:`~mmcli.heads.preprocess.vector.VectorPrepParams`)."""

    hidden: int = Field(32, ge=1, le=65_536, description="embedding size (units per layer), 1..65536")
    epochs: int = Field(40, ge=1, le=100_000,
                        description="passes over the training patients (fixed: no inner validation "
                        "split, which small cohorts cannot afford), >= 1")
    max_instances: int = Field(256, ge=1, le=10_000_000,
                               description="per bag and training step, at most this many random "
                               "instances (tiles; all of them at inference), >= 1")
    fusion: str = Field("concat", description=f"fusion operator: {_fusion_choices()}")
    pool: Literal["attention", "mean"] = Field("attention", description="how WSI bags are pooled: attention "
                                               "(gated) | mean")
    modality_dropout: float = Field(0.25, ge=0.0, lt=1.0, description="probability of hiding a present modality "
                                    "per patient and training step, 0 <= p < 1")
    n_heads: int = Field(2, ge=1, le=1024, description="attention heads of cross_attention, >= 1, dividing hidden")
    bilinear_dim: int = Field(8, ge=1, le=4096,
                              description="low projection size (units) of bilinear (pairwise Kronecker "
                              "of (d+1)-vectors), >= 1")
    n_components: int | None = Field(32, ge=1, le=100_000,
                                     description="in-fold PCA size of vector modalities (MRI, text, "
                                     "tables) wider than this, >= 1; null = no PCA")
    init: str | None = Field(None, description="folder of `mmcli pretrain`: start each pretrained modality's "
                             "first layer from its contrastive encoder (those modalities skip the PCA); null = random")
    freeze_init: bool = Field(False, description="with init: keep the pretrained first layers fixed (train only "
                              "what is above them: a probe of the pretrained representation, for few labels); "
                              "false = fine-tune them with the rest")

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, v: str) -> str:
        if v not in FUSIONS:
            raise ValueError(f"unknown fusion {v!r}")
        return v

    @field_validator("freeze_init")
    @classmethod
    def _freeze_needs_init(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("init"):
            raise ValueError("freeze_init=true needs the pretrained layers of --init DIR")
        return v

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_hidden(cls, v: int, info: ValidationInfo) -> int:
        hidden = info.data.get("hidden")
        if info.data.get("fusion") == "cross_attention" and hidden and hidden % v:
            raise ValueError(f"cross_attention needs hidden ({hidden}) divisible by n_heads ({v})")
        return v


@register_head("fusion_mlp")
class FusionMLPHead(VectorPrepHead, TorchHead):
    """Multimodal fusion MLP; parameters: :class:`FusionMLPParams`.

    ``n_components``: encoder outputs have hundreds of dimensions and cohorts often only ~100 patients:
    projecting the raw vectors lets the net overfit noise dimensions, while a training-fold PCA keeps the
    dominant ones.
    """

    Params = FusionMLPParams
    tasks = ("classification", "survival", "regression")
    input_kind = "mixed"
    fusion: str
    pool: str
    modality_dropout: float
    n_heads: int
    bilinear_dim: int
    n_components: int | None
    impute: str | None
    batch_correct: str
    batch_column: str | None
    batch_keep: list[str]
    init: str | None
    freeze_init: bool

    def _fit_preprocessing(self, X: Cohort) -> None:
        self._pretrained = None
        if self.init:
            from mmcli.heads.nn.pretrained import load_pretrained

            config, enc = load_pretrained(self.init)
            if int(config["hidden"]) != self.hidden:
                raise InputError(f"--init {self.init}: pretrained with hidden={config['hidden']}, the head has "
                                 f"hidden={self.hidden}. Fix: --param hidden={config['hidden']}.")
            self._pretrained = {n: w for n, w in enc.items() if n in X.modalities}
            if not self._pretrained:
                raise InputError(f"--init {self.init}: pretrained modalities {sorted(enc)} share none with "
                                 f"{X.names}. Fix: pretrain on the modalities you fit.")
        for name, m in X.modalities.items():
            keep = np.flatnonzero(m.present)
            if len(keep) == 0:
                raise InputError(f"modality {name!r}: no training patient has it. Fix: drop it from --modalities.")
            pids = [X.patients[i] for i in keep]
            if m.spec.kind == "bag":
                assert m.bags is not None
                self.preprocessors_[name] = InstanceScaler(seed=self.seed).fit(m.bags.subset(keep), pids)
            else:
                assert m.vectors is not None
                wide = self.n_components is not None and m.spec.dim > self.n_components
                wide = wide and not (self._pretrained and name in self._pretrained)  # the encoder takes raw dims
                self.preprocessors_[name] = vector_preprocessor(self, self.n_components if wide else None).fit(
                    m.vectors[keep], pids, X.covariates)

    def _build(self) -> nn.Module:
        dims = [s.dim if s.kind == "bag" else self.preprocessors_[s.name].out_dim for s in self.spec_]
        net = FusionNet([s.kind for s in self.spec_], dims, self.hidden, self.attn_dim,
                        self.n_out, self.dropout, self.fusion, self.pool, self.n_heads, self.bilinear_dim)
        pretrained, self._pretrained = getattr(self, "_pretrained", None), None  # only when fitting, once
        for k, spec in enumerate(self.spec_):
            if pretrained and spec.name in pretrained:
                layer = net.embed[k].linear if spec.kind == "bag" else net.embed[k][0]
                w = pretrained[spec.name]
                if tuple(w["weight"].shape) != tuple(layer.weight.shape):
                    raise InputError(f"--init {self.init}: modality {spec.name!r} was pretrained on "
                                     f"{w['weight'].shape[1]} inputs, the head has {layer.weight.shape[1]} (other "
                                     "encoder, or --impute indicator columns). Fix: pretrain on the same features.")
                # the fold's own (in-fold) standardisation stays; the layer is rescaled to compute the encoder
                prep = self.preprocessors_[spec.name]
                weight, bias = refit_to_standardisation(w, prep.mean_, prep.scale_)
                with torch.no_grad():
                    layer.weight.copy_(weight)
                    layer.bias.copy_(bias)
                if self.freeze_init:
                    layer.weight.requires_grad_(False)
                    layer.bias.requires_grad_(False)
        return net

    def _inputs(self, X: Cohort, idx: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for k, spec in enumerate(self.spec_):
            m, prep = X.modalities[spec.name], self.preprocessors_[spec.name]
            present = m.present[idx]
            if spec.kind == "bag":
                assert m.bags is not None and isinstance(prep, InstanceScaler)
                x, mask = pad_batch(m.bags, idx, spec.dim, self.max_instances if rng else None, rng)
                out[f"x{k}"] = torch.from_numpy(x)
                out[f"mask{k}"] = torch.from_numpy(mask)
                out[f"mean{k}"] = torch.from_numpy(prep.mean_)
                out[f"scale{k}"] = torch.from_numpy(prep.scale_)
            else:
                assert m.vectors is not None and isinstance(prep, VectorPreprocessor)
                v = np.zeros((len(idx), prep.out_dim), dtype=np.float32)
                if present.any():
                    rows = idx[present]
                    v[present] = prep.transform(m.vectors[rows], [X.patients[i] for i in rows], X.covariates)
                out[f"x{k}"] = torch.from_numpy(v)
        out["present"] = torch.from_numpy(np.stack([X.modalities[s.name].present[idx] for s in self.spec_], 1)
                                          .astype(np.float32))
        return out

    def _forward(self, inputs: dict[str, torch.Tensor], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        M = len(self.spec_)
        present = inputs["present"]
        if train and self.modality_dropout > 0:
            keep = (torch.rand(present.shape, device=present.device) >= self.modality_dropout).float() * present
            present = torch.where(keep.sum(1, keepdim=True) > 0, keep, present)
        xs = [inputs[f"x{k}"] for k in range(M)]
        masks = [inputs.get(f"mask{k}") for k in range(M)]
        norms = [(inputs[f"mean{k}"], inputs[f"scale{k}"]) if f"mean{k}" in inputs else None for k in range(M)]
        out, w, atts = self.module_(xs, masks, present, norms)
        if train:
            return out, {}
        return out, {"weights": w.double().cpu().numpy(),
                     "attention": [None if a is None else a.double().cpu().numpy() for a in atts]}

    def modality_weights(self, X: Cohort) -> dict[str, float]:
        """Mean operator weight of each modality over the patients that have it, normalised to sum 1."""
        X = self.align(X)
        _, extras, _ = self._run(X)
        w = np.zeros((len(X), len(self.spec_)))
        for extra in extras:
            w[extra["idx"]] = extra["weights"]
        present = X.presence()
        means = np.array([w[present[:, m], m].mean() if present[:, m].any() else 0.0 for m in range(w.shape[1])])
        total = means.sum()
        return {s.name: float(v / total) if total > 0 else 0.0 for s, v in zip(self.spec_, means)}

    def attributions(self, X: Cohort) -> pd.DataFrame:
        """Integrated gradients per table feature and per embedding modality (:mod:`mmcli.heads.nn.attribution`)."""
        from mmcli.heads.nn.attribution import integrated_gradients

        with torch_env(None, self.n_threads):
            return integrated_gradients(self, X)

    def _attention(self, X: Cohort, extras: list[dict[str, Any]]) -> dict[str, list[np.ndarray | None]] | None:
        """Tile attention of each bag modality (``pool="attention"`` only)."""
        if self.pool != "attention" or not any(s.kind == "bag" for s in self.spec_):
            return None
        out: dict[str, list[np.ndarray | None]] = {}
        for k, spec in enumerate(self.spec_):
            if spec.kind != "bag":
                continue
            m = X.modalities[spec.name]
            assert m.bags is not None
            att: list[np.ndarray | None] = [None] * len(X)
            for extra in extras:
                for row, i in enumerate(extra["idx"]):
                    n = m.bags.length(i)
                    if m.present[i] and n:
                        att[i] = extra["attention"][k][row, :n].copy()
            out[spec.name] = att
        return out
