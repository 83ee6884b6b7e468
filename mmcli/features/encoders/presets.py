"""Pathology foundation-model presets: ``--encoder uni`` (UNI), ``uni2-h``, ``virchow2``, ``h-optimus-0``,
``h-optimus-1``, ``prov-gigapath``, ``phikon-v2``, ``conch-v1.5``.

Each preset holds what its authors publish (and TRIDENT's loaders use): the timm architecture and its arguments,
the normalisation, the magnification and tile size it was trained at, how its output is pooled, the output
dimension, and the Hugging Face repo and file name of its checkpoint. Weights come from ``--weights`` (the file,
or a folder holding the published file name) or from the local Hugging Face cache; they are **never downloaded**
(these models are gated: fetch them once where the hub is reachable and copy the cache). A checkpoint must fit
the architecture exactly (strict keys and shapes), checked when the encoder is created without loading a
tensor; a wrong file is an :class:`~mmcli.pipeline.errors.InputError` (exit 2). A preset sets the tiling
defaults (``--mpp``, ``--patch-size``) unless they are given (:func:`tiling_defaults`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.features.encoders.image import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder, WeightsSource
from mmcli.features.encoders.registry import register_encoder
from mmcli.features.encoders.runtime import hf_cache_dir, load_state_dict, resolve_device, resolve_precision
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import file_sha256

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}  # named here, resolved to timm/torch classes


@dataclass(frozen=True)
class Preset:
    """What a foundation model's authors publish, enough to rebuild and run it offline."""

    name: str
    title: str
    repo: str  # Hugging Face repo of the weights
    weights_file: str  # the published checkpoint file name
    arch: str  # timm architecture (or "dinov2-hf" for a transformers Dinov2Model)
    args: dict[str, Any]  # published architecture arguments (JSON-able; layer classes by name)
    dim: int
    pool: str = "token"  # token | cls+mean | attn-contrast
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float = 0.5  # native resolution (20x)
    patch_size: int = 224  # tile side in px at ``mpp`` = the model's input size
    extra_keys: tuple[str, ...] = ()  # published keys this tile encoder does not use (e.g. a text projection)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("uni", "UNI (MahmoodLab, ViT-L/16)", "MahmoodLab/UNI", "pytorch_model.bin", "vit_large_patch16_224",
           {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}, 1024),
    Preset("uni2-h", "UNI2-h (MahmoodLab, ViT-H/14, 8 registers, SwiGLU)", "MahmoodLab/UNI2-h", "pytorch_model.bin",
           "vit_giant_patch14_224",
           {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
            **SWIGLU}, 1536),
    Preset("virchow2", "Virchow2 (Paige, ViT-H/14, 4 registers; CLS + mean patch tokens)", "paige-ai/Virchow2",
           "pytorch_model.bin", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
            "dynamic_img_size": True, **SWIGLU}, 2560, pool="cls+mean"),
    Preset("h-optimus-0", "H-optimus-0 (Bioptimus, ViT-g/14, 4 registers)", "bioptimus/H-optimus-0",
           "pytorch_model.bin", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": False}, 1536,
           mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    Preset("h-optimus-1", "H-optimus-1 (Bioptimus, ViT-g/14, 4 registers)", "bioptimus/H-optimus-1",
           "pytorch_model.bin", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": False}, 1536,
           mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    Preset("prov-gigapath", "Prov-GigaPath tile encoder (ViT-g/14 layout, 16 px patches)",
           "prov-gigapath/prov-gigapath", "pytorch_model.bin", "vit_giant_patch14_dinov2",
           {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
            "mlp_ratio": 5.33334}, 1536),
    Preset("phikon-v2", "Phikon-v2 (Owkin, DINOv2 ViT-L/16, transformers layout)", "owkin/phikon-v2",
           "model.safetensors", "dinov2-hf",
           {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
            "image_size": 224, "layerscale_value": 1e-5, "mlp_ratio": 4}, 1024),
    Preset("conch-v1.5", "CONCH v1.5 vision tower (MahmoodLab, ViT-L/16 at 448 px + attentional pooler)",
           "MahmoodLab/conchv1_5", "pytorch_model_vision.bin", "vit_large_patch16_224",
           {"img_size": 448, "patch_size": 16, "init_values": 1.0, "dynamic_img_size": True}, 768,
           pool="attn-contrast", patch_size=448, extra_keys=("proj_contrast",)),
)}
# CONCH v1.5's attentional pooler: open_clip CoCa's AttentionalPooler (one query, 8 heads) over the 1024-d tokens
CONCH_POOLER = {"d_model": 768, "context_dim": 1024, "n_head": 8}


def tiling_defaults(encoder: str | None) -> dict[str, Any]:
    """``{"mpp": ..., "patch_size": ...}`` of a preset (the extract stage fills options not given); else {}."""
    p = PRESETS.get(encoder or "")
    return {"mpp": p.mpp, "patch_size": p.patch_size} if p else {}


# ---- building ----------------------------------------------------------------------------------------------
def _resolved_args(args: dict[str, Any]) -> dict[str, Any]:
    import timm
    import torch

    out = dict(args)
    if out.get("mlp_layer") == "SwiGLUPacked":
        out["mlp_layer"] = timm.layers.SwiGLUPacked
    if out.get("act_layer") == "SiLU":
        out["act_layer"] = torch.nn.SiLU
    return out


def _attentional_pooler() -> Any:
    import torch
    from torch import nn

    class AttentionalPooler(nn.Module):
        """open_clip's AttentionalPooler: learned queries attend over the tokens (keys ``query``, ``attn.*``,
        ``ln_q``, ``ln_k``)."""

        def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
            self.ln_q = nn.LayerNorm(d_model)
            self.ln_k = nn.LayerNorm(context_dim)

        def forward(self, x: Any) -> Any:
            x = self.ln_k(x)
            q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
            return self.attn(q, x, x, need_weights=False)[0]

    return AttentionalPooler(**CONCH_POOLER)


def build_network(p: Preset, overrides: dict[str, Any] | None = None) -> Any:
    """The preset's network (random weights) as one ``nn.Module`` whose ``state_dict`` has the published key
    layout and whose output is the preset's (B, dim) embedding. ``overrides`` replace architecture arguments
    (the tests use a reduced ``depth``/``num_hidden_layers``: same key names, fewer blocks)."""
    import timm
    import torch
    from torch import nn

    args = {**p.args, **(overrides or {})}
    if p.arch == "dinov2-hf":
        from transformers import Dinov2Config, Dinov2Model

        class HFDinov2Cls(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = Dinov2Model(Dinov2Config(**args))

            def forward(self, x: Any) -> Any:
                return self.model(pixel_values=x).last_hidden_state[:, 0]

            def state_dict(self, *a: Any, **k: Any) -> Any:  # the published file has no "model." prefix
                return self.model.state_dict(*a, **k)

            def load_state_dict(self, sd: Any, strict: bool = True, **k: Any) -> Any:
                return self.model.load_state_dict(sd, strict=strict, **k)

        return HFDinov2Cls()
    trunk = timm.create_model(p.arch, pretrained=False, num_classes=0, **_resolved_args(args))
    if p.pool == "token":
        return trunk
    if p.pool == "cls+mean":  # Virchow: CLS token + mean of the patch tokens (registers left out)
        class ClsMean(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.trunk = trunk

            def forward(self, x: Any) -> Any:
                out = self.trunk(x)
                prefix = self.trunk.num_prefix_tokens
                return torch.cat([out[:, 0], out[:, prefix:].mean(1)], dim=-1)

            def state_dict(self, *a: Any, **k: Any) -> Any:
                return self.trunk.state_dict(*a, **k)

            def load_state_dict(self, sd: Any, strict: bool = True, **k: Any) -> Any:
                return self.trunk.load_state_dict(sd, strict=strict, **k)

        return ClsMean()

    class AttnContrast(nn.Module):  # CONCH v1.5: trunk tokens -> attentional pooler -> LayerNorm
        def __init__(self) -> None:
            super().__init__()
            self.trunk = trunk
            self.attn_pool_contrast = _attentional_pooler()
            self.ln_contrast = nn.LayerNorm(CONCH_POOLER["d_model"])

        def forward(self, x: Any) -> Any:
            tokens = self.trunk.forward_features(x)
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    return AttnContrast()


def expected_keys(p: Preset, overrides: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Published key -> shape of the preset's checkpoint, from the network built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        net = build_network(p, overrides)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def checkpoint_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint without reading its tensors (safetensors header, or torch mmap)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - not a zip checkpoint (mmap needs one) or not a torch file
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise InputError(f"--weights {path}: not a checkpoint readable with torch.load(weights_only=True) "
                             f"({e}). Fix: pass the published file.") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputError(f"--weights {path}: expected a dict of tensors, got {type(sd).__name__}")
    return {str(k).removeprefix("module."): tuple(getattr(v, "shape", ())) for k, v in sd.items()}


def _published_to_network(p: Preset, keys: dict[str, Any]) -> dict[str, Any]:
    """Published checkpoint keys -> the network's keys (CONCH v1.5 keeps its trunk under ``trunk.``; unused
    published parts such as the text projection are dropped)."""
    out = {}
    for k, v in keys.items():
        if any(k == e or k.startswith(e + ".") for e in p.extra_keys):
            continue
        out[k] = v
    return out


def check_checkpoint(p: Preset, path: str | Path, overrides: dict[str, Any] | None = None) -> None:
    """Strict check of a checkpoint against the preset's published key layout and shapes; InputError if not."""
    have = _published_to_network(p, checkpoint_keys(path))
    want = expected_keys(p, overrides)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if tuple(want[k]) != tuple(have[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
        if wrong:
            parts.append(f"{len(wrong)} key(s) of another shape, e.g. {wrong[0]} {have[wrong[0]]} != "
                         f"{want[wrong[0]]}")
        raise InputError(f"--weights {path} is not a {p.title} checkpoint: {'; '.join(parts)}. Fix: pass "
                         f"{p.weights_file} of {p.repo}.")


def local_weights(p: Preset, weights: str | Path | None = None) -> Path | None:
    """The preset's checkpoint: ``weights`` (a file, or a folder holding the published file name), else the
    local Hugging Face cache. Never downloads."""
    if weights:
        w = Path(weights).expanduser()
        if w.is_dir():
            hits = [w / p.weights_file, *sorted(w.rglob(p.weights_file))]
            return next((h for h in hits if h.is_file()), None)
        return w if w.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(p.repo, p.weights_file, cache_dir=hf_cache_dir())
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


# ---- the encoder -------------------------------------------------------------------------------------------
@dataclass
class PresetEncoder(ImageEncoder):
    """A foundation-model preset: builds the published architecture, loads the checkpoint strictly."""

    preset: str = ""
    arch_overrides: dict[str, Any] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "preset": self.preset, "pool": PRESETS[self.preset].pool,
                **({"arch_overrides": self.arch_overrides} if self.arch_overrides else {})}

    def provenance(self) -> dict[str, Any]:
        p = PRESETS[self.preset]
        return {**super().provenance(), "preset": p.name, "title": p.title, "pool": p.pool, "dim": p.dim,
                "native_mpp": p.mpp, "native_patch_size": p.patch_size, "hf_repo": p.repo}

    @property
    def dim(self) -> int:  # type: ignore[override]
        return PRESETS[self.preset].dim

    def _build(self) -> Any:
        import torch

        p = PRESETS[self.preset]
        sd = _published_to_network(p, load_state_dict(self.weights.path or ""))
        with torch.device("meta"):  # no random init of a billion parameters that the checkpoint replaces
            model = build_network(p, self.arch_overrides)
        model.load_state_dict(sd, strict=True, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a buffer no checkpoint holds
            model = build_network(p, self.arch_overrides)
            model.load_state_dict(sd, strict=True)
        model = model.float().eval().requires_grad_(False)
        self._device = resolve_device(self.device)
        self._precision = resolve_precision(self.precision, self._device)
        self._channels_last = False
        model = model.to(self._device)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        return model


def create_preset(name: str, weights: str | Path | None = None, seed: int = 0, device: str = "auto",
                  precision: str = "auto", arch_overrides: dict[str, Any] | None = None, runtime: str = "torch",
                  threads: int | None = None) -> PresetEncoder:
    """The encoder of preset ``name``; its checkpoint is found locally and checked (strict keys) now."""
    p = PRESETS[name]
    path = local_weights(p, weights)
    if path is None:
        where = f"--weights {weights}" if weights else f"the Hugging Face cache {hf_cache_dir()} ({p.repo})"
        raise InputError(f"--encoder {name}: no {p.weights_file} in {where}; presets are never downloaded. Fix: "
                         f"pass --weights PATH/{p.weights_file}, or fetch {p.repo} where the hub is reachable "
                         "(huggingface-cli download, access granted) and copy the cache here.")
    check_checkpoint(p, path, arch_overrides)
    ws = WeightsSource("file" if weights else "hf-cache", str(path.resolve()), file_sha256(path),
                       None if weights else p.repo)
    return PresetEncoder(name, p.arch, ws, p.mean, p.std, model_args=json.loads(json.dumps(p.args)), seed=seed,
                         device=device, precision=precision, preset=name, arch_overrides=dict(arch_overrides or {}),
                         runtime_name=runtime, threads=threads)


def _register(name: str) -> None:
    def factory(weights: str | Path | None = None, seed: int = 0, device: str = "auto",
                precision: str = "auto", runtime: str = "torch", threads: int | None = None) -> PresetEncoder:
        return create_preset(name, weights, seed, device, precision, runtime=runtime, threads=threads)

    factory.__doc__ = f"{PRESETS[name].title}: {PRESETS[name].dim}-d, {PRESETS[name].patch_size} px at " \
                      f"{PRESETS[name].mpp} µm/px; weights {PRESETS[name].weights_file} of {PRESETS[name].repo}."
    register_encoder(name, "wsi")(factory)


for _name in PRESETS:
    _register(_name)
