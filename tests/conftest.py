"""Shared test setup: small thread counts (2-core CI), no network, headless plotting; and the session-wide WSI
cohort with its clean reference extraction, built once for the crash, concurrency, cluster, repair and fuzz tests.

Test helpers are the package ``helpers`` (``tests/`` is on ``sys.path`` through ``pythonpath`` in pyproject.toml).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "2")

from collections.abc import Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

CLEAN = "clean.zarr"  # the reference store's name beside the cohort's manifest (with its .runs/.locks/.qc)


def _unchanged(folder: Path, before: dict[str, str], what: str, mine) -> None:
    from helpers.wsi_runs import tree_digest

    after = {k: v for k, v in tree_digest(folder).items() if mine(k)}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared {what} (copy it first: copy_wsi_cohort): {changed[:10]}"


def _is_store(rel: str) -> bool:
    return rel.split(os.sep, 1)[0].startswith(CLEAN)


@pytest.fixture(scope="session")
def wsi_cohort(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``manifest.csv`` of the 5-slide cohort (``helpers.wsi_runs.write_cohort``: ``S<i>.svs`` of patients
    ``P<i>``, item ``a``), written once per session. Shared: read it and extract into your own folder; a test
    that must change the folder works on ``copy_wsi_cohort``. Any change fails the session at teardown."""
    from helpers.wsi_runs import COHORT_SIZE, tree_digest, write_cohort

    manifest = write_cohort(tmp_path_factory.mktemp("wsi_cohort"), COHORT_SIZE)
    before = {k: v for k, v in tree_digest(manifest.parent).items() if not _is_store(k)}
    yield manifest
    _unchanged(manifest.parent, before, "WSI cohort", lambda k: not _is_store(k))


@pytest.fixture(scope="session")
def wsi_clean_store(wsi_cohort: Path) -> Iterator[Path]:
    """The clean reference extraction of ``wsi_cohort`` (``helpers.wsi_runs.OPTS``, in process, ``THREADS``
    torch threads): ``clean.zarr`` beside the manifest, built once per session. Read-only, like the cohort."""
    from helpers.wsi_runs import COHORT_SIZE, extract_in_process, items, tree_digest

    store = wsi_cohort.parent / CLEAN
    r = extract_in_process(wsi_cohort, store)
    assert r.exit_code == 0, r.output
    assert len(items(store)) == COHORT_SIZE
    before = {k: v for k, v in tree_digest(wsi_cohort.parent).items() if _is_store(k)}
    yield store
    _unchanged(wsi_cohort.parent, before, "clean reference store", _is_store)


@pytest.fixture(scope="session")
def wsi_clean(wsi_clean_store: Path) -> Mapping:
    """Items of the clean reference extraction, (patient_id, item_id) -> (features, coords, attrs); read-only."""
    from helpers.wsi_runs import frozen_items

    return frozen_items(wsi_clean_store)


@pytest.fixture(scope="module")
def copy_wsi_cohort(wsi_clean_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the cohort folder with its ``clean.zarr`` (for a module that writes beside the
    manifest); returns the copy's manifest. Copying is milliseconds; the extraction is not redone."""
    import shutil

    dest = tmp_path_factory.mktemp("wsi_cohort_copy") / "cohort"
    shutil.copytree(wsi_clean_store.parent, dest)
    return dest / "manifest.csv"
