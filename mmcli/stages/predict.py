"""``mmcli predict``: score the patients of a feature store with a saved model (CPU).

Output CSV: ``patient_id`` + ``y_pred,prob_<class>...`` (classification) or ``risk`` (survival; log hazard
ratio, higher = shorter survival), then ``missing_modalities`` (``;``-separated names the patient lacks,
empty when complete; only fusion_mlp, xgboost and cox predict with missing modalities). With
``attention=True`` also ``<out stem>.attention.csv``: ``patient_id,item_id,index,attention`` where
``index`` is the row in that item's features (with several bag modalities: one
``<out stem>.attention.<modality>.csv`` each).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmcli.heads.base import load_head, read_model_config
from mmcli.heads.data import STORE_SOURCE, TABLE_SOURCE, Cohort, ModalitySpec, Source, load_cohort
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_csv
from mmcli.pipeline.rundir import resolve_model_dir
from mmcli.pipeline.store import FeatureStore, open_store
from mmcli.stages.fit import attention_frame, prediction_frame


def predict(
    model_dir: str | Path,
    store: str | Path,
    out_csv: str | Path,
    attention: bool = False,
    patients: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Score every patient in ``store`` that has the model's modalities (fusion/xgboost/cox: any of them).

    Returns the written predictions. Raises InputError for an encoder or feature-dim mismatch between the
    model and the store (naming the modality, the expected and the found values).
    """
    mdir = resolve_model_dir(model_dir)
    config = read_model_config(mdir)  # raises a clear error when it is no model folder
    head = load_head(mdir)
    run = config.get("run", {})
    specs = [ModalitySpec.from_json(s) for s in config["modalities"]]
    fs = open_store(Path(store), "r")
    sources = _check_store(fs, specs)
    cohort = load_cohort(fs, sources, patients)
    cohort = _align_tables(cohort, specs)
    pres = cohort.presence()
    needs_all = config["head"] == "attention_mil"
    keep = np.flatnonzero(pres.all(axis=1) if needs_all else pres.any(axis=1))
    if len(keep) == 0:
        raise InputError(f"{fs.path}: no patient has the model's modalities {[s.name for s in specs]}.")
    cohort = cohort.subset(keep)
    task = run.get("problem") or config["params"].get("task")
    pred = head.predict(cohort)
    df = prediction_frame(cohort.patients, pred, task, run.get("classes") or _default_classes(config))
    names = cohort.names
    df["missing_modalities"] = [";".join(n for n, ok in zip(names, row) if not ok) for row in cohort.presence()]
    out_csv = Path(out_csv)
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
            write_csv(out_csv.with_name(out_csv.stem + suffix), attention_frame(cohort.patients, items, values))
    return df


def _default_classes(config: dict) -> list[str]:
    return [str(i) for i in range(int(config["params"].get("n_classes", 2)))]


def _check_store(fs: FeatureStore, specs: Sequence[ModalitySpec]) -> list[Source]:
    """Every model modality must exist in the store with the model's encoder id and feature dim."""
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
        dim = _first_dim(fs, s)
        if dim is not None and dim != s.dim:
            raise InputError(f"{fs.path}: modality {s.name!r}: feature dim mismatch, the model expects {s.dim}, "
                             f"found {dim}. Fix: use features from the model's encoder ({s.encoder_id}).")
        sources.append(Source(s.name, STORE_SOURCE, s.encoder_id))
    return sources


def _first_dim(fs: FeatureStore, s: ModalitySpec) -> int | None:
    """Feature dim of the first complete item (``dim`` attr written by the store), None when there is none."""
    for key in fs.iter_items(s.name, s.encoder_id):
        return int(fs.read_item(key.modality, key.encoder_id, key.patient_id, key.item_id).attrs["dim"])
    return None


def _align_tables(cohort: Cohort, specs: Sequence[ModalitySpec]) -> Cohort:
    """Reorder table columns to the model's order; missing columns are an InputError naming them."""
    for s in specs:
        if s.source != TABLE_SOURCE or s.columns is None:
            continue
        m = cohort.modalities[s.name]
        got = list(m.spec.columns or ())
        if got == list(s.columns):
            continue
        missing = [c for c in s.columns if c not in got]
        if missing:
            raise InputError(f"table {s.name!r} lacks the model's columns {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}. Fix: ingest the same table layout.")
        assert m.vectors is not None
        order = [got.index(c) for c in s.columns]
        from dataclasses import replace

        m2 = replace(m, spec=replace(m.spec, dim=len(order), columns=tuple(s.columns)), vectors=m.vectors[:, order])
        m2.present = ~np.isnan(m2.vectors).all(axis=1)
        cohort.modalities[s.name] = m2
    return cohort
