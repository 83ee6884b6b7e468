"""The head registry: ``--head NAME`` -> head class (timm-style: one registry, names declared once).

A head module in :mod:`mmcli.heads.models` registers its class with ``@register_head("name")``; that decorator
is the only place the name is written. The lazy table (name -> module) is derived from the decorators by
reading the modules' source, so looking ``xgboost`` up imports the xgboost head only, never torch.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mmcli.pipeline.registry import Registry

if TYPE_CHECKING:  # the registry itself is light: `HEADS.declared()` serves help texts without numpy
    from mmcli.heads.base import Head

H = TypeVar("H", bound="Head")

HEADS: Registry[type[Head]] = Registry("head", flag="--head")
HEADS.scan(Path(__file__).parent / "models", "mmcli.heads.models", "register_head")


def register_head(name: str, **meta: Any) -> Callable[[type[H]], type[H]]:
    """Class decorator: make a head available as ``--head NAME`` (its policy is read from the class)."""

    def deco(cls: type[H]) -> type[H]:
        cls.name = name
        HEADS.add(name, cls, tasks=cls.tasks, input_kind=cls.input_kind, **meta)
        return cls

    return deco


def list_heads() -> list[str]:
    return HEADS.names()


def head_class(name: str) -> type[Head]:
    """The class of head ``name``, importing only the module that defines it."""
    return HEADS.get(name)


def create_head(name: str, **params: Any) -> Head:
    """Instantiate head ``name`` with ``params``, validated by its :attr:`Head.Params` model (unknown parameters
    are an InputError listing the valid ones)."""
    return head_class(name)(**params)


def load_head(path: str | Path) -> Head:
    """Load any saved head: the class comes from ``config.json``'s ``head``."""
    from mmcli.heads.base import read_model_config

    return head_class(read_model_config(path).get("head", "")).load(path)
