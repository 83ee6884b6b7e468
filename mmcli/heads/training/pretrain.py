"""Contrastive (CLIP-style) pretraining of per-modality projections on cached, unlabelled modality pairs.

Each modality ``m`` gets an encoder ``f_m = ReLU(Linear(D_m, hidden))`` on its standardised per-patient
vector (bags mean-pooled), the same first layer as ``fusion_mlp``'s per-modality embedding, plus a
projection ``g_m = Linear(hidden, proj_dim)`` used only by the loss (SimCLR / CLIP keep the encoder and
discard the projection). For every pair of modalities (a, b), the patients that have both form the positives
of a symmetric InfoNCE loss (Radford et al. 2021):
``L = (CE(S, I) + CE(Sᵀ, I)) / 2`` with ``S = norm(g_a f_a(x_a)) norm(g_b f_b(x_b))ᵀ / temperature``
over a mini-batch, averaged over the pairs. No labels are used, so unlabelled patients count.

Saved (no pickle): ``pretrain.json`` (config, modalities with encoder ids and dims, loss per epoch),
``encoders.safetensors`` (``<modality>.encoder.weight`` / ``.bias``, ``<modality>.projection.*``) and the
standardisation (``preprocess.json`` / ``.safetensors``). ``fusion_mlp --init DIR`` starts each matching
modality's first layer from these encoders (its own standardisation stays in-fold).
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcli.heads.data import Cohort, ModalitySpec
from mmcli.heads.nn.pretrained import CONFIG, WEIGHTS
from mmcli.heads.nn.torch_base import torch_env
from mmcli.heads.preprocess.vector import VectorPreprocessor, save_preprocessors
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_json


class ContrastivePretrainer:
    """Symmetric InfoNCE over modality pairs (see module docstring).

    Args:
        hidden: encoder output size (must equal fusion_mlp's ``hidden`` to initialise it).
        proj_dim: projection size of the loss.
        temperature: softmax temperature of the similarities, > 0.
        epochs, batch_size, lr, weight_decay, seed: AdamW training settings.
        n_threads: torch CPU threads (1, as the heads: these layers are tiny, and more threads than idle
            cores make every step many times slower).
    """

    def __init__(self, hidden: int = 32, proj_dim: int = 32, temperature: float = 0.1, epochs: int = 100,
                 batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                 n_threads: int = 1) -> None:
        if temperature <= 0:
            raise InputError(f"--temperature {temperature}: must be > 0.")
        self.hidden, self.proj_dim, self.temperature = hidden, proj_dim, temperature
        self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed = epochs, batch_size, lr, weight_decay, seed
        self.n_threads = n_threads
        self.losses_: list[float] = []
        self.pairs_: dict[str, int] = {}

    def fit(self, X: Cohort) -> ContrastivePretrainer:
        if len(X.modalities) < 2:
            raise InputError(f"contrastive pretraining needs >= 2 modalities, got {X.names}.")
        self.spec_: list[ModalitySpec] = X.specs()
        self.preprocessors_: dict[str, VectorPreprocessor] = {}
        Z: dict[str, np.ndarray] = {}
        for name, m in X.modalities.items():
            keep = np.flatnonzero(m.present)
            if len(keep) < 2:
                raise InputError(f"modality {name!r}: {len(keep)} patient(s) have it; pretraining needs more.")
            pooled = m.pooled()
            self.preprocessors_[name] = VectorPreprocessor().fit(pooled[keep], [X.patients[i] for i in keep])
            Z[name] = self.preprocessors_[name].transform(pooled).astype(np.float32)
        pairs = []
        for a, b in combinations(X.names, 2):
            both = np.flatnonzero(X.modalities[a].present & X.modalities[b].present)
            self.pairs_[f"{a}+{b}"] = len(both)
            if len(both) >= 2:
                pairs.append((a, b, both))
        if not pairs:
            raise InputError(f"no two patients share a pair of the modalities {X.names}; nothing to contrast.")
        with torch_env(self.seed, self.n_threads):
            self._train(Z, pairs)
        return self

    def _train(self, Z: dict[str, np.ndarray], pairs: list[tuple[str, str, np.ndarray]]) -> None:
        self.module_ = nn.ModuleDict({
            s.name: nn.ModuleDict({"encoder": nn.Linear(self.preprocessors_[s.name].out_dim, self.hidden),
                                   "projection": nn.Linear(self.hidden, self.proj_dim)}) for s in self.spec_})
        opt = torch.optim.AdamW(self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)
        tensors = {k: torch.from_numpy(v) for k, v in Z.items()}
        self.losses_ = []
        for _ in range(self.epochs):
            total, steps = 0.0, 0
            for a, b, both in pairs:
                perm = both[rng.permutation(len(both))]
                for start in range(0, len(perm), self.batch_size):
                    idx = torch.as_tensor(perm[start:start + self.batch_size])
                    if len(idx) < 2:
                        continue
                    loss = self._loss(tensors[a][idx], tensors[b][idx], a, b)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, steps = total + float(loss.detach()), steps + 1
            self.losses_.append(total / max(steps, 1))

    def embed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        enc = self.module_[name]
        return F.normalize(enc["projection"](F.relu(enc["encoder"](x))), dim=1)

    def _loss(self, xa: torch.Tensor, xb: torch.Tensor, a: str, b: str) -> torch.Tensor:
        logits = self.embed(a, xa) @ self.embed(b, xb).T / self.temperature
        target = torch.arange(len(xa))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({f"{m}.{k}": v.detach().contiguous() for m, sub in self.module_.items()
                   for k, v in sub.state_dict().items()}, str(path / WEIGHTS))
        save_preprocessors(path, self.preprocessors_)
        write_json(path / CONFIG, {
            "kind": "contrastive_pretraining", "loss": "symmetric InfoNCE (CLIP)", "hidden": self.hidden,
            "proj_dim": self.proj_dim, "temperature": self.temperature, "epochs": self.epochs,
            "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
            "modalities": [s.to_json() for s in self.spec_], "patients_per_pair": self.pairs_,
            "loss_per_epoch": [round(x, 6) for x in self.losses_],
        })
        return path
