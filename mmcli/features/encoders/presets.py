"""Pathology foundation-model presets: ``--encoder uni``, ``uni2-h``, ``virchow``, ``virchow2``, ``h-optimus-0``,
``h-optimus-1``, ``prov-gigapath``, ``phikon-v2``, ``conch-v1``, ``conch-v1.5``, ``ctranspath``,
``chief-ctranspath``.

Each preset holds what its authors publish (and TRIDENT's loaders use): the architecture and its arguments, the
normalisation, the input size and resolution it was trained at, how its output is pooled, the output dimension,
the repo and file names of its checkpoint, the precision TRIDENT runs it in on a GPU (``--precision auto``), and
its licence and access terms (recorded in every item's provenance; shown by ``mmcli doctor``).

Weights come from ``--weights`` (the file, or a folder holding a published file name) or from the local Hugging
Face cache (repo ids matched case-insensitively; ``model.safetensors`` then ``pytorch_model.bin``, the order timm
downloads them in); they are **never downloaded** (most of these models are gated: fetch them once where the
hub is reachable and copy the cache). A checkpoint must fit the published layout exactly (strict keys and
shapes), checked when the encoder is created without loading a tensor; a wrong file is an
:class:`~mmcli.pipeline.errors.InputError` (exit 2) naming the keys.

Geometry (:func:`tiling_defaults`): ``native`` (the default) tiles at the model's input size at its training
resolution (0.5 µm/px), so every pixel the network sees is a scanned pixel at the scale it learned, with no
resampling after the read, and existing stores keep their ids. ``trident`` is TRIDENT's job grid: 256-px tiles
at 20x (512 px for CONCH v1.5, the grid TITAN needs) resized to the input size inside the network, as TRIDENT's
transforms do; use it when the features feed TRIDENT's slide encoders or must match a TRIDENT run. A tile whose
size differs from the input size is always resized (shorter side to the preset's resize size, centre crop), so
the network never runs at a size it was not trained at.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.features.encoders import preset_nets
from mmcli.features.encoders.image import IMAGENET_MEAN, IMAGENET_STD, FoldedImageModel, ImageEncoder, WeightsSource
from mmcli.features.encoders.registry import register_encoder
from mmcli.features.encoders.runtime import hf_cache_dir, hf_cached_file, load_state_dict
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import file_sha256

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's, which CONCH v1 uses
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SWIGLU = preset_nets.SWIGLU
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's download order
GEOMETRIES = ("native", "trident")
# MahmoodLab's model cards: commercial use of the model "and its derivatives, which include models trained on outputs
# from the model or datasets created from it" needs the authors' approval
CC_BY_NC_ND = ("CC-BY-NC-ND-4.0", "non-commercial academic research only, no derivatives distributed; the authors' "
               "terms count models trained on its outputs as derivatives")
CC_BY_NC_ND_PAIGE = "non-commercial research only, no derivatives distributed (see the model card's terms)"


@dataclass(frozen=True)
class Preset:
    """What a foundation model's authors publish, enough to rebuild and run it offline."""

    name: str
    title: str
    repo: str  # Hugging Face repo of the weights (or where they are published)
    weights_files: tuple[str, ...]  # published checkpoint file names, in the order they are looked for
    kind: str  # network: token | cls+mean | conch-v1.5 | conch-v1 | swin-avg | dinov2-cls (preset_nets)
    arch: str  # timm architecture
    args: dict[str, Any]  # published architecture arguments (JSON-able; layer classes by name)
    dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float = 0.5  # training resolution (20x)
    input_size: int = 224  # the network's input side in px
    precision: str = "fp16"  # TRIDENT's dtype on a GPU: what --precision auto means there
    licence: str = ""
    terms: str = ""
    gated: bool | None = None  # access approval needed on the hub (None: not recorded)
    trident_tile: int = 256  # TRIDENT's tile side in px at 20x for this model
    resize: str = "bilinear"  # interpolation of TRIDENT's resize of a tile of another size
    resize_to: int | None = None  # shorter side before the centre crop (GigaPath: 256); default input_size
    extra_keys: tuple[str, ...] = ()  # published key prefixes this tile encoder does not use
    repo_type: str = "model"
    config_file: str | None = None  # a published config the architecture is read from (Phikon-v2)
    on_hub: bool = True  # the weights are on the Hugging Face hub (else only --weights finds them)

    def licence_attrs(self) -> dict[str, Any]:
        """Licence, terms and gating: what provenance, doctor and a model card show."""
        return {"licence": self.licence, "licence_terms": self.terms, "gated": self.gated, "source_repo": self.repo}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("uni", "UNI (MahmoodLab, ViT-L/16)", "MahmoodLab/UNI", TIMM_FILES, "token", "vit_large_patch16_224",
           {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}, 1024,
           licence=CC_BY_NC_ND[0], terms=CC_BY_NC_ND[1], gated=True),
    Preset("uni2-h", "UNI2-h (MahmoodLab, ViT-H/14, 8 registers, SwiGLU)", "MahmoodLab/UNI2-h", TIMM_FILES, "token",
           "vit_giant_patch14_224",
           {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
            **SWIGLU}, 1536, precision="bf16", licence=CC_BY_NC_ND[0], terms=CC_BY_NC_ND[1], gated=True),
    Preset("virchow", "Virchow (Paige, ViT-H/14; CLS + mean patch tokens)", "paige-ai/Virchow", TIMM_FILES,
           "cls+mean", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            **SWIGLU}, 2560, resize="bicubic", licence="Apache-2.0",
           terms="access on the hub after sharing contact details", gated=True),
    Preset("virchow2", "Virchow2 (Paige, ViT-H/14, 4 registers; CLS + mean patch tokens)", "paige-ai/Virchow2",
           TIMM_FILES, "cls+mean", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
            "dynamic_img_size": True, **SWIGLU}, 2560, resize="bicubic", licence=CC_BY_NC_ND[0],
           terms=CC_BY_NC_ND_PAIGE, gated=True),
    Preset("h-optimus-0", "H-optimus-0 (Bioptimus, ViT-g/14, 4 registers)", "bioptimus/H-optimus-0", TIMM_FILES,
           "token", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True}, 1536,
           mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, licence="Apache-2.0", terms="commercial use allowed"),
    Preset("h-optimus-1", "H-optimus-1 (Bioptimus, ViT-g/14, 4 registers)", "bioptimus/H-optimus-1", TIMM_FILES,
           "token", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True}, 1536,
           mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, licence="other",
           terms="Bioptimus H-optimus-1 licence: access by approval, non-commercial research (see the model card)",
           gated=True),
    Preset("prov-gigapath", "Prov-GigaPath tile encoder (ViT-g/14 layout, 16 px patches)",
           "prov-gigapath/prov-gigapath", TIMM_FILES, "token", "vit_giant_patch14_dinov2",
           {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
            "mlp_ratio": 5.33334, "dynamic_img_size": True}, 1536, resize="bicubic", resize_to=256,
           licence="Apache-2.0", terms="access on the hub after accepting the authors' conditions", gated=True),
    Preset("phikon-v2", "Phikon-v2 (Owkin, DINOv2 ViT-L/16, transformers layout)", "owkin/phikon-v2",
           ("model.safetensors",), "dinov2-cls", "dinov2", {}, 1024, precision="fp32", licence="other",
           terms="Owkin non-commercial licence (LICENSE.pdf of the repo)", gated=False, config_file="config.json"),
    Preset("conch-v1", "CONCH v1 vision tower (MahmoodLab, ViT-B/16 at 448 px + attentional pooler, 512-d "
           "encode_image(proj_contrast=False, normalize=False))", "MahmoodLab/CONCH", ("pytorch_model.bin",),
           "conch-v1", "vit_base_patch16_224", {"img_size": 448, "patch_size": 16, "dynamic_img_size": True}, 512,
           mean=OPENAI_MEAN, std=OPENAI_STD, input_size=448, precision="fp32", resize="bicubic",
           extra_keys=("visual.proj_contrast", "visual.attn_pool_caption", "visual.ln_caption", "text",
                       "text_decoder", "logit_scale"), licence=CC_BY_NC_ND[0], terms=CC_BY_NC_ND[1], gated=True),
    Preset("conch-v1.5", "CONCH v1.5 vision tower (MahmoodLab, ViT-L/16 at 448 px + attentional pooler)",
           "MahmoodLab/conchv1_5", ("pytorch_model_vision.bin",), "conch-v1.5", "vit_large_patch16_224",
           {"img_size": 448, "patch_size": 16, "init_values": 1.0}, 768, input_size=448, trident_tile=512,
           licence=CC_BY_NC_ND[0], terms=CC_BY_NC_ND[1], gated=True),
    Preset("ctranspath", "CTransPath (Wang et al., Swin-T with a convolutional stem)", "Xiyue-Wang/TransPath",
           ("ctranspath.pth",), "swin-avg", "swin_tiny_patch4_window7_224", {"img_size": 224}, 768,
           precision="fp32", licence="GPL-3.0", terms="weights from the TransPath repository's Google Drive link",
           gated=False, on_hub=False),
    Preset("chief-ctranspath", "CHIEF-CTransPath (CHIEF's tile encoder, CTransPath layout)", "MahmoodLab/hest-bench",
           ("fm_v1/ctranspath/CHIEF_CTransPath.pth", "CHIEF_CTransPath.pth"), "swin-avg",
           "swin_tiny_patch4_window7_224", {"img_size": 224}, 768, precision="fp32", licence="GPL-3.0",
           terms="CHIEF: GPLv3, for non-commercial academic purposes; weights on request", gated=True,
           repo_type="dataset"),
)}


def tiling_defaults(encoder: str | None, geometry: str = "native") -> dict[str, Any]:
    """``{"mpp": ..., "patch_size": ...}`` of a preset in ``geometry`` (``native`` | ``trident``; see the module
    docstring); {} for other encoders (the extract stage fills only options not given)."""
    p = PRESETS.get(encoder or "")
    if p is None:
        return {}
    if geometry == "trident":
        return {"mpp": 0.5, "patch_size": p.trident_tile}
    return {"mpp": p.mpp, "patch_size": p.input_size}


# ---- checkpoints -------------------------------------------------------------------------------------------
def build_network(p: Preset, args: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """The preset's network (random weights) for architecture ``args`` (default: the published ones) with
    ``overrides`` (the tests use a reduced ``depth`` / ``num_hidden_layers``: same key names, fewer blocks)."""
    return preset_nets.build_network(p.kind, p.arch, {**(p.args if args is None else args), **(overrides or {})})


def expected_keys(p: Preset, args: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) \
        -> dict[str, tuple[int, ...]]:
    """Network key -> shape, from the network built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        net = build_network(p, args, overrides)
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


def _grid(p: Preset) -> int | None:
    return p.input_size // 16 if p.kind == "conch-v1.5" else None


def check_checkpoint(p: Preset, path: str | Path, args: dict[str, Any] | None = None,
                     overrides: dict[str, Any] | None = None) -> None:
    """Strict check of a checkpoint against the preset's published key layout and shapes; InputError naming the
    missing, unexpected and mis-shaped keys if it does not fit."""
    have = preset_nets.to_network(p.kind, checkpoint_keys(path), p.extra_keys, _grid(p))
    want = expected_keys(p, args, overrides)
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
                         f"{p.weights_files[0]} of {p.repo}.")


def local_weights(p: Preset, weights: str | Path | None = None) -> tuple[Path, str | None] | None:
    """``(checkpoint, cached repo id or None)``: ``weights`` (a file, or a folder holding a published file name),
    else the local Hugging Face cache. Never downloads."""
    if weights:
        w = Path(weights).expanduser()
        if w.is_dir():
            names = [Path(f).name for f in p.weights_files]
            hits = [*(w / f for f in p.weights_files), *(h for n in names for h in sorted(w.rglob(n)))]
            hit = next((h for h in hits if h.is_file()), None)
            return (hit, None) if hit else None
        return (w, None) if w.is_file() else None
    if not p.on_hub:
        return None
    found = hf_cached_file(p.repo, p.weights_files, p.repo_type)
    return (Path(found[0]), found[1]) if found else None


def published_config(p: Preset, checkpoint: Path) -> dict[str, Any]:
    """The architecture of a preset built from its published ``config.json`` (beside the checkpoint)."""
    if not p.config_file:
        return dict(p.args)
    cfg_path = checkpoint.parent / p.config_file
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--encoder {p.name}: the architecture is read from {p.config_file} of {p.repo} beside "
                         f"the weights, and {cfg_path} cannot be read ({e}). Fix: keep the published "
                         f"{p.config_file} next to {checkpoint.name}.") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") != p.arch:
        raise InputError(f"{cfg_path}: model_type {cfg.get('model_type') if isinstance(cfg, dict) else None!r} is "
                         f"not {p.arch!r}. Fix: use the {p.config_file} of {p.repo}.")
    from transformers import Dinov2Config

    known = set(Dinov2Config().to_dict())
    skip = {"architectures", "transformers_version", "torch_dtype", "dtype", "id2label", "label2id", "model_type",
            "_name_or_path"}
    return {k: v for k, v in cfg.items() if k in known and k not in skip}


# ---- the encoder -------------------------------------------------------------------------------------------
@dataclass
class PresetEncoder(ImageEncoder):
    """A foundation-model preset: builds the published architecture, loads the checkpoint strictly, resizes
    tiles of another size to its input size."""

    preset: str = ""
    arch_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> Preset:
        return PRESETS[self.preset]

    def params(self) -> dict[str, Any]:
        p = self.spec
        return {**super().params(), "preset": self.preset, "kind": p.kind, "input_size": p.input_size,
                "resize": [p.resize, p.resize_to or p.input_size],
                **({"arch_overrides": self.arch_overrides} if self.arch_overrides else {})}

    def provenance(self) -> dict[str, Any]:
        p = self.spec
        return {**super().provenance(), "preset": p.name, "title": p.title, "kind": p.kind, "dim": p.dim,
                "native_mpp": p.mpp, "input_size": p.input_size, "hf_repo": p.repo, **p.licence_attrs()}

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self.spec.dim

    def _settle(self) -> None:
        super()._settle()
        self._channels_last = False  # transformers gain nothing from channels-last inputs

    def _build(self) -> Any:
        import torch

        p = self.spec
        self._settle()
        sd = preset_nets.to_network(p.kind, load_state_dict(self.weights.path or ""), p.extra_keys, _grid(p))
        with torch.device("meta"):  # no random init of a billion parameters that the checkpoint replaces
            model = build_network(p, self.model_args, self.arch_overrides)
        model.load_state_dict(sd, strict=True, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a buffer no checkpoint holds
            model = build_network(p, self.model_args, self.arch_overrides)
            model.load_state_dict(sd, strict=True)
        model = model.float().eval().requires_grad_(False)
        return model.to("cpu" if self._backend == "openvino" else self._device)

    def folded(self, channels_last: bool | None = None) -> Any:
        """uint8 NHWC tiles -> features, with TRIDENT's resize of a tile of another size in front."""
        p = self.spec
        net = ResizeToInput(self.module, p.input_size, p.resize_to or p.input_size, p.resize)
        return FoldedImageModel(net, self.mean, self.std, False).to(
            "cpu" if self._backend == "openvino" else self._device)


def ResizeToInput(net: Any, size: int, shorter: int, mode: str) -> Any:  # noqa: N802 - a module factory
    """``net`` behind TRIDENT's eval transform for a tile that is not ``size`` px: the shorter side resized to
    ``shorter`` (antialiased ``mode`` interpolation, as torchvision's ``Resize``) and a ``size`` centre crop."""
    import torch
    from torch import nn

    class _Resize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = int(x.shape[-2]), int(x.shape[-1])
            if (h, w) != (size, size):
                scale = shorter / min(h, w)
                nh, nw = (shorter, round(w * scale)) if h <= w else (round(h * scale), shorter)
                x = nn.functional.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
                top, left = (nh - size) // 2, (nw - size) // 2
                x = x[..., top:top + size, left:left + size]
            return self.net(x)

    return _Resize()


def create_preset(name: str, weights: str | Path | None = None, seed: int = 0, device: str = "auto",
                  precision: str = "auto", arch_overrides: dict[str, Any] | None = None, runtime: str = "torch",
                  threads: int | None = None) -> PresetEncoder:
    """The encoder of preset ``name``; its checkpoint is found locally and checked (strict keys) now."""
    p = PRESETS[name]
    found = local_weights(p, weights)
    if found is None:
        if not weights and not p.on_hub:
            raise InputError(f"--encoder {name} needs --weights PATH/{p.weights_files[0]}: {p.repo} publishes its "
                             "weights off the Hugging Face hub, and presets are never downloaded.")
        where = f"--weights {weights}" if weights else f"the Hugging Face cache {hf_cache_dir()} ({p.repo})"
        raise InputError(f"--encoder {name}: none of {list(p.weights_files)} in {where}; presets are never "
                         f"downloaded. Fix: pass --weights PATH/{Path(p.weights_files[0]).name}, or fetch {p.repo} "
                         "where the hub is reachable (huggingface-cli download, access granted) and copy the cache "
                         "here.")
    path, cached_repo = found
    args = published_config(p, path)
    check_checkpoint(p, path, args, arch_overrides)
    ws = WeightsSource("file" if weights else "hf-cache", str(path.resolve()), file_sha256(path), cached_repo)
    return PresetEncoder(name, p.arch, ws, p.mean, p.std, model_args=json.loads(json.dumps(args)), seed=seed,
                         device=device, precision=precision, preset=name, arch_overrides=dict(arch_overrides or {}),
                         runtime_name=runtime, threads=threads, auto_precision=p.precision)


# ---- registered names (the registry derives its lazy table from these decorators) ---------------------------
@register_encoder("uni", "wsi")
def uni(**kw: Any) -> PresetEncoder:
    """UNI (MahmoodLab): 1024-d, 224 px at 0.5 µm/px; CC-BY-NC-ND-4.0, gated."""
    return create_preset("uni", **kw)


@register_encoder("uni2-h", "wsi")
def uni2_h(**kw: Any) -> PresetEncoder:
    """UNI2-h (MahmoodLab): 1536-d, 224 px at 0.5 µm/px, bf16 on a GPU; CC-BY-NC-ND-4.0, gated."""
    return create_preset("uni2-h", **kw)


@register_encoder("virchow", "wsi")
def virchow(**kw: Any) -> PresetEncoder:
    """Virchow (Paige): 2560-d (CLS + mean patch token), 224 px at 0.5 µm/px; Apache-2.0, gated."""
    return create_preset("virchow", **kw)


@register_encoder("virchow2", "wsi")
def virchow2(**kw: Any) -> PresetEncoder:
    """Virchow2 (Paige): 2560-d (CLS + mean patch token), 224 px at 0.5 µm/px; CC-BY-NC-ND-4.0, gated."""
    return create_preset("virchow2", **kw)


@register_encoder("h-optimus-0", "wsi")
def h_optimus_0(**kw: Any) -> PresetEncoder:
    """H-optimus-0 (Bioptimus): 1536-d, 224 px at 0.5 µm/px; Apache-2.0."""
    return create_preset("h-optimus-0", **kw)


@register_encoder("h-optimus-1", "wsi")
def h_optimus_1(**kw: Any) -> PresetEncoder:
    """H-optimus-1 (Bioptimus): 1536-d, 224 px at 0.5 µm/px; Bioptimus licence, gated."""
    return create_preset("h-optimus-1", **kw)


@register_encoder("prov-gigapath", "wsi")
def prov_gigapath(**kw: Any) -> PresetEncoder:
    """Prov-GigaPath tile encoder: 1536-d, 224 px at 0.5 µm/px; Apache-2.0, gated."""
    return create_preset("prov-gigapath", **kw)


@register_encoder("phikon-v2", "wsi")
def phikon_v2(**kw: Any) -> PresetEncoder:
    """Phikon-v2 (Owkin): 1024-d, 224 px at 0.5 µm/px, built from its config.json; Owkin non-commercial."""
    return create_preset("phikon-v2", **kw)


@register_encoder("conch-v1", "wsi")
def conch_v1(**kw: Any) -> PresetEncoder:
    """CONCH v1 (MahmoodLab): 512-d image embedding before the projection, 448 px; CC-BY-NC-ND-4.0, gated."""
    return create_preset("conch-v1", **kw)


@register_encoder("conch-v1.5", "wsi")
def conch_v15(**kw: Any) -> PresetEncoder:
    """CONCH v1.5 (MahmoodLab): 768-d, 448 px at 0.5 µm/px; CC-BY-NC-ND-4.0, gated."""
    return create_preset("conch-v1.5", **kw)


@register_encoder("ctranspath", "wsi")
def ctranspath(**kw: Any) -> PresetEncoder:
    """CTransPath (TransPath weights): 768-d, 224 px at 0.5 µm/px; GPL-3.0."""
    return create_preset("ctranspath", **kw)


@register_encoder("chief-ctranspath", "wsi")
def chief_ctranspath(**kw: Any) -> PresetEncoder:
    """CHIEF-CTransPath (CHIEF's tile encoder, what CHIEF's slide encoder needs): 768-d, 224 px; GPL-3.0."""
    return create_preset("chief-ctranspath", **kw)
