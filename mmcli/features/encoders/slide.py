"""Slide encoders: one embedding per slide from its cached tile features, by published attention-MIL models.

- ``chief``: CHIEF's slide encoder (hms-dbmi/CHIEF ``models/CHIEF.py``, size ``small``, gated attention): the
  ``WSI_feature`` TRIDENT and STAMP take from it, the attention-weighted mean of the 768-d CHIEF-CTransPath tile
  features (the organ prompt enters only CHIEF's classifier, not this embedding). Checkpoint
  ``CHIEF_pretraining.pth`` (with or without its ``organ_embedding`` buffer, which STAMP drops before loading).
- ``madeleine``: MADELEINE's H&E slide encoder (mahmoodlab/MADELEINE ``models/Model.py``, ``encode_he``):
  multi-head gated ABMIL over 512-d CONCH v1 tile features, projected to 512-d. Checkpoint ``model.pt`` with its
  ``model_config.json`` beside it (the architecture is read from it, as MADELEINE's ``create_model`` does).

Both are hand-written here (no library ships them) as their authors' code computes them; the tests compare with
ports of that code. A checkpoint is checked against the published key layout before loading (strict keys and
shapes): a wrong file is an :class:`~mmcli.pipeline.errors.InputError` (exit 2) naming the keys. Weights come only
from ``--weights`` (neither is on the Hugging Face hub in a form timm or transformers loads).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.encoders.registry import Encoder, register_encoder
from mmcli.features.encoders.runtime import autocast, load_state_dict, resolve_device, resolve_precision
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import file_sha256, make_encoder_id


@dataclass(frozen=True)
class SlideModel:
    """A published slide encoder: what it reads, what it writes, where its weights are and under which terms."""

    name: str
    title: str
    tile_encoders: tuple[str, ...]  # mmcli names of the tile encoders whose features it was trained on
    tile_dim: int
    dim: int
    weights_file: str
    precision: str  # its authors' (TRIDENT's / STAMP's) inference precision
    licence: str
    terms: str
    gated: bool | None
    config_file: str | None = None
    optional_keys: tuple[str, ...] = ()  # published keys a file may lack (STAMP drops CHIEF's organ_embedding)


SLIDE_MODELS: dict[str, SlideModel] = {m.name: m for m in (
    SlideModel("chief", "CHIEF slide encoder (gated attention over CHIEF-CTransPath tiles)", ("chief-ctranspath",),
               768, 768, "CHIEF_pretraining.pth", "fp32", "GPL-3.0",
               "CHIEF: GPLv3, for non-commercial academic purposes; weights on request", True,
               optional_keys=("organ_embedding",)),
    SlideModel("madeleine", "MADELEINE H&E slide encoder (multi-head gated ABMIL over CONCH v1 tiles)",
               ("conch-v1",), 512, 512, "model.pt", "bf16", "CC-BY-NC-ND-4.0",
               "non-commercial academic research only, no derivatives distributed (MahmoodLab/madeleine)", True,
               config_file="model_config.json"),
)}


# ---- networks ---------------------------------------------------------------------------------------------
def _gated(nn: Any, dim_in: int, dim_hidden: int) -> Any:
    """CLAM / CHIEF / MADELEINE gated attention: ``attention_a`` (tanh), ``attention_b`` (sigmoid), ``attention_c``
    (dropout layers kept so that the key indices are the published ones; inactive in eval)."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_a = nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.Tanh(), nn.Dropout(0.25))
            self.attention_b = nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.Sigmoid(), nn.Dropout(0.25))
            self.attention_c = nn.Linear(dim_hidden, 1)

        def forward(self, x: Any) -> Any:
            return self.attention_c(self.attention_a(x).mul(self.attention_b(x)))

    return Gated()


def build_network(name: str, config: dict[str, Any]) -> Any:
    """The slide encoder ``name``: ``(N, tile_dim)`` tile features -> ``(1, dim)``; its ``state_dict`` has the
    published key layout."""
    import torch
    from torch import nn

    if name == "chief":
        class Chief(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attention_net = nn.Sequential(nn.Linear(768, 512), nn.ReLU(), nn.Dropout(0.25),
                                                   _gated(nn, 512, 256))
                self.classifiers = nn.Linear(512, 2)
                self.instance_classifiers = nn.ModuleList([nn.Linear(512, 2) for _ in range(2)])
                self.att_head = nn.Module()
                self.att_head.fc1, self.att_head.fc2 = nn.Linear(512, 256), nn.Linear(256, 1)
                self.text_to_vision = nn.Sequential(nn.Linear(768, 512), nn.ReLU(), nn.Dropout(0.25))
                self.register_buffer("organ_embedding", torch.zeros(19, 768))

            def forward(self, h: torch.Tensor) -> torch.Tensor:  # CHIEF.forward: WSI_feature = softmax(A) @ h
                a = torch.softmax(self.attention_net(h).transpose(1, 0), dim=1)
                return a @ h

        return Chief()

    heads, hidden, dim_in = int(config["n_heads"]), int(config["wsi_encoder_hidden_dim"]), \
        int(config["patch_embedding_dim"])
    activation = config.get("activation", "softmax")

    class Madeleine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wsi_embedders = nn.Module()
            self.wsi_embedders.pre_attn = nn.Sequential(
                nn.Linear(dim_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.1),
                nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.1),
                nn.Linear(hidden, hidden * heads), nn.LayerNorm(hidden * heads), nn.GELU(), nn.Dropout(0.1))
            self.wsi_embedders.attn = nn.ModuleList([_gated(nn, hidden, 512) for _ in range(heads)])
            self.token_projector = nn.Linear(512 * heads, 128)
            self.projector = nn.Linear(512 * heads, 512)

        def forward(self, h: torch.Tensor) -> torch.Tensor:  # MADELEINE.encode_he for one slide
            emb = self.wsi_embedders.pre_attn(h[None])
            emb = emb.reshape(*emb.shape[:2], hidden, heads)  # einops 'b t (e c) -> b t e c'
            att = []
            for i, net in enumerate(self.wsi_embedders.attn):
                a = net(emb[:, :, :, i])
                att.append(torch.softmax(a, dim=1) if activation == "softmax" else _activate(a, activation))
            slide = torch.sum(emb * torch.stack(att, dim=-1), dim=1)
            return self.projector(slide.reshape(1, -1))

    return Madeleine()


def _activate(a: Any, activation: str) -> Any:
    import torch

    fns = {"leaky_relu": torch.nn.functional.leaky_relu, "relu": torch.relu, "sigmoid": torch.sigmoid}
    if activation not in fns:
        raise InputError(f"MADELEINE activation {activation!r} is not one of softmax, {', '.join(fns)}")
    return fns[activation](a)


def read_config(m: SlideModel, weights: Path) -> dict[str, Any]:
    """The published architecture config beside the checkpoint (MADELEINE's ``model_config.json``)."""
    if not m.config_file:
        return {}
    path = weights.parent / m.config_file
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--encoder {m.name}: its architecture is read from {m.config_file} beside the weights, and "
                         f"{path} cannot be read ({e}). Fix: keep the published {m.config_file} next to "
                         f"{weights.name}.") from e
    need = ("patch_embedding_dim", "wsi_encoder_hidden_dim", "n_heads")
    lacking = [k for k in need if not isinstance(cfg.get(k), int)]
    if lacking or cfg.get("wsi_encoder", "abmil") != "abmil" or cfg.get("wsi_encoder_hidden_dim") != 512:
        raise InputError(f"{path}: not a MADELEINE config (needs integer {lacking or need}, wsi_encoder 'abmil' and "
                         "wsi_encoder_hidden_dim 512). Fix: use the model_config.json of MahmoodLab/madeleine.")
    keep = (*need, "activation", "wsi_encoder", "precision")
    return {k: cfg[k] for k in keep if k in cfg}


def check_checkpoint(m: SlideModel, path: Path, config: dict[str, Any]) -> None:
    """Strict check of ``path`` against the published key layout and shapes (optional keys aside)."""
    import torch

    try:
        have = {k: tuple(v.shape) for k, v in load_state_dict(path).items()}
    except ValueError as e:
        raise InputError(f"--weights {path}: {e}") from e
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_network(m.name, config).state_dict().items()}
    missing = sorted(set(want) - set(have) - set(m.optional_keys))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing key(s) {missing[:3]}" if missing else "",
                 f"{len(unexpected)} unexpected key(s) {unexpected[:3]}" if unexpected else "",
                 f"{len(wrong)} key(s) of another shape, e.g. {wrong[0]} {have[wrong[0]]} != {want[wrong[0]]}"
                 if wrong else ""]
        raise InputError(f"--weights {path} is not a {m.title} checkpoint: {'; '.join(p for p in parts if p)}. "
                         f"Fix: pass {m.weights_file} as its authors publish it.")


# ---- the encoder -------------------------------------------------------------------------------------------
@dataclass
class SlideEncoder(Encoder):
    """A frozen slide encoder over one slide's tile features (``encode``: (N, tile_dim) -> (1, dim))."""

    name: str
    weights: str
    weights_sha256: str
    config: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    modality: str = "slide"
    _module: Any = field(default=None, init=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def model(self) -> SlideModel:
        return SLIDE_MODELS[self.name]

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self.model.dim

    def _settle(self) -> tuple[str, str]:
        dev = resolve_device(self.device)
        preferred = "bf16" if self.config.get("precision") == "bfloat16" else self.model.precision
        return dev, resolve_precision(self.precision, dev, preferred)

    def params(self) -> dict[str, Any]:
        """What changes the embedding: the architecture config and the precision it computes in."""
        return {"config": self.config, "precision": self._settle()[1]}

    @property
    def encoder_id(self) -> str:
        return make_encoder_id(self.name, self.weights_sha256, self.params())

    def provenance(self) -> dict[str, Any]:
        m = self.model
        return {"encoder": self.name, "title": m.title, "dim": m.dim, "tile_dim": m.tile_dim,
                "tile_encoders": list(m.tile_encoders), "pretrained": True, "weights": f"file {self.weights}",
                "weights_source": "file", "weights_sha256": self.weights_sha256, "config": self.config,
                "licence": m.licence, "licence_terms": m.terms, "gated": m.gated}

    def runtime(self) -> dict[str, Any]:
        import torch

        dev, prec = self._settle()
        return {"device": dev, "precision": prec, "runtime": "torch", "runtime_version": str(torch.__version__)}

    @property
    def module(self) -> Any:
        with self._lock:
            if self._module is None:
                self._module = self._build()
            return self._module

    def _build(self) -> Any:
        net = build_network(self.name, self.config)
        missing, unexpected = net.load_state_dict(load_state_dict(self.weights), strict=False)
        if unexpected or set(missing) - set(self.model.optional_keys):  # checked at creation; the file changed since
            raise ValueError(f"weights {self.weights} no longer fit {self.name}: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
        return net.float().eval().requires_grad_(False).to(self._settle()[0])

    def encode(self, batch: Any) -> np.ndarray:
        """(1, dim) float32 embedding of one slide's (N, tile_dim) tile features (N >= 1)."""
        import torch

        x = torch.as_tensor(np.asarray(batch, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.model.tile_dim or x.shape[0] == 0:
            raise ValueError(f"{self.name} takes (N, {self.model.tile_dim}) tile features with N >= 1, got "
                             f"{tuple(x.shape)}")
        dev, prec = self._settle()
        with torch.inference_mode(), autocast(dev, prec):
            y = self.module(x.to(dev))
        return y.float().cpu().numpy()


def create_slide_encoder(name: str, weights: str | Path | None = None, device: str = "auto",
                         precision: str = "auto", **_: Any) -> SlideEncoder:
    """Slide encoder ``name`` with its checkpoint ``weights`` (required), checked strictly now."""
    m = SLIDE_MODELS[name]
    if not weights:
        raise InputError(f"--encoder {name} needs --weights: its published {m.weights_file}"
                         + (f" (with {m.config_file} beside it)" if m.config_file else "") + ".")
    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / m.weights_file
    if not path.is_file():
        raise InputError(f"--weights {weights}: no such file. Fix: pass {m.weights_file} of {m.title}.")
    config = read_config(m, path)
    check_checkpoint(m, path, config)
    return SlideEncoder(name, str(path.resolve()), file_sha256(path), config, device, precision)


@register_encoder("chief", "slide")
def chief(**kw: Any) -> SlideEncoder:
    """CHIEF slide encoder: 768-d from CHIEF-CTransPath tile features; GPL-3.0, non-commercial, weights on request."""
    return create_slide_encoder("chief", **kw)


@register_encoder("madeleine", "slide")
def madeleine(**kw: Any) -> SlideEncoder:
    """MADELEINE slide encoder: 512-d from CONCH v1 tile features; CC-BY-NC-ND-4.0."""
    return create_slide_encoder("madeleine", **kw)
