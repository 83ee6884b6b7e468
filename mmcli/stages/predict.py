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

import numpy as np
import pandas as pd

from mmcli.heads.base import read_model_config
from mmcli.heads.data import STORE_SOURCE, TABLE_SOURCE, ModalitySpec, Source, load_cohort
from mmcli.heads.evaluation.evidence import Postprocess
from mmcli.heads.registry import load_head
from mmcli.heads.targets import read_labels
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import disk_full_as_error, write_csv
from mmcli.pipeline.rundir import damaged, resolve_model_dir
from mmcli.pipeline.store import FeatureStore, open_store
from mmcli.stages.fit import attention_frame, batch_covariates, prediction_frame


def predict(
    model_dir: str | Path,
    store: str | Path,
    out_csv: str | Path,
    attention: bool = False,
    patients: Sequence[str] | None = None,
    covariates: str | Path | pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Score every patient in ``store`` the model can use (all its modalities, or any of them: head policy).

    Returns the written predictions. Raises InputError for an encoder or feature-dim mismatch between the
    model and the store (naming the modality, the expected and the found values; the head checks them).
    A batch-corrected model reads each patient's batch (and protected covariates) from ``covariates`` (a CSV
    with patient_id, like the labels) or else from a store table; patients whose batch the model has not seen
    are left uncorrected and marked in the ``batch_corrected`` column.
    """
    out_csv = _check_out(Path(out_csv))
    mdir = resolve_model_dir(model_dir)
    config = read_model_config(mdir)  # raises a clear error when it is no model folder
    head = load_head(mdir)
    run = config.get("run", {})
    specs = head.spec_
    fs = open_store(Path(store), "r")
    # the head checks encoder ids and feature dims, and puts table columns in the model's order
    cohort = head.align(load_cohort(fs, _sources(fs, specs), patients))
    keep = np.flatnonzero(type(head).usable_patients(cohort.presence()))
    if len(keep) == 0:
        raise InputError(f"{fs.path}: no patient has the model's modalities {[s.name for s in specs]}.")
    cohort = cohort.subset(keep)
    params = head.get_params()
    if params.get("batch_correct", "none") != "none":
        table = (read_labels(covariates) if covariates is not None
                 else pd.DataFrame(index=pd.Index([], name="patient_id")))
        cohort.covariates = batch_covariates(table, fs, params)
    pred = head.predict(cohort)
    classes = run.get("classes") or [str(i) for i in range(head.n_classes)]
    if pred.ndim == 2 and len(classes) != pred.shape[1]:
        raise damaged(mdir / "config.json", f"its \"run\" block lists {len(classes)} classes {classes[:5]}, the "
                      f"model predicts {pred.shape[1]}")
    post = Postprocess.load(mdir)
    if not head.is_survival:
        pred = post.calibrate(pred)
    df = prediction_frame(cohort.patients, pred, run.get("problem") or head.task, classes)
    decisions = None if head.is_survival else post.decisions(pred)
    if decisions is not None:
        df["decision"] = decisions
    names = cohort.names
    df["missing_modalities"] = [";".join(n for n, ok in zip(names, row) if not ok) for row in cohort.presence()]
    if cohort.covariates is not None:
        seen = {b for p in head.preprocessors_.values() if getattr(p, "harmoniser", None) is not None
                for b in p.harmoniser.batches_}
        batch = cohort.covariates.reindex(cohort.patients)[params["batch_column"]]
        df["batch_corrected"] = [pd.notna(b) and str(b) in seen for b in batch]
    with _writing(out_csv):
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(out_csv, df)
    if attention:
        att = head.attention(cohort)
        if not att:
            raise InputError(f"head {config['head']!r} has no tile attention. Fix: drop --attention, or use "
                             "attention_mil / fusion_mlp with pool=attention.")
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


def _sources(fs: FeatureStore, specs: Sequence[ModalitySpec]) -> list[Source]:
    """Where to read each model modality: the store must hold it (a table, or features of the model's encoder).
    Whether the features fit the model (dims, table columns) is the head's check (``Head.align``)."""
    sources = []
    mods, tables = fs.modalities(), fs.tables()
    for s in specs:
        if s.source == TABLE_SOURCE:
            if s.name not in tables:
                raise InputError(f"{fs.path}: the model needs table {s.name!r}; the store has tables {tables}. "
                                 f"Fix: `mmcli extract --modality tabular --name {s.name}` into this store.")
            sources.append(Source(s.name, TABLE_SOURCE, None))
            continue
        if s.name not in mods:
            raise InputError(f"{fs.path}: the model needs modality {s.name!r}; the store has {mods}. "
                             f"Fix: extract {s.name} into this store.")
        encs = fs.encoders(s.name)
        if s.encoder_id not in encs:
            raise InputError(f"{fs.path}: modality {s.name!r}: the model was fit on encoder_id {s.encoder_id!r}, "
                             f"the store has {encs}. Fix: extract {s.name} with the model's encoder and settings.")
        sources.append(Source(s.name, STORE_SOURCE, s.encoder_id))
    return sources
