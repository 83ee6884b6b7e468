"""Stage 2: heads behind one estimator interface (``fit``, ``predict``, ``save``, ``load``) and a registry.

Layout: ``models/`` (the heads), ``nn/`` (torch machinery), ``preprocess/`` (in-fold vector preprocessing,
ComBat), ``training/`` (cross-validation, the fit procedure and its options, federated, pretraining),
``evaluation/`` (metrics, one bootstrap, calibration, operating point, decision curve, subgroups, drift, the
evidence blocks); ``data.py`` (cohorts, sources), ``targets.py``, ``base.py`` (the interface), ``registry.py``
and ``fitted.py`` (a fitted run: the one way to load and apply one).

Importing this package imports nothing else: the names below load their module on first use, so a light
submodule (``mmcli.heads.training.options``) costs no numpy or pandas, and looking ``xgboost`` up never
imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "HEADS": "mmcli.heads.registry", "create_head": "mmcli.heads.registry", "head_class": "mmcli.heads.registry",
    "list_heads": "mmcli.heads.registry", "load_head": "mmcli.heads.registry",
    "register_head": "mmcli.heads.registry", "Head": "mmcli.heads.base", "HeadParams": "mmcli.heads.base",
    "survival_target": "mmcli.heads.targets",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mmcli.heads' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
