"""Contrastive (CLIP-style) pretraining of per-modality projections on cached, unlabelled modality pairs.

Each modality ``m`` gets an encoder ``f_m = ReLU(Linear(D_m, hidden))`` on its standardised per-patient
vector (bags mean-pooled), the same first layer as ``fusion_mlp``'s per-modality embedding, plus a
projection ``g_m = Linear(hidden, proj_dim)`` used only by the loss (SimCLR / CLIP keep the encoder and
discard the projection). For every pair of modalities (a, b), the patients that have both form the positives
of a symmetric InfoNCE loss (Radford et al. 2021):
``L = (CE(S, I) + CE(Sᵀ, I)) / 2`` with ``S = norm(g_a f_a(x_a)) norm(g_b f_b(x_b))ᵀ / temperature``
over a mini-batch, averaged over the pairs. No labels are used, so unlabelled patients count.

Saved (no pickle): ``pretrain.json`` (config, modalities with encoder ids and dims, loss per epoch, and the
ids of the ``patients`` whose features it saw), ``encoders.safetensors`` (``<modality>.encoder.weight`` /
``.bias``, ``<modality>.projection.*``) and the standardisation (``preprocess.json`` / ``.safetensors``).
``fusion_mlp --init DIR`` starts each matching modality's first layer from these encoders (its own
standardisation stays in-fold).

Auditing a fit that starts from it (issue 24 item 5): pretraining on the whole store is transductive in
cross-validation (each fold's test patients' features shaped the encoders; never their labels). ``fit --init``
records, per fold, how many of the fold's test patients the pretraining saw (:func:`overlap_audit`), and
``--init-in-fold`` reruns the pretraining inside every fold, with DIR's settings, on the store's patients minus
that fold's test patients (:class:`FoldPretraining`): the fold's training patients and the store's unlabelled
ones. The final model (no test patients) starts from DIR as given.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcli.heads.data import Cohort, ModalitySpec, load_cohort, resolve_sources
from mmcli.heads.nn.pretrained import CONFIG, WEIGHTS
from mmcli.heads.nn.torch_base import torch_env
from mmcli.heads.preprocess.vector import VectorPreprocessor, save_preprocessors
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_json
from mmcli.pipeline.store import open_store

SETTINGS = ("hidden", "proj_dim", "temperature", "epochs", "batch_size", "lr", "seed")  # pretrain.json keys reused


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
        self.patients_ = [str(p) for p in X.patients]
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
            "n_patients": len(self.patients_), "patients": self.patients_,
        })
        return path


def pretrain_store(store: str | Path, modalities: Sequence[str], encoders: dict[str, str] | None = None, *,
                   exclude: Sequence[str] = (), **settings: Any) -> ContrastivePretrainer:
    """Fit a :class:`ContrastivePretrainer` (``settings``: its arguments) on every patient of ``store`` that has
    at least two of ``modalities``, except ``exclude`` (e.g. a fold's test patients)."""
    fs = open_store(Path(store), "r")
    cohort = load_cohort(fs, resolve_sources(fs, list(modalities), encoders))
    left_out = set(map(str, exclude))
    keep = (cohort.presence().sum(axis=1) >= 2) & np.array([p not in left_out for p in cohort.patients])
    return ContrastivePretrainer(**settings).fit(cohort.subset(np.flatnonzero(keep)))


def read_config(init: str | Path) -> dict[str, Any]:
    """``pretrain.json`` of a pretraining folder (InputError naming ``--init`` when there is none)."""
    f = Path(init) / CONFIG
    if not f.is_file():
        raise InputError(f"--init {init}: not a pretraining folder (no {CONFIG}). Fix: pass the --out folder of "
                         "`mmcli pretrain`.")
    return json.loads(f.read_text())


@dataclass
class FoldPretraining:
    """``--init-in-fold``: each fold reruns the pretraining of ``init`` (same modalities, encoders and settings)
    on ``store``'s patients minus the fold's test patients, and the fold's head starts from that.

    Called by cross-validation as a context manager per fold (picklable: a dask task carries it); the fold's
    pretraining folder lives in a temporary directory for the fold's fit and is removed after it."""

    store: str
    init: str

    @contextlib.contextmanager
    def __call__(self, k: int, test: Sequence[str], params: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
        config = read_config(self.init)
        mods = config["modalities"]
        encoders = {m["name"]: m["encoder_id"] for m in mods if m.get("encoder_id")}
        settings = {key: config[key] for key in SETTINGS if key in config}
        model = pretrain_store(self.store, [m["name"] for m in mods], encoders or None, exclude=test, **settings)
        with tempfile.TemporaryDirectory(prefix=f"mmcli-pretrain-fold{k}-") as tmp:
            model.save(tmp)
            test_set = set(map(str, test))
            yield params.model_copy(update={"init": tmp}), {
                "in_fold": True, "settings_from": self.init, "n_patients": len(model.patients_),
                "overlap_with_test": sum(p in test_set for p in model.patients_), "patients": model.patients_}


def overlap_audit(init: str, tests: Sequence[Sequence[str]], in_fold: Sequence[dict[str, Any] | None] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per fold: the pretraining's patients and their overlap with the fold's test patients, for cv_audit.json;
    the note for metrics.json). ``in_fold``: the per-fold records of :class:`FoldPretraining` (else every fold
    starts from ``init``, whose ``pretrain.json`` lists the patients it saw; older folders do not, and the
    overlap is then unknown)."""
    if in_fold is not None and all(r is not None for r in in_fold):
        folds = [dict(r) for r in in_fold]  # type: ignore[arg-type]
    else:
        seen = read_config(init).get("patients")
        folds = []
        for test in tests:
            entry: dict[str, Any] = {"in_fold": False, "init": init}
            if seen is None:
                entry.update(n_patients=None, overlap_with_test=None)
            else:
                test_set = set(map(str, test))
                entry.update(n_patients=len(seen), overlap_with_test=sum(p in test_set for p in seen),
                             test_patients_seen=[p for p in seen if p in test_set])
            folds.append(entry)
    overlap = [f["overlap_with_test"] for f in folds]
    note = {"init": init, "in_fold": bool(folds and folds[0]["in_fold"]), "overlap_with_test_per_fold": overlap,
            "n_test_per_fold": [len(t) for t in tests]}
    if note["in_fold"]:
        note["note"] = ("each fold's encoders were pretrained (settings of init) on the store's patients minus "
                        "that fold's test patients; the final model starts from init, pretrained on the whole store")
    elif any(o is None for o in overlap):
        note["note"] = (f"{init}/{CONFIG} does not list its patients (pretrained before mmcli recorded them): the "
                        "overlap of pretraining and test patients is unknown. Rerun `mmcli pretrain`, or use "
                        "--init-in-fold.")
    elif any(overlap):
        note["note"] = (f"the encoders saw the features (never the labels) of {sum(overlap)} of the "
                        f"{sum(note['n_test_per_fold'])} out-of-fold test patients: pretraining is transductive "
                        "here, and the cross-validated metrics can be optimistic about what it gains on new "
                        "patients. --init-in-fold pretrains inside each fold instead.")
    else:
        note["note"] = "the pretraining saw none of the out-of-fold test patients"
    return folds, note
