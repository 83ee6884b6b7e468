"""``mmcli predict``: score the patients of a feature store with a saved model (CPU).

Output CSV: ``patient_id`` + ``y_pred,prob_<class>...`` (classification) or ``risk`` (survival; log hazard
ratio, higher = shorter survival), then ``missing_modalities`` (``;``-separated names the patient lacks,
empty when complete; only heads that do not need every modality, see
:attr:`~mmcli.heads.base.Head.needs_every_modality`, score patients with missing modalities). With
``attention=True`` also ``<out stem>.attention.csv``: ``patient_id,item_id,index,attention`` where
``index`` is the row in that item's features (with several bag modalities: one
``<out stem>.attention.<modality>.csv`` each).

A model fitted with ``--calibrate`` outputs recalibrated probabilities (its ``postprocess.json``); one fitted
with ``--operating-point`` adds a ``decision`` column (``classes[1]`` where P(classes[1]) >= the stored
threshold, else ``classes[0]``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from mmcli.heads.fitted import FittedModel
from mmcli.heads.targets import read_labels
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import disk_full_as_error, write_csv
from mmcli.pipeline.rundir import attention_frame
from mmcli.pipeline.scale import resolve_budget
from mmcli.pipeline.store import open_store


def predict(
    model_dir: str | Path,
    store: str | Path,
    out_csv: str | Path,
    attention: bool = False,
    patients: Sequence[str] | None = None,
    covariates: str | Path | pd.DataFrame | None = None,
    memory_budget: str | int | None = None,
) -> pd.DataFrame:
    """Score every patient in ``store`` the model can use (all its modalities, or any of them: head policy).

    Returns the written predictions. Raises InputError for an encoder or feature-dim mismatch between the
    model and the store (naming the modality, the expected and the found values; the head checks them).
    A batch-corrected model reads each patient's batch (and protected covariates) from ``covariates`` (a CSV
    with patient_id, like the labels) or else from a store table; patients whose batch the model has not seen
    are left uncorrected and marked in the ``batch_corrected`` column. ``memory_budget``: bytes (or a size such
    as ``"2GB"``) the bags may hold; each bag is read once, when it is scored.
    """
    out_csv = _check_out(Path(out_csv))
    model = FittedModel.load(model_dir)  # a clear error when it is no model folder
    fs = open_store(Path(store), "r")
    table = read_labels(covariates) if covariates is not None else None
    cohort, _ = model.cohort(fs, patients, covariates=table, memory_budget=resolve_budget(memory_budget), scan=False)
    if len(cohort) == 0:
        raise InputError(f"{fs.path}: no patient has the model's modalities {[s.name for s in model.specs]}.")
    df = model.predict_frame(cohort)
    with _writing(out_csv):
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(out_csv, df)
    if attention:
        att = model.attention(cohort)
        for name, values in att.items():
            items = cohort.modalities[name].items
            assert items is not None
            suffix = ".attention.csv" if len(att) == 1 else f".attention.{name}.csv"
            with _writing(out_csv):
                write_csv(out_csv.with_name(out_csv.stem + suffix), attention_frame(cohort.patients, items, values))
    return df


def _check_out(out_csv: Path) -> Path:
    """Refuse an ``--out`` that cannot become a file, before any work: a folder, a path through a file."""
    if out_csv.is_dir():
        raise InputError(f"--out {out_csv}: is a folder. Fix: give a file name, e.g. "
                         f"--out {out_csv / 'predictions.csv'}")
    blocker = next((p for p in out_csv.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"--out {out_csv}: {blocker} is a file, not a folder. Fix: choose another --out.")
    return out_csv


@contextmanager
def _writing(out_csv: Path) -> Iterator[None]:
    """A full disk -> DiskFullError; a folder that cannot be written (permissions, read-only) -> InputError."""
    try:
        with disk_full_as_error(out_csv):
            yield
    except OSError as e:
        raise InputError(f"--out {out_csv}: cannot write there ({e.strerror or e}: {e.filename}). Fix: choose an "
                         "--out in a folder you can write (and that is not read-only).") from e
