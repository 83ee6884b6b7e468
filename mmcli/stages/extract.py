"""``mmcli extract``: stage 1 for one modality of a cohort manifest, through the shared runner.

Each manifest modality maps to a ``make_spec`` factory (``"module:callable"``) that validates that modality's
options and returns an :class:`~mmcli.features.runner.ExtractorSpec`. Adding a modality is one entry in
:data:`MODALITY_SPECS` (or :func:`register_modality`), not a branch in the CLI.
"""
from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcli.features.runner import ExtractorSpec, RunSummary, run_extraction
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import Manifest, load_manifest

MODALITY_SPECS: dict[str, str] = {
    "wsi": "mmcli.features.wsi:make_spec",
    "mri": "mmcli.features.mri:make_spec",
    "text": "mmcli.features.text:make_spec",
}
# what the progress bar counts inside one item, per modality
UNITS: dict[str, str] = {"wsi": "tile", "mri": "step", "text": "note"}


class ModalityNotAvailable(InputError, NotImplementedError):
    """No extractor is registered for the requested modality."""


def register_modality(modality: str, target: str, unit: str = "item") -> None:
    """Register ``target`` (``"module:make_spec"``) as the spec factory of ``modality``."""
    MODALITY_SPECS[modality] = target
    UNITS[modality] = unit


def spec_factory(modality: str) -> Callable[..., ExtractorSpec]:
    if modality not in MODALITY_SPECS:
        raise ModalityNotAvailable(
            f"--modality {modality!r}: no extractor for it in this build; choose one of {sorted(MODALITY_SPECS)}.")
    mod, _, name = MODALITY_SPECS[modality].partition(":")
    return getattr(importlib.import_module(mod), name)


def make_spec(modality: str, store: str | Path, **options: Any) -> ExtractorSpec:
    """Build the spec of ``modality`` from the options that were given (``None`` means "not given").

    An option that this modality does not take is a usage error naming the option.
    """
    factory = spec_factory(modality)
    params = inspect.signature(factory).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(k for k in given if k not in params)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise InputError(f"{flags} does not apply to --modality {modality}. Fix: remove it.")
    if "store" in params:
        given["store"] = str(store)
    return factory(**given)


def extract(
    modality: str,
    manifest: str | Path | Manifest,
    store: str | Path,
    *,
    force: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    **options: Any,
) -> RunSummary:
    """Extract every ``modality`` row of ``manifest`` into ``store``; returns the run summary.

    The whole manifest is validated first (unsafe or duplicate ids stop the run with :class:`InputError`,
    exit 2, before any work). Rows of other modalities are ignored; rows whose file is missing are reported.
    ``scheduler``: None = in this process, ``"local"`` = a dask LocalCluster of ``workers`` processes, or the
    address of a running dask scheduler. ``options`` go to the modality's ``make_spec``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub unless the user allows it
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    spec_factory(modality)  # unknown modality: fail before touching the store
    if scheduler == "local" and workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if scheduler == "local" and "torch_threads" in inspect.signature(spec_factory(modality)).parameters:
        # dask starts workers with OMP_NUM_THREADS=1; share the cores between the worker processes instead
        n = workers or os.cpu_count() or 1
        options.setdefault("torch_threads", max(1, (os.cpu_count() or 1) // n))
    return run_extraction(  # the spec (and its encoder) is only built when some file exists
        m.for_modality(modality), lambda: make_spec(modality, store, **options), store, force=force,
        scheduler=scheduler, workers=workers, missing=m.missing_for(modality), progress=progress,
        unit=UNITS.get(modality, "item"), modality=modality,
    )


def ingest_table(table: str | Path, name: str, store: str | Path, **options: Any) -> Any:
    """``extract --modality tabular``: one omics/clinical CSV into ``/tabular/<name>`` (NaN kept, categoricals
    encoded); see :func:`mmcli.features.tabular.ingest_table` for ``options``."""
    from mmcli.features.tabular import ingest_table as _ingest

    return _ingest(table, name, store, **options)


def summary_lines(summary: RunSummary) -> list[str]:
    """Human-readable end-of-run summary: counts, the first failures with their reasons, warnings, why the run
    stopped early, the run record (see :meth:`RunSummary.lines`)."""
    return summary.lines()
