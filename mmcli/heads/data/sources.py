"""Which store modalities, encoders and tables a fit reads (:func:`resolve_sources`) or a fitted model needs
(:func:`model_sources`), which patients have them, and the per-patient covariates a head reads.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from mmcli.heads.data.cohort import STORE_SOURCE, TABLE_SOURCE, ModalitySpec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import FeatureStore


@dataclass(frozen=True)
class Source:
    """A resolved modality: a store modality with its encoder id, or a table."""

    name: str
    source: str
    encoder_id: str | None


def available_modalities(store: FeatureStore) -> list[str]:
    """Store modalities then tables, the default modality list of ``fit``."""
    return list(store.modalities()) + list(store.tables())


def patients_in(fs: FeatureStore, sources: Sequence[Source]) -> set[str]:
    """Ids of the patients with features of any of ``sources`` in store ``fs`` (items or table rows)."""
    ids: set[str] = set()
    for s in sources:
        if s.encoder_id is not None:
            ids |= {k.patient_id for k in fs.iter_items(s.name, s.encoder_id)}
        else:
            ids |= {str(p) for p in fs.read_table(s.name).index}
    return ids


def resolve_sources(
    store: FeatureStore, modalities: Sequence[str] | None = None, encoders: dict[str, str] | None = None
) -> list[Source]:
    """Map modality names to store modalities (with one encoder id each) or tables; clear errors otherwise.

    A store modality with several encoder ids needs ``encoders={modality: encoder_id}``.
    """
    store_mods, tables = list(store.modalities()), list(store.tables())
    clash = sorted(set(store_mods) & set(tables))
    names = list(modalities) if modalities else store_mods + tables
    if not names:
        raise InputError(f"{store.path}: the store holds no features or tables. Fix: run `mmcli extract` first.")
    if len(set(names)) != len(names):
        raise InputError(f"modality listed twice in {names}. Fix: list each modality once.")
    encoders = dict(encoders or {})
    unknown_enc = sorted(set(encoders) - set(store_mods))
    if unknown_enc:
        raise InputError(f"encoder given for {unknown_enc}, which are not store modalities (store: {store_mods}).")
    out: list[Source] = []
    for name in names:
        if name in clash:
            raise InputError(f"{store.path}: {name!r} is both a store modality and a table. "
                             "Fix: re-ingest the table under another --name.")
        if name in tables:
            out.append(Source(name, TABLE_SOURCE, None))
            continue
        if name not in store_mods:
            raise InputError(f"{store.path}: no modality or table named {name!r}. "
                             f"Fix: choose from modalities {store_mods} and tables {tables}.")
        encs = store.encoders(name)
        if name in encoders:
            if encoders[name] not in encs:
                raise InputError(f"{store.path}: modality {name!r} has no encoder_id {encoders[name]!r}; "
                                 f"it has {encs}.")
            out.append(Source(name, STORE_SOURCE, encoders[name]))
        elif len(encs) == 1:
            out.append(Source(name, STORE_SOURCE, encs[0]))
        else:
            raise InputError(f"{store.path}: modality {name!r} has features from several encoders {encs}. "
                             f"Fix: choose one with encoders={{'{name}': ID}} (CLI: --encoder {name}=ID).")
    return out


def model_sources(fs: FeatureStore, specs: Sequence[ModalitySpec]) -> list[Source]:
    """Where to read each modality of a fitted model: the store must hold it (a table, or features of the
    model's encoder). Whether the features fit the model (dims, table columns) is the head's check
    (:meth:`~mmcli.heads.base.Head.align`)."""
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


def covariates_for(columns: Sequence[str], table: pd.DataFrame, fs: FeatureStore, *,
                   flag: str = "--batch-column/--batch-keep") -> pd.DataFrame | None:
    """Per-patient covariates (e.g. ComBat's batch column and protected columns), indexed by patient_id, each
    column from the labels ``table`` or else from a store table that has it; None when ``columns`` is empty."""
    if not columns:
        return None
    frames = []
    for col in columns:
        if col in table.columns:
            frames.append(table[col])
            continue
        for name in fs.tables():
            t = fs.read_table(name)
            if col in t.columns:
                frames.append(t[col].rename(col).set_axis(t.index.astype(str)))
                break
        else:
            where = table.attrs.get("source", "the labels")
            raise InputError(f"{flag} {col!r}: no such column in {where} ({list(table.columns)}) nor in the "
                             f"store's tables {fs.tables()}. Fix: name a column of the labels file (predict / "
                             "evaluate: pass --covariates FILE or --labels holding it).")
    return pd.concat(frames, axis=1)
