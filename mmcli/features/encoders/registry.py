"""One registry for every frozen encoder (timm-style: names that explain themselves and a factory).

Modules that define encoders register a factory under a name with :func:`register_encoder`;
``create_encoder("resnet50_trunc", ...)`` builds it. A name with a ``prefix:`` (``timm:vit_small_patch16_224``,
``timm:hf-hub:ORG/NAME``, ``hf:NAME``) is routed to the factory registered for that prefix with the rest of the
name as ``model_name``; a local model folder is a text encoder (``hf:FOLDER``).

Each name is written once, in its module's ``@register_encoder("name", modality)`` decorator; the registry ties
it to that module by reading the modules' source (:meth:`Registry.scan`), so looking up ``resnet50_trunc``
imports the image encoders only, never the volume or text ones (nor torch before it is needed).
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
        """This encoder's own id: ``<name>-<hash>`` of its weights and every parameter that changes its output
        (preprocessing, pooling, the precision it computes in). Not always the store key: each modality computes
        the key of its features from its own parameters (WSI: :meth:`params` plus the tiling; MRI and text: the
        encoder, weights and preprocessing, their float precision recorded per item)."""

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
# name -> module, read from the @register_encoder("name", ...) decorators of this package (nothing imported)
ENCODERS.scan(Path(__file__).parent, __package__ or "mmcli.features.encoders", "register_encoder")


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
    declared = ENCODERS.lazy_names()
    if name in declared:
        return name, {}
    if family in declared:
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
