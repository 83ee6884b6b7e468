"""Learned tissue and artefact segmentation with the published checkpoints, loaded strictly from local files.

Ported from TRIDENT's ``trident/segmentation_models/load.py`` (a91fa84) and its ``WSI._segment_semantic``:

* ``hest`` (HEST's tissue segmenter, ``deeplabv3_seg_v4.ckpt``): torchvision ``deeplabv3_resnet50`` with
  ``classifier[4]`` a 1x1 conv to 2 classes; the checkpoint is Lightning's ``{'state_dict': {'model.<key>': ...}}``
  whose ``aux`` keys are dropped and ``model.`` removed; 512-px input at 10x (1 µm/px), ImageNet normalisation,
  tissue where softmax class 1 > 0.5. fp16 autocast on CUDA (TRIDENT's precision), fp32 on CPU.
* ``grandqc`` (GrandQC's tissue model, ``Tissue_Detection_MPP10.pth``): segmentation-models-pytorch
  ``UnetPlusPlus('timm-efficientnet-b0', classes=2)``, a plain state dict; 512-px input at 1.25x (10 µm/px) after a
  JPEG round trip at quality 80, ImageNet normalisation; tissue where the winning class is 0 with probability
  >= 0.5.
* ``grandqc-artifact`` (GrandQC's artefact model, ``GrandQC_MPP1_state_dict.pth``): ``Unet('timm-efficientnet-b0',
  classes=8)`` at 10x (1 µm/px); classes 1 normal tissue, 2 fold, 3 dark spot and foreign object, 4 pen marking,
  5 edge and air bubble, 6 out of focus, 7 background. A pixel is an artefact when its class is 2-6.

The slide is read in non-overlapping 512-px patches at the model's resolution (edge patches padded with white),
and each patch's prediction is averaged down (or resized up) onto the tissue-mask grid. A checkpoint of another
layout is a :class:`SegmentationError` naming the mismatched keys (exit 2), before any slide is read.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.errors import InputError

TISSUE_MODELS = ("hest", "grandqc")
ARTIFACT_MODEL = "grandqc-artifact"
ARTIFACT_CLASSES = (2, 3, 4, 5, 6)
PEN_CLASS = 4
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SegmentationError(InputError, ValueError):
    """A segmentation checkpoint that cannot be loaded (missing, unreadable or of another layout)."""


@dataclass(frozen=True)
class ModelSpec:
    """How one published segmenter is built and run."""

    name: str
    mpp: float  # µm/px of its input (10 / magnification)
    input_size: int
    classes: int
    jpeg_quality: int | None  # a JPEG round trip before normalising (GrandQC's tissue model)
    cuda_dtype: str  # autocast dtype on CUDA, as TRIDENT runs it


SPECS = {
    "hest": ModelSpec("hest", 1.0, 512, 2, None, "float16"),
    "grandqc": ModelSpec("grandqc", 10.0, 512, 2, 80, "float16"),
    ARTIFACT_MODEL: ModelSpec(ARTIFACT_MODEL, 1.0, 512, 8, None, "float32"),
}


def build_network(name: str) -> Any:
    """The untrained network of ``name`` in the published layout."""
    import torch.nn as nn

    if name == "hest":
        from torchvision.models.segmentation import deeplabv3_resnet50

        net = deeplabv3_resnet50(weights=None, weights_backbone=None)
        net.classifier[4] = nn.Conv2d(256, 2, kernel_size=1, stride=1)
        return net
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:  # pragma: no cover - a core dependency; a broken install says so
        raise SegmentationError(f"--tissue-model {name} needs segmentation-models-pytorch. Fix: pip install "
                                "'segmentation-models-pytorch>=0.5'") from e
    import warnings

    with warnings.catch_warnings():  # smp deprecates its "timm-" encoders; the published checkpoints use them
        warnings.simplefilter("ignore", DeprecationWarning)
        if name == "grandqc":
            return smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2,
                                    activation=None)
        return smp.Unet(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=8, activation=None)


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per process and file version."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def checkpoint_state(name: str, path: str | Path) -> dict[str, Any]:
    """The state dict of a checkpoint as the published loader reads it (``weights_only=True``; safetensors too).
    HEST: ``state_dict`` entry, ``aux`` keys dropped, ``model.`` removed; GrandQC: the file is the state dict."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SegmentationError(f"--tissue-weights {path}: file not found. The weights are never downloaded: "
                                f"put the published {name} checkpoint there.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ck: Any = load_file(str(path), device="cpu")
        else:
            ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for bad files
        raise SegmentationError(f"--tissue-weights {path}: not a loadable checkpoint ({type(e).__name__}: {e}). "
                                "Fix: give the published file (read with torch.load(weights_only=True)).") from e
    if isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict):
        ck = ck["state_dict"]
    if not isinstance(ck, dict):
        raise SegmentationError(f"--tissue-weights {path}: expected a dict of tensors, got {type(ck).__name__}")
    if name == "hest":
        return {k.replace("model.", ""): v for k, v in ck.items() if "aux" not in k and isinstance(v, torch.Tensor)}
    return {k: v for k, v in ck.items() if isinstance(v, torch.Tensor)}


def layout_problems(expected: dict[str, Any], got: dict[str, Any], limit: int = 8) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``got`` against ``expected`` (a network's state dict)."""
    out = [f"{k}: checkpoint {tuple(got[k].shape)}, model {tuple(expected[k].shape)}"
           for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing:
        out.append(f"missing {len(missing)}: {', '.join(missing[:limit])}" + (" ..." if len(missing) > limit else ""))
    if unexpected:
        out.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:limit])}"
                   + (" ..." if len(unexpected) > limit else ""))
    return out


class Segmenter:
    """One loaded segmentation model; :meth:`predict` maps uint8 patches (B, S, S, 3) to per-pixel scores
    (B, S, S) float32: tissue probability-like 0/1 for the tissue models, artefact 0/1 for the artefact model."""

    def __init__(self, name: str, weights: str | Path, device: str = "cpu", threshold: float = 0.5) -> None:
        import torch

        if name not in SPECS:
            raise SegmentationError(f"unknown segmentation model {name!r}; choose one of {', '.join(SPECS)}")
        self.spec, self.device, self.threshold = SPECS[name], device, float(threshold)
        self.weights = str(Path(weights).resolve())
        net = build_network(name)
        state = checkpoint_state(name, weights)
        bad = layout_problems(net.state_dict(), state)
        if bad:
            raise SegmentationError(
                f"--tissue-weights {weights}: not a {name} checkpoint in the published layout "
                f"({self._layout()}); mismatched keys: " + "; ".join(bad)
                + ". Fix: give the published file, unmodified.")
        net.load_state_dict(state, strict=True)
        self.net = net.eval().to(device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.sha256 = file_sha256(weights)
        self._torch = torch

    def _layout(self) -> str:
        return {"hest": "torchvision deeplabv3_resnet50, classifier[4] 2 classes, {'state_dict': {'model.<key>'}}",
                "grandqc": "smp UnetPlusPlus timm-efficientnet-b0, 2 classes",
                ARTIFACT_MODEL: "smp Unet timm-efficientnet-b0, 8 classes"}[self.spec.name]

    def provenance(self) -> dict[str, Any]:
        s = self.spec
        return {"name": s.name, "weights": self.weights, "sha256": self.sha256, "mpp": s.mpp,
                "input_size": s.input_size, "threshold": self.threshold}

    def _prepare(self, patches: np.ndarray) -> Any:
        torch = self._torch
        if self.spec.jpeg_quality is not None:
            patches = np.stack([_jpeg_round_trip(p, self.spec.jpeg_quality) for p in patches])
        x = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def predict(self, patches: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = self._prepare(patches)
        cuda = str(self.device).startswith("cuda")
        dtype = getattr(torch, self.spec.cuda_dtype)
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=cuda and dtype != torch.float32):
            out = self.net(x)
            logits = out["out"] if isinstance(out, dict) else out
            prob = torch.softmax(logits.float(), dim=1)
        if self.spec.name == "hest":
            pred = prob[:, 1] > self.threshold
        elif self.spec.name == "grandqc":
            top, cls = prob.max(dim=1)
            pred = (top >= self.threshold) & (cls == 0)
        else:
            cls = prob.argmax(dim=1)
            pred = torch.zeros_like(cls, dtype=torch.bool)
            for c in ARTIFACT_CLASSES:
                pred |= cls == c
        return pred.float().cpu().numpy()


def _jpeg_round_trip(patch: np.ndarray, quality: int) -> np.ndarray:
    """TRIDENT's ``JpegCompressionTransform`` (OpenCV) with Pillow: encode at ``quality`` and decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def segment_slide(reader: Any, slide_mpp: float, seg: Segmenter, mask_shape: tuple[int, int],
                  mask_scale: tuple[float, float], batch_size: int = 4,
                  check: Callable[[], None] | None = None) -> np.ndarray:
    """Run ``seg`` over the whole slide and return its prediction on the tissue-mask grid (``mask_shape``
    pixels of ``mask_scale`` level-0 pixels each) as float32 in [0, 1] (share of the mask pixel predicted).

    ``check`` is called between batches (a stop request raises there)."""
    from PIL import Image

    from mmcli.features.tiling import choose_level

    s = seg.spec.input_size
    ds = seg.spec.mpp / slide_mpp  # level-0 px per model px
    tile0 = max(1, round(s * ds))
    level = choose_level(reader.level_downsamples, ds)
    lds = float(reader.level_downsamples[level])
    w0, h0 = reader.dimensions
    xs, ys = np.arange(0, w0, tile0), np.arange(0, h0, tile0)
    corners = [(int(x), int(y)) for y in ys for x in xs]
    acc = np.zeros(mask_shape, np.float32)
    hits = np.zeros(mask_shape, np.float32)
    sx, sy = mask_scale
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        patches = np.full((len(chunk), s, s, 3), 255, np.uint8)
        for k, (x, y) in enumerate(chunk):
            cw, ch = min(tile0, w0 - x), min(tile0, h0 - y)  # level-0 extent inside the slide
            rw, rh = max(1, round(cw / lds)), max(1, round(ch / lds))
            region = reader.read_region(x, y, level, rw, rh)
            pw, ph = max(1, round(cw / ds)), max(1, round(ch / ds))
            patches[k, :ph, :pw] = np.asarray(Image.fromarray(region).resize((pw, ph), Image.BILINEAR))
        pred = seg.predict(patches)
        for k, (x, y) in enumerate(chunk):
            mx0, my0 = round(x / sx), round(y / sy)
            mx1, my1 = min(mask_shape[1], round((x + tile0) / sx)), min(mask_shape[0], round((y + tile0) / sy))
            if mx1 <= mx0 or my1 <= my0:
                continue
            # the patch's footprint in mask pixels (the padded part falls outside the mask and is cut)
            full_w, full_h = max(1, round(tile0 / sx)), max(1, round(tile0 / sy))
            small = np.asarray(Image.fromarray(pred[k]).resize((full_w, full_h), Image.BOX if full_w < s else
                                                               Image.BILINEAR))
            acc[my0:my1, mx0:mx1] += small[:my1 - my0, :mx1 - mx0]
            hits[my0:my1, mx0:mx1] += 1
        if check is not None:
            check()
    return np.divide(acc, hits, out=np.zeros_like(acc), where=hits > 0)
