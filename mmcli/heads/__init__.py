"""Stage-2 heads behind one estimator interface (``fit``, ``predict``, ``save``, ``load``) and a registry.

Built-in heads: ``attention_mil``, ``fusion_mlp``, ``xgboost``, ``cox``. ``create_head(name, **params)``
makes one; ``load_head(dir)`` reloads a saved one; ``register_head(name)`` adds a new head class.
"""
from __future__ import annotations

from mmcli.heads import attention_mil, cox, fusion_mlp, xgboost_head  # noqa: F401  (register the heads)
from mmcli.heads.base import (
    Head,
    create_head,
    head_class,
    list_heads,
    load_head,
    register_head,
    survival_target,
)

__all__ = ["Head", "create_head", "head_class", "list_heads", "load_head", "register_head", "survival_target"]
