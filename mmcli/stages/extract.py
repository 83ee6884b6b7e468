"""``mmcli extract``: stage 1 for one modality of a cohort manifest, through the shared runner.

Each modality is an entry of :data:`mmcli.features.modalities.MODALITIES`: a ``make_spec`` factory, a typed
options model and the unit its progress bar counts. The options the user gave are validated once, against
that model, before the store is touched. Adding a modality is a module registered there, not a branch here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmcli.features.modalities import MODALITIES, Modality
from mmcli.features.runner import RunSummary, run_extraction
from mmcli.pipeline.errors import InputError, ModalityNotAvailable
from mmcli.pipeline.manifest import Manifest, load_manifest


def modality_of(modality: str) -> Modality:
    """The registered modality (any case, or a declared alias such as ``notes``); an unknown one is
    :class:`ModalityNotAvailable` listing the choices (tables included) and the closest names."""
    try:
        return MODALITIES.get(modality)
    except InputError as e:
        hint = str(e).split(" Fix:")[0].partition(".")[2].strip()
        raise ModalityNotAvailable(
            f"--modality {modality!r}: no extractor for it in this build.{' ' + hint if hint else ''} Fix: choose "
            f"one of {[*MODALITIES.names(), 'tabular']} (tabular: --table CSV or --vcf).") from None


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
    address of a running dask scheduler. ``options`` are the modality's options (its options model's fields).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub unless the user allows it
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    mod = modality_of(modality)  # unknown modality: fail before touching the store
    modality = mod.name
    if scheduler == "local" and workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    opts = mod.build_options(options)  # with the options a preset implies (Modality.implied_options)
    if scheduler == "local" and "torch_threads" in mod.options.fields() and options.get("torch_threads") is None:
        # dask starts workers with OMP_NUM_THREADS=1; share the cores between the worker processes instead
        n = workers or os.cpu_count() or 1
        opts = mod.options.build({**opts.to_json(), "torch_threads": max(1, (os.cpu_count() or 1) // n)})
    rows, missing = mod.rows(m, opts, str(store))
    return run_extraction(  # the spec (and its encoder) is only built when some file exists
        rows, lambda: mod.make_spec(str(store), opts, cohort=rows), store, force=force,  # int8 calibrates on it
        scheduler=scheduler, workers=workers, missing=missing, progress=progress,
        unit=mod.unit, modality=modality,
    )
