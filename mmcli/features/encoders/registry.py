"""One registry for every frozen encoder (timm-style: names that explain themselves and a factory).

Modules that define encoders register a factory under a name; ``create_encoder("resnet50_trunc", ...)``
builds it. A name with a ``prefix:`` (e.g. ``timm:vit_small_patch16_224``) is routed to the factory
registered for that prefix with the rest of the name as ``model_name``.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

_FACTORIES: dict[str, tuple[str, Callable[..., Encoder]]] = {}
# Modules imported lazily on first lookup, so that registering does not import torch at CLI start-up.
_PROVIDERS = (
    "mmcli.features.encoders.image",
    "mmcli.features.encoders.volume",
    "mmcli.features.encoders.text",
)


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


def register_encoder(name: str, modality: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator: register ``factory`` under ``name`` (``prefix:`` names route model names)."""

    def deco(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        _FACTORIES[name] = (modality, factory)
        return factory

    return deco


def _load_providers() -> None:
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a provider exists but a dependency of it is missing: say so
                raise


def resolve(name: str) -> tuple[str, Callable[..., Encoder], dict[str, Any]]:
    """``(modality, factory, extra kwargs)`` for an encoder name; ValueError listing choices if unknown."""
    _load_providers()
    if name in _FACTORIES:
        modality, factory = _FACTORIES[name]
        return modality, factory, {}
    if ":" in name:
        prefix, model = name.split(":", 1)
        if f"{prefix}:" in _FACTORIES and model:
            modality, factory = _FACTORIES[f"{prefix}:"]
            return modality, factory, {"model_name": model}
    raise ValueError(f"unknown encoder {name!r}; choose one of {list_encoders()}")


def create_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build a registered encoder, e.g. ``create_encoder("timm:resnet18", weights="w.safetensors")``."""
    _, factory, extra = resolve(name)
    return factory(**extra, **kwargs)


def list_encoders(modality: str | None = None) -> list[str]:
    _load_providers()
    return sorted(n for n, (m, _) in _FACTORIES.items() if modality is None or m == modality)
