"""Reading a cohort from the store: tables and vector modalities into memory, bag modalities behind a
:class:`~mmcli.heads.data.bags.BagList` under a memory budget.

The first pass (``scan=True``, what ``fit`` and ``evaluate`` do) reads every item once, in threads (decompression
releases the GIL): it hashes what was used into ``features_sha256`` (modality, encoder, patient, item id,
dtype, shape and the values: each item's recorded CRC-32C of its features, which the read has just checked
against the bytes, or the bytes themselves for items written before checksums; a fixed order, for audit), keeps
each bag's mean (for the heads that pool bags) and
leaves in the cache the bags that fit the budget. ``scan=False`` (a dask worker, one patient of ``serve``)
reads only metadata until a bag is used.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mmcli.heads.data.bags import MAX_BATCH_BYTES, BagCache, BagList, StoreBags
from mmcli.heads.data.cohort import BAG_MODALITIES, STORE_SOURCE, TABLE_SOURCE, Cohort, ModalityData, ModalitySpec
from mmcli.heads.data.sources import Source
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import FeatureStore

# kept out of the bag cache for the batches being built (padded inputs, sampled rows)
WORKING_RESERVE = 2 * MAX_BATCH_BYTES


def load_cohort(
    store: FeatureStore,
    sources: Sequence[Source],
    patients: Sequence[str] | None = None,
    n_threads: int = 4,
    *,
    memory_budget: int | None = None,
    scan: bool = True,
) -> Cohort:
    """Read ``sources`` for ``patients`` (default: every patient with any of them, sorted).

    ``memory_budget``: bytes the bags may hold in memory (None: no limit, every bag stays once read; the
    CLI's default is a share of the available memory, see :mod:`mmcli.pipeline.scale`). ``scan``: read every
    item once now (hash, bag means, fill the cache) or only when used (see module docstring)."""
    items_per: dict[str, dict[str, list[str]]] = {}
    if patients is None:
        ids: set[str] = set()
        for src in sources:
            if src.source == STORE_SOURCE:
                per: dict[str, list[str]] = {}
                for key in store.iter_items(src.name, src.encoder_id):
                    per.setdefault(key.patient_id, []).append(key.item_id)
                items_per[src.name] = per
                ids |= set(per)
            else:
                ids |= {str(p) for p in store.read_table(src.name).index}
        patients = sorted(ids)
    patients = list(patients)
    for src in sources:
        if src.source == STORE_SOURCE and src.name not in items_per:
            assert src.encoder_id is not None
            items_per[src.name] = {p: [k.item_id for k in store.items_of(src.name, src.encoder_id, p)]
                                   for p in patients}
    cache = BagCache(None if memory_budget is None else max(0, memory_budget - WORKING_RESERVE))
    digest = hashlib.sha256()
    data: dict[str, ModalityData] = {}
    for slot, src in enumerate(sources):
        if src.source == TABLE_SOURCE:
            data[src.name] = _load_table(store, src, patients, digest)
        else:
            data[src.name] = _load_store_modality(store, src, patients, items_per[src.name], n_threads, digest,
                                                  cache, slot, scan)
    return Cohort(patients, data, digest.hexdigest() if scan else "")


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


class _Read:
    """One patient's items of a store modality, as the first pass reads them."""

    def __init__(self) -> None:
        self.feats: list[np.ndarray] = []
        self.info: list[tuple[str, int]] = []
        self.weights: list[np.ndarray | None] = []
        self.has_coords = False
        self.digest = b""
        self.dim: int | None = None

    @property
    def present(self) -> bool:
        return bool(self.info) and sum(n for _, n in self.info) > 0

    def rows(self) -> np.ndarray:
        dtype = np.result_type(*[f.dtype for f in self.feats])
        return np.concatenate(self.feats).astype(dtype, copy=False) if len(self.feats) > 1 else self.feats[0]


def _read_patient(store: FeatureStore, name: str, enc: str, pid: str, ids: list[str]) -> _Read:
    r = _Read()
    h = hashlib.sha256()
    for iid in sorted(ids):
        it = store.read_item(name, enc, pid, iid)
        f = it.features if it.features.dtype in (np.float16, np.float32) else it.features.astype(np.float32)
        r.feats.append(f)
        r.info.append((iid, int(f.shape[0])))
        r.has_coords |= it.coords is not None
        w = it.attrs.get("row_weights")
        if w is not None:
            w = np.asarray(w, dtype=np.float64)
            if w.shape != (f.shape[0],) or not (np.isfinite(w).all() and (w > 0).all()):
                raise InputError(f"{store.path}: /{name}/{enc}/{pid}/{iid}: row_weights must be {f.shape[0]} "
                                 "positive numbers, one per row. Fix: re-extract the item (--force).")
        r.weights.append(w)
        h.update(f"{iid}:{f.dtype}:{f.shape}".encode())
        if w is not None:
            h.update(w.tobytes())
        crc = (it.attrs.get("checksums") or {}).get("features")
        if crc:  # the CRC-32C of these bytes, recorded at writing and checked by read_item: no second pass
            h.update(f"features:{crc}".encode())
        else:  # an item written before checksums: its bytes
            h.update(np.ascontiguousarray(f).tobytes())
    dims = {f.shape[1] for f in r.feats}
    if len(dims) > 1:
        raise InputError(f"{store.path}: /{name}/{enc}/{pid}: items disagree on feature dim {sorted(dims)}. "
                         "Fix: `mmcli store verify`, then re-extract the odd items.")
    r.digest = h.digest()
    r.dim = dims.pop() if dims else None
    return r


def _load_store_modality(store: FeatureStore, src: Source, patients: list[str], items: dict[str, list[str]],
                         n_threads: int, digest: Any, cache: BagCache, slot: int, scan: bool) -> ModalityData:
    name, enc = src.name, src.encoder_id
    assert enc is not None
    if not scan and (name in BAG_MODALITIES or _has_coords(store, name, enc, items)):
        return _lazy_bags(store, src, patients, items, cache, slot)

    def read(pid: str) -> _Read:
        return _read_patient(store, name, enc, pid, items.get(pid, []))

    is_bag_name = name in BAG_MODALITIES
    bag_source: StoreBags | None = None
    if is_bag_name:  # bags: each patient's rows go to the cache (if they fit) as soon as they are read
        bag_source = StoreBags(store, name, enc, patients, [[] for _ in patients], np.float32, cache, slot)

    def read_bag(j: int) -> _Read:
        r = read(patients[j])
        if bag_source is not None and r.present:
            rows = r.rows()
            if not cache.put((slot, j), rows):  # not kept: keep its mean, so pooling never reads it again
                bag_source.means[j] = rows.mean(axis=0, dtype=np.float64)
            r.feats = []  # the cache holds it (or not: then it is read again when used)
        return r

    with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        results = list(pool.map(read_bag, range(len(patients))))
    dims = {r.dim for r in results if r.dim is not None}
    if len(dims) > 1:
        raise InputError(f"{store.path}: modality {name!r} (encoder {enc}) has items of feature dims {sorted(dims)}. "
                         "Fix: `mmcli store verify`, then re-extract the odd items.")
    dim = dims.pop() if dims else int(store.encoder_attrs(name, enc).get("dim", 0))
    is_bag = is_bag_name or any(r.has_coords for r in results)
    present = np.array([r.present for r in results], dtype=bool)
    digest.update(f"store:{name}:{enc}".encode())
    for pid, r in zip(patients, results):
        if r.info:
            digest.update(pid.encode())
            digest.update(r.digest)
    spec = ModalitySpec(name, "bag" if is_bag else "vector", STORE_SOURCE, enc, int(dim))
    if is_bag:
        if bag_source is None:  # a bag modality known only after reading (items with coords): keep what fits
            bag_source = StoreBags(store, name, enc, patients, [[] for _ in patients], np.float32, cache, slot)
            for j, r in enumerate(results):
                if r.present:
                    rows = r.rows()
                    if not cache.put((slot, j), rows):
                        bag_source.means[j] = rows.mean(axis=0, dtype=np.float64)
        bag_source.items = [r.info for r in results]
        bag_source.dtype = _bag_dtype(store, name, enc, patients, results)
        return ModalityData(spec, present, bags=BagList(bag_source), items=[r.info for r in results])
    vectors = np.full((len(patients), dim), np.nan, dtype=np.float32)
    for i, r in enumerate(results):
        if r.present:
            vectors[i] = _items_mean(r.rows(), r.info, r.weights)
    return ModalityData(spec, present, vectors=vectors)


def _bag_dtype(store: FeatureStore, name: str, enc: str, patients: list[str], results: list[_Read]) -> np.dtype:
    """The stored dtype of the modality's features (float16 stays float16)."""
    from mmcli.pipeline.store import ItemKey

    for pid, r in zip(patients, results):
        if r.info:
            dt = np.dtype(store.item_dtype(ItemKey(name, enc, pid, r.info[0][0])))
            return dt if dt in (np.float16, np.float32) else np.dtype(np.float32)
    return np.dtype(np.float32)


def _has_coords(store: FeatureStore, name: str, enc: str, items: dict[str, list[str]]) -> bool:
    """Whether the modality's items carry tile coords (a bag modality), from one item's metadata."""
    for pid, ids in items.items():
        if ids:
            attrs = store.item_attrs(name, enc, pid, sorted(ids)[0]) or {}
            return "coords" in (attrs.get("arrays") or [])
    return False


def _lazy_bags(store: FeatureStore, src: Source, patients: list[str], items: dict[str, list[str]],
               cache: BagCache, slot: int) -> ModalityData:
    """A bag modality from metadata only: item shapes now, data when a bag is used."""
    from mmcli.pipeline.store import ItemKey

    assert src.encoder_id is not None
    info: list[list[tuple[str, int]]] = []
    dims: set[int] = set()
    dtype = np.dtype(np.float32)
    for pid in patients:
        rows = []
        for iid in sorted(items.get(pid, [])):
            key = ItemKey(src.name, src.encoder_id, pid, iid)
            n, d = store.item_shape(key)
            rows.append((iid, n))
            dims.add(d)
            dt = np.dtype(store.item_dtype(key))
            dtype = dt if dt in (np.float16, np.float32) else np.dtype(np.float32)
        info.append(rows)
    if len(dims) > 1:
        raise InputError(f"{store.path}: modality {src.name!r} (encoder {src.encoder_id}) has items of feature "
                         f"dims {sorted(dims)}. Fix: `mmcli store verify`, then re-extract the odd items.")
    dim = dims.pop() if dims else int(store.encoder_attrs(src.name, src.encoder_id).get("dim", 0))
    present = np.array([sum(n for _, n in i) > 0 for i in info], dtype=bool)
    source = StoreBags(store, src.name, src.encoder_id, patients, info, dtype, cache, slot)
    spec = ModalitySpec(src.name, "bag", STORE_SOURCE, src.encoder_id, int(dim))
    return ModalityData(spec, present, bags=BagList(source), items=info)


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
