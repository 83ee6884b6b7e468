"""Frozen image encoders for WSI tiles: ``resnet50_trunc`` (CLAM's) and any timm model as ``timm:NAME``.

Weights, in order of precedence:

1. ``weights=FILE``: safetensors, or ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``.
2. The Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``) for the model's timm hub id or a
   ``timm:hf-hub:ORG/NAME`` repo. Nothing is downloaded unless ``HF_HUB_OFFLINE`` is explicitly ``0``.
3. Nothing available: a loud warning and a seeded random initialisation, recorded as ``pretrained: false``.

An encoder is cheap to create: it resolves its weights (and hashes them) at once, so its ``encoder_id`` is
known, and builds the network on first use. Inputs are uint8 RGB batches ``(B, H, W, 3)``; the NHWC->NCHW
change and the normalisation are folded into the model (:func:`FoldedImageModel`), so tiles stay uint8 until
the network. Runtimes (``runtime=``): ``torch`` (eager, autocast), ``torch-compile``, ``openvino`` (CPU; the
IR is converted once per encoder_id, input size, OpenVINO version and precision and cached on disk, see
:mod:`~mmcli.features.encoders.openvino_rt`) or ``auto`` (OpenVINO on a CPU when installed, else torch).
"""
from __future__ import annotations

import functools
import json
import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.encoders.registry import Encoder, register_encoder
from mmcli.features.encoders.runtime import (
    HF_WEIGHT_FILES,
    INT8,
    autocast,
    hf_cache_dir,
    hf_file,
    hub_weights_fix,
    load_state_dict,
    resolve_backend,
    resolve_device,
    resolve_precision,
    runtime_version,
    warn_random_init,
)
from mmcli.pipeline.fingerprint import file_sha256, make_encoder_id

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET50_TRUNC_HUB = "timm/resnet50.tv_in1k"  # torchvision's ImageNet weights, which CLAM uses
# classifier keys that a checkpoint may carry and a features-only model (num_classes=0) lacks
HEAD_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.", "last_linear.", "heads.")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


# ---- weights ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsSource:
    """Where an encoder's weights come from: ``file``, ``hf-cache`` or ``random-init`` (``repo``: the hub repo
    whose weights were used, or were looked for and are missing)."""

    kind: str
    path: str | None = None
    sha256: str | None = None
    repo: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.kind != "random-init"

    def describe(self) -> str:
        if self.kind == "file":
            return f"file {self.path}"
        if self.kind == "hf-cache":
            return f"Hugging Face cache {self.repo} ({Path(self.path or '').name})"
        return "random initialisation (no pretrained weights)"


def weights_from_file(path: str | Path) -> WeightsSource:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(2, "weights file not found", str(p))
    return WeightsSource("file", str(p), file_sha256(p))


def apply_state_dict(model: Any, sd: dict[str, Any], source: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``model``; classifier keys are ignored, anything else that does not fit is an error."""
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:  # timm's own key/shape adaptation for this family (e.g. ViT position embeddings)
        try:
            sd = filt(sd, model)
        except Exception:  # noqa: BLE001 - filters expect their own checkpoint layouts; fall back to raw keys
            pass
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"weights {source} do not fit {type(model).__name__}: {e}") from e
    missing = [k for k in missing if not k.startswith(allow_missing)]
    unexpected = [k for k in unexpected if not k.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"weights {source} do not fit {type(model).__name__}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}. Fix: pass weights of this architecture."
        )


# ---- the encoder -----------------------------------------------------------------------------------------
@dataclass
class ImageEncoder(Encoder):
    """A frozen timm image model. ``truncate_after`` (e.g. ``layer3``) keeps a ResNet up to that stage and
    average-pools it (CLAM's ``resnet50_trunc``)."""

    name: str
    arch: str
    weights: WeightsSource
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_args: dict[str, Any] = field(default_factory=dict)
    truncate_after: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    runtime_name: str = "torch"
    threads: int | None = None
    int8_model: str | None = None  # a quantised IR (see mmcli.features.wsi): precision int8 on OpenVINO
    auto_precision: str | None = None  # what precision "auto" means for this model (a preset's published choice)
    modality: str = "wsi"
    _module: Any = field(default=None, init=False, repr=False)
    _runners: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _dim: int | None = field(default=None, init=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False)

    # ---- identity -----------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Preprocessing and architecture parameters that change the features, and the precision this process
        computes in (bf16 and fp32 features are not mixed under one id: an array job over machines with and
        without native bf16 gets one id per precision)."""
        self._settle()
        return {"arch": self.arch, "mean": list(self.mean), "std": list(self.std), "model_args": self.model_args,
                "truncate_after": self.truncate_after, "precision": self._precision,
                **({"seed": self.seed} if not self.weights.pretrained else {})}

    @property
    def encoder_id(self) -> str:
        """``<name>-<hash>`` of the weights and :meth:`params`; the WSI store key adds the tiling parameters."""
        return make_encoder_id(self.name, self.weights.sha256, self.params())

    def provenance(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "arch": self.arch,
            "dim": self.dim,
            "mean": list(self.mean),
            "std": list(self.std),
            "truncate_after": self.truncate_after,
            "pretrained": self.weights.pretrained,
            "weights": self.weights.describe(),
            "weights_source": self.weights.kind,
            "weights_sha256": self.weights.sha256,
            **({"init_seed": self.seed} if not self.weights.pretrained else {}),
        }

    def warn_if_random(self) -> None:
        """Say loudly (once per process) that this encoder has no pretrained weights, naming the weights to place
        offline (the hub repo it looked for) and how."""
        if not self.weights.pretrained:
            repo = self.weights.repo
            fix = (hub_weights_fix(repo, what=f"{repo.split('/', 1)[-1]} ({repo})") if repo else
                   "pass --weights FILE (safetensors/.pth state dict of this architecture)")
            warn_random_init(self.name, self.seed, "none given, none in the Hugging Face cache", fix + ".")

    # ---- network --------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:  # type: ignore[override]
        if self._dim is None:
            self._dim = int(self._feature_dim(self.module))
        return self._dim

    def _feature_dim(self, module: Any) -> int:
        if self.truncate_after:  # the width of the last kept stage: ask the network itself
            import torch

            with torch.inference_mode():
                return int(module(torch.zeros(1, 3, 64, 64, device=self._device)).shape[1])
        return int(getattr(module, "head_hidden_size", None) or module.num_features)

    @property
    def module(self) -> Any:
        """The torch network (NCHW float input), on this encoder's device."""
        with self._lock:
            if self._module is None:
                self._module = self._build()
            return self._module

    def _settle(self) -> None:
        """Resolve device, precision and runtime once (cheap: no network is built)."""
        if getattr(self, "_backend", None) is not None:
            return
        self._device = resolve_device(self.device)
        self._backend = resolve_backend(self.runtime_name, self._device)
        if self.int8_model:
            if self._backend != "openvino":
                raise ValueError("int8 runs with --runtime openvino (or auto on a CPU)")
            self._precision = INT8
        elif self._backend == "openvino":
            from mmcli.features.encoders import openvino_rt

            fp32 = self.precision == "auto" and self.auto_precision == "fp32"
            self._precision = openvino_rt.effective_precision("fp32" if fp32 else self.precision)
        else:
            self._precision = resolve_precision(self.precision, self._device, self.auto_precision)
        self._channels_last = self._precision in ("bf16", "fp16")

    def _build(self) -> Any:
        import timm
        import torch

        self._settle()
        self.warn_if_random()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = timm.create_model(self.arch, pretrained=False, num_classes=0, **self.model_args)
        if self.weights.pretrained:
            apply_state_dict(model, load_state_dict(self.weights.path or ""), self.weights.describe(),
                             self._dropped_stages())
        if self.truncate_after:
            model = self._truncate(model)
        model.eval().requires_grad_(False)
        device = "cpu" if self._backend == "openvino" else self._device
        model = model.to(device)
        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True  # tiles have one fixed size: let cuDNN pick its fastest kernels
        if self._channels_last and self._backend != "openvino":
            model = model.to(memory_format=torch.channels_last)
        return model

    def folded(self, channels_last: bool | None = None) -> Any:
        """The network with the input conversion folded in: uint8 ``(B, H, W, 3)`` -> ``(B, D)`` features
        (NHWC->NCHW, /255, mean/std inside the graph). What torch.compile and OpenVINO run."""
        module = self.module
        return FoldedImageModel(module, self.mean, self.std,
                                self._channels_last if channels_last is None else channels_last).to(
            "cpu" if self._backend == "openvino" else self._device)

    def _runner(self, size: tuple[int, int]) -> Any:
        """The callable that runs uint8 NHWC batches of spatial ``size`` for the resolved runtime."""
        self._settle()
        with self._lock:
            run = self._runners.get(size)
            if run is not None:
                return run
        if self._backend == "openvino":
            run = self._openvino(size)
        else:
            net = self.folded()
            if self._backend == "torch-compile":
                import torch

                net = torch.compile(net, dynamic=False)
            run = _TorchRunner(net, self._device, self._precision)
        with self._lock:
            return self._runners.setdefault(size, run)

    def _openvino(self, size: tuple[int, int]) -> Any:
        from mmcli.features.encoders import openvino_rt

        if self.int8_model:
            xml = Path(self.int8_model)
            self._ov_info = {"ov_model": str(xml), "ov_converted_now": False}
        else:
            import torch

            h, w = size
            dest = openvino_rt.model_dir(f"{self.encoder_id}-{h}x{w}", self._precision)
            xml, now = openvino_rt.convert_cached(
                dest, lambda: self.folded(channels_last=False), torch.zeros(1, h, w, 3, dtype=torch.uint8),
                [((-1, h, w, 3), "u8")], {"encoder_id": self.encoder_id, "encoder": self.name, "input": [h, w]})
            self._ov_info = {"ov_model": str(xml), "ov_converted_now": now}
        compiled = openvino_rt.CompiledModel(xml, self._precision, self.threads)
        self._ov_info.update(ov_hint=compiled.config["PERFORMANCE_HINT"], ov_threads=compiled.threads)
        return compiled

    def runtime(self) -> dict[str, Any]:
        """How this process runs the encoder (differs between machines, so kept per item)."""
        self._settle()
        out = {"device": self._device, "precision": self._precision, "channels_last": self._channels_last,
               "runtime": self._backend, "runtime_version": runtime_version(self._backend)}
        if self._backend == "openvino":
            out["channels_last"] = False
            out.update(getattr(self, "_ov_info", {}))
        return out

    def _dropped_stages(self) -> tuple[str, ...]:
        """Key prefixes of the ResNet stages that truncation drops (a checkpoint may lack them)."""
        if not self.truncate_after:
            return ()
        return tuple(f"{n}." for n in _RESNET_STAGES[_RESNET_STAGES.index(self.truncate_after) + 1:])

    def _truncate(self, model: Any) -> Any:
        import torch.nn as nn

        keep = _RESNET_STAGES[: _RESNET_STAGES.index(self.truncate_after or "layer3") + 1]
        stem = [model.conv1, model.bn1, model.act1, model.maxpool]
        return nn.Sequential(*stem, *[getattr(model, n) for n in keep], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    # ---- inference ------------------------------------------------------------------------------------------
    def encode(self, batch: Any) -> np.ndarray:
        """(B, D) float32 features of a uint8 RGB batch ``(B, H, W, 3)`` (numpy or tensor, any device)."""
        shape = tuple(batch.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 batch, got shape {shape}")
        run = self._runner((int(shape[1]), int(shape[2])))
        y = run(batch)
        if self._dim is None:
            self._dim = int(y.shape[1])
        return y

    def forward(self, batch: Any) -> Any:
        """:meth:`encode` as a float32 CPU torch tensor."""
        import torch

        return torch.from_numpy(self.encode(batch))


class _TorchRunner:
    """Runs a folded torch network (eager or compiled) on uint8 NHWC batches under autocast."""

    def __init__(self, net: Any, device: str, precision: str) -> None:
        self.net, self.device, self.precision = net, device, precision

    def __call__(self, batch: Any) -> np.ndarray:
        import torch

        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.precision):
            y = self.net(x)
        return y.float().cpu().numpy()


@functools.cache
def _folded_cls() -> Any:
    import torch
    import torch.nn as nn

    class _Folded(nn.Module):
        def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                     channels_last: bool) -> None:
            super().__init__()
            self.net, self.channels_last = net, channels_last
            m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * s), persistent=False)  # (x/255 - mean)/std in one FMA
            self.register_buffer("shift", m / s, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 3, 1, 2).float()  # NHWC memory = channels_last
            x = x * self.scale - self.shift
            if not self.channels_last:
                x = x.contiguous()
            return self.net(x)

    return _Folded


def FoldedImageModel(net: Any, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool) -> Any:  # noqa: N802
    """``uint8 (B, H, W, 3) -> (B, D)``: ImageNet-style normalisation folded in front of ``net``."""
    return _folded_cls()(net, mean, std, channels_last)


# ---- factories -------------------------------------------------------------------------------------------
def _timm_cfg(arch: str) -> Any:
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - unknown tag: no pretrained config
        return None


def _resolve_weights(name: str, weights: str | Path | None, hub_repo: str | None,
                     hub_files: tuple[str, ...] = HF_WEIGHT_FILES) -> WeightsSource:
    if weights:
        return weights_from_file(weights)
    if hub_repo:
        path = hf_file(hub_repo, hub_files)
        if path:
            return WeightsSource("hf-cache", path, file_sha256(path), hub_repo)
    return WeightsSource("random-init", repo=hub_repo)  # the repo looked for: the warning names it


@register_encoder("resnet50_trunc", "wsi")
def resnet50_trunc(weights: str | Path | None = None, seed: int = 0, device: str = "auto",
                   precision: str = "auto", runtime: str = "torch", threads: int | None = None) -> ImageEncoder:
    """CLAM's encoder: ResNet-50 up to ``layer3``, average-pooled, 1024-d, ImageNet normalisation.

    Pretrained weights: ``weights`` (a full ResNet-50 state dict, torchvision/timm key names) or
    ``timm/resnet50.tv_in1k`` from the HF cache."""
    ws = _resolve_weights("resnet50_trunc", weights, RESNET50_TRUNC_HUB)
    return ImageEncoder("resnet50_trunc", "resnet50", ws, IMAGENET_MEAN, IMAGENET_STD, truncate_after="layer3",
                        seed=seed, device=device, precision=precision, runtime_name=runtime, threads=threads)


@register_encoder("timm:", "wsi")
def timm_encoder(model_name: str, weights: str | Path | None = None, seed: int = 0, device: str = "auto",
                 precision: str = "auto", runtime: str = "torch", threads: int | None = None) -> ImageEncoder:
    """Any timm model, pooled features (``num_classes=0``): ``timm:resnet18``, ``timm:vit_small_patch16_224``,
    ``timm:hf-hub:ORG/NAME`` (config and weights from the local HF cache)."""
    import timm

    name = f"timm:{model_name}"
    if model_name.startswith("hf-hub:"):
        repo = model_name.removeprefix("hf-hub:")
        cfg_path = hf_file(repo, ("config.json",))
        if cfg_path is None:
            raise ValueError(f"{name}: config.json of {repo} is not in the Hugging Face cache ({hf_cache_dir()}) "
                             "and downloads are off. Fix: fetch it where the hub is reachable "
                             "(huggingface-cli download) and copy the cache, or set HF_HUB_OFFLINE=0.")
        cfg = json.loads(Path(cfg_path).read_text())
        arch = cfg.get("architecture") or cfg.get("model_name")
        if not arch:
            raise ValueError(f"{name}: {cfg_path} names no architecture")
        pcfg = cfg.get("pretrained_cfg", {})
        args = {k: v for k, v in cfg.get("model_args", {}).items() if k != "num_classes"}
        ws = _resolve_weights(name, weights, repo)
        mean, std = tuple(pcfg.get("mean", IMAGENET_MEAN)), tuple(pcfg.get("std", IMAGENET_STD))
        return ImageEncoder(name, arch, ws, mean, std, args, seed=seed, device=device, precision=precision,
                            runtime_name=runtime, threads=threads)
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}. Fix: see timm.list_models(), e.g. timm:resnet18")
    pcfg = _timm_cfg(model_name)
    repo = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    files = (pcfg.hf_hub_filename,) if pcfg is not None and getattr(pcfg, "hf_hub_filename", None) else HF_WEIGHT_FILES
    ws = _resolve_weights(name, weights, repo, files)
    mean = tuple(getattr(pcfg, "mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(pcfg, "std", None) or IMAGENET_STD)
    return ImageEncoder(name, model_name, ws, mean, std, seed=seed, device=device, precision=precision,
                        runtime_name=runtime, threads=threads)
