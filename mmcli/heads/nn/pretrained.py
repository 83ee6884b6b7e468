"""Starting a head from `mmcli pretrain`'s encoders (``fusion_mlp --param init=DIR``): reading the folder
:class:`~mmcli.heads.training.pretrain.ContrastivePretrainer` writes, and folding a fold's own standardisation
into a pretrained first layer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.heads.preprocess.vector import VectorPreprocessor, load_preprocessors
from mmcli.pipeline.errors import InputError

CONFIG = "pretrain.json"
WEIGHTS = "encoders.safetensors"


def load_pretrained(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(config, {modality: {"weight", "bias", "input_mean", "input_scale"}}) of a
    :meth:`ContrastivePretrainer.save` folder: each encoder layer and the standardisation of its input it was
    trained on (a consumer with another standardisation must fold the difference into the layer, see
    :func:`refit_to_standardisation`); InputError naming the folder when it is not one."""
    from safetensors.torch import load_file

    path = Path(path)
    f = path / CONFIG
    if not f.is_file() or not (path / WEIGHTS).is_file():
        raise InputError(f"--init {path}: not a pretraining folder (no {CONFIG} / {WEIGHTS}). Fix: pass the --out "
                         "folder of `mmcli pretrain`.")
    config = json.loads(f.read_text())
    tensors = load_file(str(path / WEIGHTS))
    enc: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        mod, _, rest = key.partition(".")
        if rest.startswith("encoder."):
            enc.setdefault(mod, {})[rest.split(".", 1)[1]] = t
    for mod, prep in load_preprocessors(path).items():
        if mod in enc and isinstance(prep, VectorPreprocessor):
            assert prep.mean_ is not None and prep.scale_ is not None
            enc[mod]["input_mean"] = torch.from_numpy(np.asarray(prep.mean_, dtype=np.float32))
            enc[mod]["input_scale"] = torch.from_numpy(np.asarray(prep.scale_, dtype=np.float32))
    missing = sorted(m for m, w in enc.items() if "input_mean" not in w or "weight" not in w)
    if missing:
        raise InputError(f"--init {path}: modalities {missing} lack their encoder or standardisation in "
                         f"{WEIGHTS} / preprocess.json. Fix: rerun `mmcli pretrain`.")
    return config, enc


def refit_to_standardisation(weights: dict[str, torch.Tensor], mean: np.ndarray | torch.Tensor,
                             scale: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a layer on input standardised with ``(mean, scale)`` that computes exactly what the
    pretrained encoder computes on its own standardisation ``(input_mean, input_scale)``.

    With ``x = z s + m`` (z: the consumer's standardised input) and ``u = (x - m_p) / s_p`` (the pretraining's):
    ``W u + b = (W s / s_p) z + b + W (m - m_p) / s_p``. Without it, a fold standardised on its few labelled
    training patients would feed the encoder inputs on another scale than it was trained on.
    """
    W, b = weights["weight"].double(), weights["bias"].double()
    m_p, s_p = weights["input_mean"].double(), weights["input_scale"].double()
    m, s = torch.as_tensor(np.asarray(mean, dtype=np.float64)), torch.as_tensor(np.asarray(scale, dtype=np.float64))
    return (W * (s / s_p)).float(), (b + W @ ((m - m_p) / s_p)).float()
