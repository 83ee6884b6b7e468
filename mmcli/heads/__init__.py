"""Stage 2: heads behind one estimator interface (``fit``, ``predict``, ``save``, ``load``) and a registry.

Layout: ``models/`` (the heads), ``nn/`` (torch machinery), ``preprocess/`` (in-fold vector preprocessing,
ComBat), ``training/`` (cross-validation, the fit procedure, federated, pretraining), ``evaluation/`` (metrics,
one bootstrap, calibration, operating point, decision curve, subgroups, drift, the evidence blocks);
``data.py`` (cohorts, sources), ``targets.py``, ``base.py`` (the interface), ``registry.py`` and ``fitted.py``
(a fitted run: the one way to load and apply one). Importing this package imports no head.
"""
from __future__ import annotations

from mmcli.heads.base import Head, HeadParams
from mmcli.heads.registry import HEADS, create_head, head_class, list_heads, load_head, register_head
from mmcli.heads.targets import survival_target

__all__ = ["HEADS", "Head", "HeadParams", "create_head", "head_class", "list_heads", "load_head", "register_head",
           "survival_target"]
