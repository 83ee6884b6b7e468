"""Frozen 3-D CNN encoders for volumes (MRI): torchvision's video ResNet-18 (``r3d_18``) adapted to one channel.

Why torchvision's r3d_18 rather than MONAI's ResNet: it is already installed (no extra dependency), its
architecture is the well-known Tran et al. 2018 R3D-18 and its state-dict layout is the one torchvision
publishes, so checkpoints saved from it (or fine-tuned from it) load without key juggling. Two adaptations:

- **one input channel**: the stem conv takes 1 channel. 3-channel checkpoints (e.g. Kinetics-400 weights
  saved from torchvision) are folded by summing the stem kernel over its input channels, the usual trick
  for grey-scale inputs, which keeps the response to a uniform intensity unchanged;
- **isotropic stem stride** ``(2, 2, 2)``: after resampling, voxels are isotropic, so the stem halves all three
  axes (video R3D keeps the time axis, which would cost ~4x the compute for no gain on volumes). Stride holds
  no parameters, so checkpoints load unchanged; ``stem_stride=(1, 2, 2)`` restores torchvision's network.

The classification head is dropped: features are the 512-d global-average-pooled output of ``layer4``.
Input tensors are ``(B, 1, Z, Y, X)`` of a RAS volume (slices first), as :mod:`mmcli.features.mri` builds them.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmcli.features.encoders.registry import Encoder, register_encoder
from mmcli.features.encoders.runtime import (
    autocast,
    load_state_dict,
    r3d18_weights_fix,
    resolve_execution,
    runtime_version,
    warn_random_init,
)
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import file_sha256, make_encoder_id


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of ``path`` (safetensors, or torch.load with ``weights_only=True``); errors are usage errors."""
    if not Path(path).is_file():
        raise InputError(f"{path}: weights file not found. Fix: check --weights.")
    try:
        sd = load_state_dict(path)
    except Exception as e:  # noqa: BLE001 - unreadable or not a state dict
        raise InputError(f"{path}: cannot read weights ({type(e).__name__}: {e}). "
                         "Fix: give a .safetensors file or a torch state dict.") from e
    return {k.removeprefix("backbone."): v for k, v in sd.items()}


# ---- the network --------------------------------------------------------------------------------------------
def build_r3d18(stem_stride: tuple[int, int, int] = (2, 2, 2)) -> nn.Module:
    """torchvision r3d_18 with a 1-channel stem of the given stride and no classification head."""
    from torchvision.models.video import r3d_18

    model = r3d_18(weights=None)
    model.stem[0] = nn.Conv3d(1, 64, kernel_size=(3, 7, 7), stride=stem_stride, padding=(1, 3, 3), bias=False)
    model.fc = nn.Identity()
    return model


def adapt_r3d18_state(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load ``sd`` into ``model``, folding a 3-channel stem into 1 channel and dropping the ``fc`` head;
    returns (state, notes). Keys that do not fit are a usage error."""
    notes = []
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    w = sd.get("stem.0.weight")
    if w is not None and w.ndim == 5 and w.shape[1] == 3:
        sd["stem.0.weight"] = w.sum(dim=1, keepdim=True)
        notes.append("3-channel stem folded to 1 channel (kernel summed over RGB)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise InputError(f"weights do not fit r3d_18: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}. Fix: give a torchvision r3d_18 state dict.")
    return sd, notes


def r3d18_params(weights_sha256: str | None, seed: int, stem_stride: tuple[int, ...] = (2, 2, 2)) -> dict[str, Any]:
    """Parameters that change R3D-18 features (the init seed matters only without weights)."""
    p: dict[str, Any] = {"stem_stride": [int(s) for s in stem_stride]}
    if not weights_sha256:
        p["seed"] = int(seed)
    return p


def check_r3d18_weights(path: str | Path, stem_stride: tuple[int, int, int] = (2, 2, 2)) -> None:
    """Fail early (usage error, before any item runs) when ``path`` does not fit R3D-18."""
    adapt_r3d18_state(load_weights(path), build_r3d18(stem_stride))


class R3D18Encoder(Encoder):
    """Frozen 1-channel R3D-18: ``encode`` maps ``(B, 1, Z, Y, X)`` volumes to ``(B, 512)`` float32.

    ``runtime``: ``torch`` (eager, autocast), ``torch-compile``, ``openvino`` (CPU; the network is converted
    once per encoder_id, OpenVINO version and precision with dynamic input dimensions, cached on disk, and
    compiled per input shape) or ``auto`` (OpenVINO on a CPU when installed, else torch).
    """

    name = "r3d18"
    modality = "mri"
    dim = 512

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        seed: int = 0,
        stem_stride: tuple[int, int, int] = (2, 2, 2),
        quiet: bool = False,
        runtime: str = "torch",
        threads: int | None = None,
    ) -> None:
        self.device, self.precision, self.backend = resolve_execution(device, precision, runtime)
        self.threads = int(threads) if threads else None
        self.seed = int(seed)
        self.stem_stride = tuple(int(s) for s in stem_stride)
        if weights and not Path(weights).is_file():
            raise InputError(f"{weights}: weights file not found. Fix: check --weights.")
        self.weights_path = str(weights) if weights else None
        self.weights_sha256 = file_sha256(weights) if weights else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the random init (and any stochastic layer) is reproducible
            self.model = build_r3d18(self.stem_stride)  # type: ignore[arg-type]
        self.notes: list[str] = []
        if weights:
            _, self.notes = adapt_r3d18_state(load_weights(weights), self.model)
        elif not quiet:
            warn_random_init(self.name, self.seed, "no --weights given",
                             r3d18_weights_fix() + ".")
        self.model.eval().requires_grad_(False).to(self.device)
        # channels_last_3d helps oneDNN / cuDNN convolutions under bf16/fp16 (OpenVINO picks its own layout)
        self.channels_last = self.precision != "fp32" and self.backend != "openvino"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self._compiled: dict[tuple[int, ...], Any] = {}  # OpenVINO: one compiled model per input shape
        self._compiled_torch: Any = None
        self._ov_info: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def encoder_id(self) -> str:
        return make_encoder_id(self.name, self.weights_sha256, self.params())

    def params(self) -> dict[str, Any]:
        """Parameters that change the features (the random-init seed only matters without weights)."""
        return r3d18_params(self.weights_sha256, self.seed, self.stem_stride)

    def provenance(self) -> dict[str, Any]:
        return {
            "encoder": self.name, "dim": self.dim, "architecture": "torchvision r3d_18, 1-channel stem",
            "weights": self.weights_path, "weights_sha256": self.weights_sha256,
            "pretrained": self.weights_sha256 is not None, "seed": self.seed,
            "stem_stride": list(self.stem_stride), "precision": self.precision, "device": self.device.type,
            "weight_notes": self.notes,
        }

    def runtime(self) -> dict[str, Any]:
        """How this process runs the encoder (differs between machines, so kept per item)."""
        out = {"device": self.device.type, "precision": self.precision, "runtime": self.backend,
               "runtime_version": runtime_version(self.backend)}
        return {**out, "openvino": dict(self._ov_info)} if self._ov_info else out

    def encode(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        shape = tuple(batch.shape)
        if len(shape) != 5 or shape[1] != 1:
            raise ValueError(f"expected (B, 1, Z, Y, X), got {shape}")
        if self.backend == "openvino":
            x = np.ascontiguousarray(batch.numpy() if isinstance(batch, torch.Tensor) else batch, dtype=np.float32)
            return self._openvino(shape)(x)
        return self._torch(batch)

    @torch.inference_mode()
    def _torch(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(batch, dtype=torch.float32)
        if self.device.type == "cuda":  # pinned host memory: the copy overlaps with queued GPU work
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        net = self.model
        if self.backend == "torch-compile":
            with self._lock:
                if self._compiled_torch is None:
                    self._compiled_torch = torch.compile(self.model, dynamic=False)
                net = self._compiled_torch
        with autocast(self.device, self.precision):
            y = net(x)
        return y.float().cpu().numpy()

    def _openvino(self, shape: tuple[int, ...]) -> Any:
        """The compiled OpenVINO model of this input shape (the IR converted once and cached on disk)."""
        with self._lock:
            run = self._compiled.get(shape)
            if run is not None:
                return run
            from mmcli.features.encoders import openvino_rt

            dest = openvino_rt.model_dir(self.encoder_id, self.precision)
            xml, now = openvino_rt.convert_cached(
                dest, lambda: self.model, torch.zeros(1, 1, 16, 16, 16), [((-1, 1, -1, -1, -1), "f32")],
                {"encoder_id": self.encoder_id, "encoder": self.name})
            run = openvino_rt.CompiledModel(openvino_rt.read_model(xml, [shape]), self.precision, self.threads)
            self._ov_info = {"model": str(xml), "converted_now": now or self._ov_info.get("converted_now", False),
                             "hint": run.config["PERFORMANCE_HINT"], "threads": run.threads}
            self._compiled[shape] = run
            return run


@register_encoder("r3d18", modality="mri")
def r3d18(**kwargs: Any) -> R3D18Encoder:
    """Default MRI encoder: 1-channel torchvision R3D-18, 512-d."""
    return R3D18Encoder(**kwargs)
