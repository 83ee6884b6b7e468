"""Stage-2 data: a cohort's cached features, read from a feature store into per-patient bags and vectors.

Representation (one :class:`ModalityData` per modality, rows aligned with ``Cohort.patients``):

* **bag** modalities (``wsi``, or any store modality whose items carry tile ``coords``): the rows of all the
  patient's items concatenated in item-id order into one ``(N_i, D)`` bag; ``items`` keeps ``(item_id, rows)``
  so an instance maps back to ``(item_id, index)``. Kept in the stored dtype (float16 stays float16: half
  the memory for large WSI cohorts).
* **vector** store modalities (``mri``, ``text``, ...): the mean of all rows of all the patient's items
  (several MRI sequences) as one ``(D,)`` vector; an item whose attrs carry ``row_weights`` (a note's window
  token counts) is first pooled into one row by that weighted mean, then averaged with the patient's other items.
* **tables** (``/tabular/<name>``, addressed by the table's name): the patient's row; NaN values stay NaN
  (imputed in-fold by the heads).

A patient without data for a modality has ``present=False`` there (a ``None`` bag or a NaN row).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import FeatureStore

BAG_MODALITIES = frozenset({"wsi"})
TABLE_SOURCE = "table"
STORE_SOURCE = "store"


@dataclass(frozen=True)
class ModalitySpec:
    """What a model needs of one modality: where it comes from, its kind and feature dim."""

    name: str
    kind: str  # "bag" | "vector"
    source: str  # "store" | "table"
    encoder_id: str | None  # None for tables
    dim: int
    columns: tuple[str, ...] | None = None  # feature names of a table

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": self.source, "encoder_id": self.encoder_id,
                "dim": self.dim, "columns": list(self.columns) if self.columns is not None else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModalitySpec:
        cols = d.get("columns")
        return cls(d["name"], d["kind"], d["source"], d.get("encoder_id"), int(d["dim"]),
                   tuple(cols) if cols is not None else None)

    def feature_names(self) -> list[str]:
        """Column names ``<modality>:<feature>`` (table columns, else the feature index)."""
        cols = self.columns if self.columns is not None else [str(i) for i in range(self.dim)]
        return [f"{self.name}:{c}" for c in cols]


@dataclass
class ModalityData:
    """One modality of a cohort; row ``i`` belongs to ``Cohort.patients[i]``."""

    spec: ModalitySpec
    present: np.ndarray  # (n,) bool
    bags: list[np.ndarray | None] | None = None  # kind == "bag"
    items: list[list[tuple[str, int]]] | None = None  # kind == "bag": (item_id, rows) in bag order
    vectors: np.ndarray | None = None  # kind == "vector": (n, D) float32, NaN where absent

    def subset(self, idx: np.ndarray) -> ModalityData:
        idx = np.asarray(idx, dtype=int)
        if self.spec.kind == "bag":
            assert self.bags is not None and self.items is not None
            return replace(self, present=self.present[idx], bags=[self.bags[i] for i in idx],
                           items=[self.items[i] for i in idx])
        assert self.vectors is not None
        return replace(self, present=self.present[idx], vectors=self.vectors[idx])

    def pooled(self) -> np.ndarray:
        """(n, D) float32: bags mean-pooled over instances, vectors as they are; NaN rows where absent."""
        if self.spec.kind == "vector":
            assert self.vectors is not None
            return self.vectors
        assert self.bags is not None
        out = np.full((len(self.bags), self.spec.dim), np.nan, dtype=np.float32)
        for i, bag in enumerate(self.bags):
            if bag is not None and len(bag):
                out[i] = bag.mean(axis=0, dtype=np.float64)
        return out


@dataclass
class Cohort:
    """Patients and their modalities (insertion order of ``modalities`` is the model's modality order)."""

    patients: list[str]
    modalities: dict[str, ModalityData]
    features_sha256: str = ""
    covariates: Any = None  # pandas DataFrame indexed by patient_id (batch column, protected covariates) or None

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def names(self) -> list[str]:
        return list(self.modalities)

    def specs(self) -> list[ModalitySpec]:
        return [m.spec for m in self.modalities.values()]

    def subset(self, idx: Sequence[int] | np.ndarray) -> Cohort:
        idx = np.asarray(idx, dtype=int)
        return Cohort([self.patients[i] for i in idx], {k: m.subset(idx) for k, m in self.modalities.items()},
                      self.features_sha256, self.covariates)

    def presence(self) -> np.ndarray:
        """(n, M) bool: modality m present for patient i."""
        if not self.modalities:
            return np.zeros((len(self.patients), 0), dtype=bool)
        return np.stack([m.present for m in self.modalities.values()], axis=1)


# ---- resolving which modalities and encoders to use -----------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A resolved modality: a store modality with its encoder id, or a table."""

    name: str
    source: str
    encoder_id: str | None


def available_modalities(store: FeatureStore) -> list[str]:
    """Store modalities then tables, the default modality list of ``fit``."""
    return list(store.modalities()) + list(store.tables())


def patients_in(fs: Any, sources: Sequence[Source]) -> set[str]:
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


# ---- loading ---------------------------------------------------------------------------------------------
def load_cohort(
    store: FeatureStore,
    sources: Sequence[Source],
    patients: Sequence[str] | None = None,
    n_threads: int = 4,
) -> Cohort:
    """Read ``sources`` for ``patients`` (default: every patient with any of them, sorted).

    Items are read in parallel threads (decompression releases the GIL). ``features_sha256`` hashes every
    byte used (modality, encoder, patient, item id, dtype, shape, values) in a fixed order, for audit.
    """
    per_source: dict[str, dict[str, list[str]]] = {}
    for src in sources:
        if src.source == STORE_SOURCE:
            items: dict[str, list[str]] = defaultdict(list)
            for key in store.iter_items(src.name, src.encoder_id):
                items[key.patient_id].append(key.item_id)
            per_source[src.name] = items
    if patients is None:
        ids: set[str] = set()
        for src in sources:
            if src.source == STORE_SOURCE:
                ids |= set(per_source[src.name])
            else:
                ids |= {str(p) for p in store.read_table(src.name).index}
        patients = sorted(ids)
    patients = list(patients)
    digest = hashlib.sha256()
    data: dict[str, ModalityData] = {}
    for src in sources:
        if src.source == TABLE_SOURCE:
            data[src.name] = _load_table(store, src, patients, digest)
        else:
            data[src.name] = _load_store_modality(store, src, patients, per_source[src.name], n_threads, digest)
    return Cohort(patients, data, digest.hexdigest())


def _load_table(store: FeatureStore, src: Source, patients: list[str], digest: Any) -> ModalityData:
    table = store.read_table(src.name)
    table.index = table.index.astype(str)
    rows = table.reindex(patients)
    values = rows.to_numpy(dtype=np.float32)
    present = ~np.isnan(values).all(axis=1) if values.shape[1] else np.zeros(len(patients), dtype=bool)
    digest.update(f"table:{src.name}:{list(table.columns)}".encode())
    for pid, row, ok in zip(patients, values, present):
        if ok:
            digest.update(pid.encode())
            digest.update(row.tobytes())
    spec = ModalitySpec(src.name, "vector", TABLE_SOURCE, None, int(values.shape[1]),
                        tuple(str(c) for c in table.columns))
    return ModalityData(spec, present, vectors=values)


def _load_store_modality(
    store: FeatureStore, src: Source, patients: list[str], items: dict[str, list[str]], n_threads: int,
    digest: Any,
) -> ModalityData:
    name, enc = src.name, src.encoder_id
    assert enc is not None

    def read(pid: str) -> tuple[np.ndarray | None, list[tuple[str, int]], bool, bytes, list[np.ndarray | None]]:
        ids = sorted(items.get(pid, []))
        if not ids:
            return None, [], False, b"", []
        feats, info, has_coords, h, weights = [], [], False, hashlib.sha256(), []
        for iid in ids:
            it = store.read_item(name, enc, pid, iid)
            f = it.features if it.features.dtype in (np.float16, np.float32) else it.features.astype(np.float32)
            feats.append(f)
            info.append((iid, int(f.shape[0])))
            has_coords |= it.coords is not None
            w = it.attrs.get("row_weights")
            if w is not None:
                w = np.asarray(w, dtype=np.float64)
                if w.shape != (f.shape[0],) or not (np.isfinite(w).all() and (w > 0).all()):
                    raise InputError(f"{store.path}: /{name}/{enc}/{pid}/{iid}: row_weights must be {f.shape[0]} "
                                     "positive numbers, one per row. Fix: re-extract the item (--force).")
            weights.append(w)
            h.update(f"{iid}:{f.dtype}:{f.shape}".encode())
            if w is not None:
                h.update(w.tobytes())
            h.update(np.ascontiguousarray(f).tobytes())
        dims = {f.shape[1] for f in feats}
        if len(dims) > 1:
            raise InputError(f"{store.path}: /{name}/{enc}/{pid}: items disagree on feature dim {sorted(dims)}. "
                             "Fix: `mmcli store verify`, then re-extract the odd items.")
        dtype = np.result_type(*[f.dtype for f in feats])
        bag = np.concatenate(feats).astype(dtype, copy=False) if len(feats) > 1 else feats[0]
        return bag, info, has_coords, h.digest(), weights

    with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        results = list(pool.map(read, patients))
    dims = {r[0].shape[1] for r in results if r[0] is not None}
    if len(dims) > 1:
        raise InputError(f"{store.path}: modality {name!r} (encoder {enc}) has items of feature dims {sorted(dims)}. "
                         "Fix: `mmcli store verify`, then re-extract the odd items.")
    dim = dims.pop() if dims else int(store.encoder_attrs(name, enc).get("dim", 0))
    is_bag = name in BAG_MODALITIES or any(r[2] for r in results)
    present = np.array([r[0] is not None and len(r[0]) > 0 for r in results], dtype=bool)
    digest.update(f"store:{name}:{enc}".encode())
    for pid, r in zip(patients, results):
        if r[0] is not None:
            digest.update(pid.encode())
            digest.update(r[3])
    spec = ModalitySpec(name, "bag" if is_bag else "vector", STORE_SOURCE, enc, int(dim))
    if is_bag:
        return ModalityData(spec, present, bags=[r[0] for r in results], items=[r[1] for r in results])
    vectors = np.full((len(patients), dim), np.nan, dtype=np.float32)
    for i, r in enumerate(results):
        if r[0] is not None and len(r[0]):
            vectors[i] = _items_mean(r[0], r[1], r[4])
    return ModalityData(spec, present, vectors=vectors)


def _items_mean(rows: np.ndarray, info: list[tuple[str, int]], weights: list[np.ndarray | None]) -> np.ndarray:
    """A patient's vector: the mean of its items' rows, an item with ``row_weights`` first pooled into one row by
    their weighted mean (float64, then float32: the formula a text item's one embedding was stored with)."""
    if all(w is None for w in weights):
        return rows.mean(axis=0, dtype=np.float64)
    pooled, start = [], 0
    for (_, n), w in zip(info, weights):
        f = rows[start:start + n]
        start += n
        if w is None:
            pooled.append(f)
        else:
            pooled.append(((f * w[:, None]).sum(0) / w.sum()).astype(np.float32)[None, :])
    return np.concatenate(pooled).mean(axis=0, dtype=np.float64)


# ---- mini-batches ----------------------------------------------------------------------------------------
def pad_bags(
    bags: Sequence[np.ndarray | None],
    dim: int,
    max_instances: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bags into ``(B, N_max, D)`` float32 with a ``(B, N_max)`` bool mask (True = real instance).

    With ``max_instances`` and ``rng``, a bag longer than ``max_instances`` is replaced by a random subset of
    that size (training-time instance sampling, a standard MIL augmentation that bounds the cost of a step).
    A missing bag gives one masked, all-zero row.
    """
    chosen: list[np.ndarray] = []
    for bag in bags:
        if bag is None or len(bag) == 0:
            chosen.append(np.zeros((0, dim), dtype=np.float32))
        elif max_instances is not None and rng is not None and len(bag) > max_instances:
            idx = np.sort(rng.choice(len(bag), size=max_instances, replace=False))
            chosen.append(bag[idx])
        else:
            chosen.append(bag)
    n_max = max(1, max(len(b) for b in chosen))
    x = np.zeros((len(chosen), n_max, dim), dtype=np.float32)
    mask = np.zeros((len(chosen), n_max), dtype=bool)
    for i, b in enumerate(chosen):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask
