"""``mmcli fit``: cross-validate a head on cached features, write the run folder, refit the final model.

The verb: build (or take) one :class:`~mmcli.heads.training.options.FitOptions`, run the fit procedure of
:mod:`mmcli.heads.training.fitting` (which documents the run folder) under SIGINT / SIGTERM handling.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmcli.heads.registry import head_class
from mmcli.heads.training.fitting import fit_run
from mmcli.heads.training.options import FitOptions, build_fit_options
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.signals import stop_on_signals


def fit(
    head: str | None = None,
    store: str | Path | None = None,
    labels: str | Path | pd.DataFrame | None = None,
    out: str | Path | None = None,
    *,
    options: FitOptions | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    **given: Any,
) -> dict[str, Any]:
    """Cross-validate ``head`` by patient, write the run folder ``out`` and return metrics.json's content.

    Pass one validated ``options`` (what the CLI does), or the fields of
    :class:`~mmcli.heads.training.options.FitOptions` as keywords: ``target`` (classification column) or
    ``time`` (> 0, any unit) + ``event`` (1 = observed, 0 = censored); ``modalities``; ``encoders``
    (``{modality: encoder_id}``); ``folds``; ``seed``; ``params`` (the head's ``--param`` values, validated
    once by its Params model); ``n_boot``; ``drop_unmatched``; ``strict_match``; ``explain``; ``overwrite``;
    ``evidence`` (:class:`~mmcli.heads.evaluation.evidence.EvidenceOptions` or a dict); ``memory_budget``;
    ``scheduler`` / ``workers`` (folds as dask tasks); and the head-level
    flags ``impute``, ``batch_correct``, ``batch_column``, ``batch_keep``, ``fusion``, ``init`` (merged into
    ``params``). Errors are InputError naming the flag, raised before anything is written.
    """
    if options is None:
        options = build_fit_options({"head": head, "store": store, "labels": labels, "out": out, **given})
    elif head is not None or store is not None or labels is not None or out is not None or given:
        raise TypeError("pass either options=FitOptions(...) or the options as keywords, not both")
    with stop_on_signals():
        return fit_run(options, log, progress=progress)


# ---- CLI text -> values -------------------------------------------------------------------------------------------
def parse_params(pairs: Sequence[str], head: str | Sequence[str] | None = None) -> dict[str, Any]:
    """``["epochs=20", "fusion=bilinear", "class_weight=null"]`` -> dict; values parsed as JSON, else text.

    With ``head`` (one name or several), the values are checked against each head's parameter model now (an
    unknown key or a bad value is an InputError naming the key and what it accepts); the fit validates them
    into that model once more only when it receives a dict instead of the model.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param epochs=20.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    for name in [head] if isinstance(head, str) else list(head or ()):
        head_class(name).user_params(out)
    return out


def parse_encoders(pairs: Sequence[str]) -> dict[str, str]:
    """``["wsi=resnet50_trunc-abc123"]`` -> ``{"wsi": "resnet50_trunc-abc123"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise InputError(f"--encoder {pair!r}: expected MODALITY=ENCODER_ID, e.g. --encoder wsi=ENCODER_ID.")
        out[key.strip()] = value.strip()
    return out
