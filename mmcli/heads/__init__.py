"""Stage-2 heads behind one estimator interface (``fit``, ``predict``, ``save``, ``load``) and a registry.

Built-in heads: ``attention_mil``, ``fusion_mlp``, ``xgboost``, ``cox``. ``create_head(name, **params)``
makes one; ``load_head(dir)`` reloads a saved one; ``register_head(name)`` adds a new head class. Importing
this package imports no head: looking a name up imports that head's module only (``xgboost`` needs no torch).
"""
from __future__ import annotations

from mmcli.heads.base import (
    HEADS,
    Head,
    HeadParams,
    create_head,
    head_class,
    list_heads,
    load_head,
    register_head,
    survival_target,
)

__all__ = ["HEADS", "Head", "HeadParams", "create_head", "head_class", "list_heads", "load_head", "register_head",
           "survival_target"]
