"""One registry for every frozen encoder (timm-style: names that explain themselves and a factory).

Modules that define encoders register a factory under a name with :func:`register_encoder`;
``create_encoder("resnet50_trunc", ...)`` builds it. A name with a ``prefix:`` (``timm:vit_small_patch16_224``,
``timm:hf-hub:ORG/NAME``, ``hf:NAME``) is routed to the factory registered for that prefix with the rest of the
name as ``model_name``; a local model folder is a text encoder (``hf:FOLDER``).

Each name is tied to the one module that defines it (:data:`ENCODERS` ``.lazy``), so looking up
``resnet50_trunc`` imports the image encoders only, never the volume or text ones (nor torch before it is needed).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.registry import Registry


class Encoder(ABC):
    """A frozen feature extractor. ``encode`` maps a batch of preprocessed inputs to (B, dim) float32."""

    name: str
    modality: str
    dim: int

    @property
    @abstractmethod
    def encoder_id(self) -> str:
        """Store key: name + weights hash + preprocessing params."""

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """Attributes stored with every item and at ``/<modality>/<encoder_id>``."""

    @abstractmethod
    def encode(self, batch: Any) -> np.ndarray:
        """Features of one batch, shape (B, dim)."""

    def runtime(self) -> dict[str, Any]:
        """The inference runtime and its version, stored in each item's attrs (none recorded by default)."""
        return {}


ENCODERS: Registry[Callable[..., Encoder]] = Registry("encoder", flag="--encoder")
# the module that defines each built-in name: looking a name up imports that module only
BUILTIN: dict[str, str] = {
    "resnet50_trunc": "mmcli.features.encoders.image",
    "timm:": "mmcli.features.encoders.image",
    "r3d18": "mmcli.features.encoders.volume",
    "minilm-l6": "mmcli.features.encoders.text",
    "hf:": "mmcli.features.encoders.text",
}
# pathology foundation-model presets (their names, so that looking one up imports only that module)
PRESET_NAMES = ("uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "prov-gigapath", "phikon-v2", "conch-v1.5")
BUILTIN.update(dict.fromkeys(PRESET_NAMES, "mmcli.features.encoders.presets"))
for _name, _module in BUILTIN.items():
    ENCODERS.lazy(_name, _module)


def register_encoder(name: str, modality: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator: register ``factory`` under ``name`` for ``modality`` (a ``prefix:`` name routes model names)."""
    return ENCODERS.register(name, modality=modality)


def route(name: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, extra kwargs)`` of an encoder name, without importing anything.

    A registered name is itself; ``PREFIX:MODEL`` goes to ``PREFIX:`` with ``model_name=MODEL``; a local
    folder goes to ``hf:``. Anything else is returned as is (the lookup then lists the choices).
    """
    prefix, sep, model = name.partition(":")
    family = f"{prefix}:" if sep and model else None
    if name in BUILTIN:
        return name, {}
    if family in BUILTIN:
        return family, {"model_name": model}
    if name and Path(name).expanduser().is_dir():
        return "hf:", {"model_name": name}
    if name in ENCODERS:  # registered by another module (imports every encoder module to find out)
        return name, {}
    if family and family in ENCODERS:
        return family, {"model_name": model}
    return name, {}


def resolve(name: str) -> tuple[str, Callable[..., Encoder], dict[str, Any]]:
    """``(modality, factory, extra kwargs)`` for an encoder name; an unknown name is an
    :class:`~mmcli.pipeline.errors.InputError` listing the choices. Imports only the module of that name."""
    key, extra = route(name)
    entry = ENCODERS.entry(key)
    return entry.meta["modality"], entry.obj, extra


def create_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build a registered encoder, e.g. ``create_encoder("timm:resnet18", weights="w.safetensors")``."""
    _, factory, extra = resolve(name)
    return factory(**extra, **kwargs)


def list_encoders(modality: str | None = None) -> list[str]:
    """Registered names (``prefix:`` entries stand for families), optionally of one modality."""
    return ENCODERS.names(**({"modality": modality} if modality else {}))
