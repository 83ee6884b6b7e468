"""Bags of instances (a patient's WSI tiles) read from the feature store under a memory budget.

A :class:`BagList` is what ``ModalityData.bags`` holds: ``bags[i]`` is patient ``i``'s ``(N, D)`` array in the
store's dtype (float16 stays float16; heads cast per batch), or ``None`` when the patient has no bag. Behind it:

* :class:`ArrayBags`: bags already in memory (a request payload, a test cohort);
* :class:`StoreBags`: bags read from the store, one patient's items at a time. What fits in the cohort's
  :class:`BagCache` (a byte budget shared by the cohort's bag modalities, least recently used out first) stays
  there after its first read; beyond it a bag is read again when it is needed, and a training step that samples
  ``max_instances`` rows of a longer bag reads only those rows (:meth:`BagList.rows`, the store's ``read_rows``).
  So peak memory is the budget plus one batch, whatever the number of patients.

Views (:meth:`BagList.subset`, a fold's training patients) share the source and its cache.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mmcli.pipeline.store import ItemKey

# at most this many bytes of float32 padded input in one inference batch (large bags go a few at a time)
MAX_BATCH_BYTES = 64 * 1024 * 1024


class BagCache:
    """Least-recently-used bags up to ``capacity`` bytes (``None``: no limit), shared by a cohort's bag sources.

    Thread-safe (the cohort's first pass reads patients in threads)."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.used = 0
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key: tuple[int, int], arr: np.ndarray) -> bool:
        """Keep ``arr`` if it fits (evicting the least recently used); a bag larger than the budget is not kept.
        Returns whether it was kept."""
        with self._lock:
            if key in self._items:
                return True
            if self.capacity is not None and arr.nbytes > self.capacity:
                return False
            self._items[key] = arr
            self.used += arr.nbytes
            while self.capacity is not None and self.used > self.capacity:
                _, old = self._items.popitem(last=False)
                self.used -= old.nbytes
            return True

    def __len__(self) -> int:
        return len(self._items)


class ArrayBags:
    """Bags held in memory (``None`` = absent)."""

    def __init__(self, bags: Sequence[np.ndarray | None]) -> None:
        self.bags = list(bags)

    def __len__(self) -> int:
        return len(self.bags)

    def length(self, j: int) -> int:
        b = self.bags[j]
        return 0 if b is None else len(b)

    def read(self, j: int) -> np.ndarray | None:
        return self.bags[j]

    def read_rows(self, j: int, rows: np.ndarray) -> np.ndarray:
        b = self.bags[j]
        assert b is not None
        return b[rows]

    def mean(self, j: int) -> np.ndarray | None:
        b = self.bags[j]
        return None if b is None or not len(b) else b.mean(axis=0, dtype=np.float64)


class StoreBags:
    """One bag modality's bags in a feature store: patient ``j`` is the rows of its items ``items[j]``
    (``(item_id, rows)`` in item-id order), concatenated; read through ``cache``.

    ``means`` (float64, per patient) are filled by the cohort's first pass when it reads every bag anyway."""

    def __init__(self, store: Any, modality: str, encoder_id: str, patients: Sequence[str],
                 items: Sequence[list[tuple[str, int]]], dtype: np.dtype, cache: BagCache, slot: int) -> None:
        self.store, self.modality, self.encoder_id = store, modality, encoder_id
        self.patients = list(patients)
        self.items = [list(i) for i in items]
        self.dtype = np.dtype(dtype)
        self.cache, self.slot = cache, slot
        self.means: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.patients)

    def __getstate__(self) -> dict[str, Any]:  # a dask task rebuilds it in the worker from the store path
        state = dict(self.__dict__)
        state["store"] = str(self.store.path)
        state["cache"] = self.cache.capacity
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from mmcli.pipeline.store import open_store

        state = dict(state)
        state["store"] = open_store(state["store"], "r")
        state["cache"] = BagCache(state["cache"])
        self.__dict__.update(state)

    def length(self, j: int) -> int:
        return sum(n for _, n in self.items[j])

    def read(self, j: int) -> np.ndarray | None:
        if not self.items[j]:
            return None
        arr = self.cache.get((self.slot, j))
        if arr is None:
            arr = self.load(j)
            self.cache.put((self.slot, j), arr)
        return arr

    def load(self, j: int) -> np.ndarray:
        """Read patient ``j``'s items whole (each checked against its checksums), concatenated."""
        parts = [self.store.read_item(self.modality, self.encoder_id, self.patients[j], iid).features
                 for iid, _ in self.items[j]]
        parts = [p if p.dtype in (np.float16, np.float32) else p.astype(np.float32) for p in parts]
        return np.concatenate(parts).astype(self.dtype, copy=False) if len(parts) > 1 else parts[0]

    def read_rows(self, j: int, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted) of patient ``j``'s bag: from the cache when the bag is there, else only those
        rows from the store, item by item."""
        cached = self.cache.get((self.slot, j))
        if cached is not None:
            return cached[rows]
        out, start = [], 0
        for iid, n in self.items[j]:
            local = rows[(rows >= start) & (rows < start + n)] - start
            if len(local):
                key = ItemKey(self.modality, self.encoder_id, self.patients[j], iid)
                out.append(self.store.read_rows(key, local).astype(self.dtype, copy=False))
            start += n
        return np.concatenate(out) if len(out) > 1 else out[0]

    def mean(self, j: int) -> np.ndarray | None:
        if j not in self.means:
            bag = self.read(j)
            if bag is None or not len(bag):
                return None
            self.means[j] = bag.mean(axis=0, dtype=np.float64)
        return self.means[j]


class BagList(Sequence):
    """Patients' bags as a read-only sequence (``bags[i]`` -> ``(N, D)`` array or None); see module docstring."""

    def __init__(self, source: ArrayBags | StoreBags, index: np.ndarray | None = None) -> None:
        self.source = source
        self.index = np.arange(len(source)) if index is None else np.asarray(index, dtype=int)

    @classmethod
    def of(cls, bags: BagList | Sequence[np.ndarray | None]) -> BagList:
        """``bags`` as a BagList (a list of arrays is wrapped as in-memory bags)."""
        return bags if isinstance(bags, BagList) else cls(ArrayBags(bags))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> np.ndarray | None:  # type: ignore[override]
        if isinstance(k, slice):
            raise TypeError("use BagList.subset(indices) for several bags")
        return self.source.read(int(self.index[k]))

    def __iter__(self) -> Iterator[np.ndarray | None]:
        for j in self.index:
            yield self.source.read(int(j))

    def subset(self, idx: Sequence[int] | np.ndarray) -> BagList:
        return BagList(self.source, self.index[np.asarray(idx, dtype=int)])

    def length(self, k: int) -> int:
        """Instances in bag ``k`` (0 when absent), without reading it."""
        return self.source.length(int(self.index[k]))

    def lengths(self) -> np.ndarray:
        return np.array([self.source.length(int(j)) for j in self.index], dtype=np.int64)

    def rows(self, k: int, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) of bag ``k``, reading only those when the bag is not in memory."""
        return self.source.read_rows(int(self.index[k]), np.asarray(rows))

    def sample(self, k: int, n: int, rng: np.random.Generator) -> np.ndarray | None:
        """Bag ``k``, or ``n`` of its rows drawn without replacement (in row order) when it is longer."""
        m = self.length(k)
        if m == 0:
            return None
        if m <= n:
            return self[k]
        return self.rows(k, np.sort(rng.choice(m, size=n, replace=False)))

    def mean(self, k: int) -> np.ndarray | None:
        """The bag's mean over instances (float64), or None when absent or empty."""
        return self.source.mean(int(self.index[k]))


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
    bl = BagList.of(bags)
    return pad_batch(bl, np.arange(len(bl)), dim, max_instances, rng)


def pad_batch(bags: BagList, idx: Sequence[int] | np.ndarray, dim: int, max_instances: int | None = None,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pad_bags` for bags ``idx`` of a :class:`BagList`: with sampling, only the sampled rows of a bag
    that is not in memory are read (the same draws as sampling the whole bag)."""
    chosen: list[np.ndarray] = []
    for k in idx:
        if max_instances is not None and rng is not None:
            bag = bags.sample(int(k), max_instances, rng)
        else:
            bag = bags[int(k)]
        chosen.append(np.zeros((0, dim), dtype=np.float32) if bag is None or not len(bag) else bag)
    n_max = max(1, max(len(b) for b in chosen))
    x = np.zeros((len(chosen), n_max, dim), dtype=np.float32)
    mask = np.zeros((len(chosen), n_max), dtype=bool)
    for i, b in enumerate(chosen):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


def inference_batches(counts: np.ndarray, batch_size: int, dim: int,
                      max_bytes: int = MAX_BATCH_BYTES) -> list[np.ndarray]:
    """Patient indices in batches for inference: by instance count (little padding), at most ``batch_size``
    patients and about ``max_bytes`` of padded float32 input per batch (one large bag may exceed it alone)."""
    order = np.argsort(counts, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        stop = start + 1
        while (stop < len(order) and stop - start < batch_size
               and (stop - start + 1) * max(1, int(counts[order[stop]])) * dim * 4 <= max_bytes):
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches
