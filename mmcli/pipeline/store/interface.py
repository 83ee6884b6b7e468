"""The feature store's interface (:class:`FeatureStore`), its backend registry and :func:`open_store`.

A backend implements the primitives (the abstract methods: write a group atomically, read arrays, metadata,
listing, removal, staging); everything a caller uses -- items, tables, iteration, the stage-2 reads, ``info``,
``verify`` / ``repair`` (:mod:`mmcli.pipeline.store.verify`) -- is written once here, on top of them.
"""
from __future__ import annotations

import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.fingerprint import same_source
from mmcli.pipeline.ids import check_id, id_problem
from mmcli.pipeline.io import disk_full_as_error
from mmcli.pipeline.registry import Registry
from mmcli.pipeline.store.checksum import CHECKSUMS, checksum_problem, checksums
from mmcli.pipeline.store.keys import (
    ITEM_ARRAYS,
    SCHEMA_VERSION,
    TABULAR,
    Item,
    ItemKey,
    ItemState,
    Problem,
    UnsafeEntry,
    check_arrays,
    jsonable,
    repair_hint,
    shape_problem,
)
from mmcli.pipeline.store.verify import Verifiable

log = logging.getLogger("mmcli.store")
_WARNED: set[tuple[str, str]] = set()
S = TypeVar("S", bound="FeatureStore")

STORE_BACKENDS: Registry[type[FeatureStore]] = Registry("store backend", flag="open_store(backend=...)")


def register_backend(name: str, **meta: Any) -> Callable[[type[S]], type[S]]:
    """Class decorator of a backend module in this package: ``@register_backend("zarr", suffixes=(".zarr",))``
    (``default=True`` for the backend of paths without a known suffix). The name is written only there."""
    return STORE_BACKENDS.register(name, **meta)


STORE_BACKENDS.scan(Path(__file__).parent, __package__ or "mmcli.pipeline.store", "register_backend")


class FeatureStore(Verifiable, ABC):
    """Common interface of the Zarr and HDF5 backends. Open one with :func:`open_store`.

    ``check_root=False`` opens a store whose root metadata is missing, unreadable or lacks ``schema_version``
    (``root_problem`` says what) so that ``verify`` can report it and ``repair`` rebuild it; every other caller
    gets a :class:`StoreError` naming the fix.
    """

    backend: str = ""

    def __init__(self, path: Path, mode: str = "a", *, check_root: bool = True) -> None:
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        self.path = Path(path)
        self.mode = mode
        self.root_problem = ""

    def _check_root(self, strict: bool) -> None:
        """Refuse a store of another schema; a root without readable metadata is refused when ``strict``, else
        recorded in ``root_problem``."""
        try:
            root = self._attrs("")
            why = "" if root is not None else "root metadata missing"
        except StoreError as e:
            root, why = None, f"unreadable root metadata ({e})"
        schema = (root or {}).get("schema_version")
        if not why and schema is None:
            why = ("root metadata has no schema_version (its creation was interrupted, or it was not written by "
                   "mmcli)")
        if why:
            if strict:
                raise StoreError(f"{self.path}: not a readable mmcli store: {why}. Fix: `mmcli store verify "
                                 f"--repair {self.path}` rebuilds it from the items.")
            self.root_problem = why
            return
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema_version {schema!r}, this mmcli reads {SCHEMA_VERSION}")

    # ---- backend primitives -------------------------------------------------------------------
    @abstractmethod
    def _write(self, key_path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Atomically create (or replace) the group ``key_path`` with ``arrays`` and ``attrs``; every chunk of
        every array is written (also an all-zero one), so a missing chunk file means a lost chunk."""

    @abstractmethod
    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Read arrays ``names`` (missing ones are skipped) and attrs of group ``key_path``."""

    @abstractmethod
    def _read_rows(self, key_path: str, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique, in range) of array ``name`` of group ``key_path``, decoding each chunk
        that holds one of them once."""

    @abstractmethod
    def _array_info(self, key_path: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of array ``name`` of group ``key_path``, from metadata only."""

    @abstractmethod
    def _attrs(self, key_path: str) -> dict[str, Any] | None:
        """Attrs of group ``key_path``, None when it does not exist; :class:`StoreError` when unreadable."""

    @abstractmethod
    def _meta(self, key_path: str, arrays: tuple[str, ...]) -> tuple[dict[str, Any] | None, dict[str, tuple], list]:
        """Metadata only: (attrs or None when absent, shapes of the present ``arrays``, problems with array
        entries such as links, and, for an item written with checksums, chunk files missing for its shape).
        :class:`StoreError` when the group's or an array's metadata is unreadable."""

    @abstractmethod
    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        """Merge ``attrs`` into group ``key_path`` (created if missing; unreadable attrs are replaced)."""

    @abstractmethod
    def _children(self, key_path: str) -> list[str]:
        """Names of every child entry of group ``key_path`` that could be a key (root staging excluded)."""

    @abstractmethod
    def _entry_problem(self, key_path: str) -> str | None:
        """Why the entry ``key_path`` is not a plain group of this store (a link, ...), else None (also when it
        does not exist)."""

    @abstractmethod
    def _delete(self, key_path: str) -> bool:
        """Remove group ``key_path``; True if it existed."""

    @abstractmethod
    def _remove_entry(self, key_path: str) -> bool:
        """Remove an odd entry (a link without its target, a hidden folder...); True if it existed."""

    @abstractmethod
    def _reset_group(self, key_path: str, attrs: dict[str, Any]) -> None:
        """Replace the (unreadable or missing) metadata of group ``key_path`` (``""``: the root) by ``attrs``."""

    @abstractmethod
    def _staging_leftovers(self) -> list[str]:
        """Staging entries not owned by a live writer on this host (left by killed writers)."""

    @abstractmethod
    def _clear_staging(self, older_than_s: float) -> int:
        """Remove staging entries of dead writers on this host, and others older than ``older_than_s`` seconds;
        returns how many."""

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes on disk."""

    def _deep_links(self, key_path: str) -> list[str]:
        """Links anywhere inside an item (e.g. a symlinked chunk file); none for backends without them."""
        return []

    # ---- items ----------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"store {self.path} is open read-only")

    def write_item(
        self,
        modality: str,
        encoder_id: str,
        patient_id: str,
        item_id: str,
        features: np.ndarray,
        coords: np.ndarray | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> ItemKey:
        """Atomically write one item (replacing an older one) with the checksum of each array; ``complete=true``
        is set last."""
        self._writable()
        key = ItemKey(modality, encoder_id, patient_id, item_id).validate()
        features, coords = check_arrays(features, coords)
        meta = jsonable(dict(attrs or {}))
        arrays = {"features": features}
        if coords is not None:
            arrays["coords"] = coords
        meta.update(n=int(features.shape[0]), dim=int(features.shape[1]), arrays=sorted(arrays), complete=True)
        meta[CHECKSUMS] = checksums(arrays)
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with disk_full_as_error(self.path, sum(a.nbytes for a in arrays.values())):
            self._write(key.path, arrays, meta)
        return key

    def item_state(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> ItemState:
        """``ok`` / ``incomplete`` / ``corrupt`` from metadata only (attrs, array presence and shapes, and for
        items written with checksums the presence of every chunk file)."""
        return self._item_state(ItemKey(modality, encoder_id, patient_id, item_id).validate().path)

    def _item_state(self, key_path: str) -> ItemState:
        try:
            attrs, shapes, odd = self._meta(key_path, ITEM_ARRAYS)
        except StoreError as e:
            return ItemState("corrupt", {}, str(e))
        if attrs is None:
            return ItemState("incomplete", {}, "no such item")
        if attrs.get("complete") is not True:
            return ItemState("incomplete", attrs, "incomplete item (complete flag missing)")
        why = shape_problem(attrs, shapes, odd)
        return ItemState("corrupt", attrs, why) if why else ItemState("ok", attrs)

    def _ok_state(self, key: ItemKey) -> ItemState:
        """The state of a complete, uncorrupted item, or :class:`StoreError` naming the item and the fix."""
        state = self._item_state(key.validate().path)
        if state.status == "incomplete":
            raise StoreError(f"{self.path}: no complete item at /{key.path}")
        if state.status == "corrupt":
            raise StoreError(f"{self.path}: item /{key.path} is corrupt: {state.why}. {repair_hint(self.path)}")
        return state

    def _read_verified(self, key_path: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
        """(arrays, attrs, why they cannot be trusted: '' when they can). Reads the item whole and checks it
        against its checksums; :class:`UnsafeEntry` for an item that holds links."""
        try:
            arrays, attrs = self._read(key_path, ITEM_ARRAYS)
        except UnsafeEntry:
            raise
        except Exception as e:  # noqa: BLE001 - zarr codecs / h5py raise many types for damaged data
            return {}, {}, f"unreadable ({type(e).__name__}: {e})"
        if "features" not in arrays:
            return arrays, attrs, "corrupt: features array missing"
        why = checksum_problem(attrs, arrays)
        return arrays, attrs, f"corrupt: {why}" if why else ""

    def _read_checked(self, key_path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:meth:`_read_verified`, or :class:`StoreError` naming the item, what is wrong and the fix."""
        arrays, attrs, why = self._read_verified(key_path)
        if why:
            raise StoreError(f"{self.path}: item /{key_path} is {why}. {repair_hint(self.path)}")
        return arrays, attrs

    def read_item(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> Item:
        """Read a complete item whole and check it against its checksums; :class:`StoreError` if it is missing,
        incomplete, corrupt or its data do not match. Memory: the item's arrays (plus 1 MiB for the check)."""
        key = ItemKey(modality, encoder_id, patient_id, item_id)
        self._ok_state(key)
        arrays, attrs = self._read_checked(key.path)
        return Item(key, arrays["features"], arrays.get("coords"), attrs)

    def item_attrs(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> dict[str, Any] | None:
        """Attrs of an item (complete or not), or None when absent or unreadable."""
        path = ItemKey(modality, encoder_id, patient_id, item_id).validate().path
        try:
            return self._attrs(path)
        except StoreError as e:
            self._warn(path, str(e))
            return None

    def is_cached(
        self, modality: str, encoder_id: str, patient_id: str, item_id: str, fingerprint: dict | None = None,
        *, check_data: bool = False,
    ) -> bool:
        """True when the item is complete, its arrays exist with the recorded shapes (and every chunk file, for
        an item written with checksums), and (if given) its ``source_fingerprint`` is the same source as
        ``fingerprint`` (:func:`~mmcli.pipeline.fingerprint.same_source`: a rewritten file with identical bytes is).

        Metadata only, unless ``check_data``: then the arrays are also read whole and checked against their
        checksums, so a chunk that was damaged or swapped is not cached either (the runner's resume check:
        reading an item costs far less than extracting it again)."""
        state = self.item_state(modality, encoder_id, patient_id, item_id)
        if state.status != "ok":
            return False
        if fingerprint is not None and not same_source(state.attrs.get("source_fingerprint"), jsonable(fingerprint)):
            return False
        if check_data:
            key_path = ItemKey(modality, encoder_id, patient_id, item_id).path
            try:
                why = self._read_verified(key_path)[2]
            except StoreError as e:  # links inside the item: rewritten, never followed
                why = str(e)
            if why:
                log.info("%s: /%s is not cached: %s", self.path, key_path, why)
                return False
        return True

    def iter_items(
        self, modality: str | None = None, encoder_id: str | None = None, include_incomplete: bool = False
    ) -> Iterator[ItemKey]:
        """Keys of items, sorted; incomplete and corrupt ones only when ``include_incomplete``. A corrupt item
        is skipped with a warning (once per process) naming it and the fix."""
        if modality:
            self._check_entry(modality)
        for m in [modality] if modality else self.modalities():
            if encoder_id:
                self._check_entry(f"{m}/{encoder_id}")
            for e in [encoder_id] if encoder_id else self.encoders(m):
                for p in self._keys(f"{m}/{e}"):
                    yield from self._items_in(m, e, p, include_incomplete)

    def _items_in(self, m: str, e: str, p: str, include_incomplete: bool) -> Iterator[ItemKey]:
        for i in self._keys(f"{m}/{e}/{p}"):
            key = ItemKey(m, e, p, i)
            if include_incomplete:
                yield key
                continue
            state = self._item_state(key.path)
            if state.status == "ok":
                yield key
            elif state.status == "corrupt":
                self._warn(key.path, state.why)

    # ---- what stage 2 streams on: one patient, shapes, some rows ----------------------------------
    def items_of(self, modality: str, encoder_id: str, patient_id: str,
                 include_incomplete: bool = False) -> list[ItemKey]:
        """Keys of one patient's items, sorted, reading only that patient's group (never a walk of the store);
        ``[]`` when the patient has none. Corrupt items are skipped with a warning, like :meth:`iter_items`.
        IO: one listing of the patient's group plus the metadata of each of its items."""
        for name, value in (("modality", modality), ("encoder_id", encoder_id), ("patient_id", patient_id)):
            check_id(value, name)
        for where in (modality, f"{modality}/{encoder_id}", f"{modality}/{encoder_id}/{patient_id}"):
            self._check_entry(where)
        return list(self._items_in(modality, encoder_id, patient_id, include_incomplete))

    def item_shape(self, key: ItemKey) -> tuple[int, int]:
        """``(N, D)`` of the item's features, from metadata only (no array data is read); :class:`StoreError`
        when the item is missing, incomplete or corrupt."""
        attrs = self._ok_state(key).attrs
        return int(attrs["n"]), int(attrs["dim"])

    def item_dtype(self, key: ItemKey) -> np.dtype:
        """The stored dtype of the item's features (float16 / float32 / float64), from metadata only."""
        self._ok_state(key)
        return self._array_info(key.path, "features")[1]

    def read_rows(self, key: ItemKey, rows: Sequence[int] | np.ndarray, array: str = "features") -> np.ndarray:
        """Rows ``rows`` (sorted, strictly increasing indices in ``[0, N)``) of the item's ``features`` (or
        ``coords``), as a ``(len(rows), D)`` array of the stored dtype.

        Memory: the result plus the chunks being decoded (a chunk holds up to 8192 rows; Zarr may decode several
        at once). IO: every chunk that holds a requested row is read and decoded once, no other. A partial read
        cannot check the item's checksums; instead the item's metadata must be intact and, for an item written
        with checksums, every chunk file of its arrays must exist (a lost chunk would read as zeros).
        :class:`StoreError` naming the item when it is missing, incomplete, corrupt or unreadable."""
        if array not in ITEM_ARRAYS:
            raise ValueError(f"array must be one of {ITEM_ARRAYS}, got {array!r}")
        idx = np.asarray(rows)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"rows must be a 1-D sequence of integers, got shape {idx.shape} {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size > 1 and not (np.diff(idx) > 0).all():
            raise ValueError("rows must be sorted and strictly increasing (no duplicates)")
        attrs = self._ok_state(key).attrs
        n = int(attrs["n"])
        if idx.size and (idx[0] < 0 or idx[-1] >= n):
            raise ValueError(f"rows must lie in [0, {n}) for /{key.path}, got {int(idx[0])}..{int(idx[-1])}")
        if array == "coords" and "coords" not in (attrs.get("arrays") or []):
            raise StoreError(f"{self.path}: item /{key.path} has no coords")
        width = 2 if array == "coords" else int(attrs["dim"])
        if not idx.size:
            return np.empty((0, width), dtype=self._array_info(key.path, array)[1])
        try:
            return self._read_rows(key.path, array, idx)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged data
            raise StoreError(f"{self.path}: item /{key.path} is unreadable ({type(e).__name__}: {e}). "
                             f"{repair_hint(self.path)}") from e

    def _warn(self, key_path: str, why: str) -> None:
        token = (str(self.path.absolute()), key_path)
        if token in _WARNED:
            return
        _WARNED.add(token)
        msg = f"warning: {self.path}: skipping /{key_path}: {why}. {repair_hint(self.path)}"
        print(msg, file=sys.stderr, flush=True)  # the user's console, whatever logging is set up
        log.info(msg)  # and the log file, where one is configured

    def _scan_keys(self, key_path: str) -> tuple[list[str], list[Problem]]:
        """(safe child names, a problem for each child entry mmcli never writes)."""
        names, problems = [], []
        for n in self._children(key_path):
            child = f"{key_path}/{n}" if key_path else n
            why = id_problem(n) or self._entry_problem(child)
            if why:
                problems.append(Problem(f"/{child}", f"{why}; mmcli never writes such a key. Fix: remove that "
                                        "entry (`mmcli store verify --repair` removes it; a link's target is "
                                        "never touched)", "entry"))
            else:
                names.append(n)
        return names, problems

    def _check_entry(self, key_path: str) -> None:
        """Refuse a key given by the caller (a modality, an encoder) that is a link or another odd entry."""
        why = self._entry_problem(key_path)
        if why:
            raise UnsafeEntry(f"{self.path}: entry /{key_path}: {why}; mmcli never writes such a key. Fix: remove "
                              "that entry (`mmcli store verify --repair` removes it; a link's target is never "
                              "touched)")

    def _keys(self, key_path: str) -> list[str]:
        """Child group names, each a safe id and a plain group. mmcli writes no other entries, so another one
        means the store was changed by hand or crafted: it is refused rather than followed or used as a key,
        CSV value or file name."""
        names, problems = self._scan_keys(key_path)
        if problems:
            raise UnsafeEntry(f"{self.path}: entry {problems[0]}")
        return names

    def modalities(self) -> list[str]:
        return [m for m in self._keys("") if m != TABULAR]

    def encoders(self, modality: str) -> list[str]:
        return self._keys(modality)

    def patients(self, modality: str, encoder_id: str) -> list[str]:
        """Patients with at least one complete item for this modality and encoder."""
        return sorted({k.patient_id for k in self.iter_items(modality, encoder_id)})

    def encoder_attrs(self, modality: str, encoder_id: str) -> dict[str, Any]:
        """Encoder provenance; ``{}`` (with a warning) when that metadata is unreadable or was reset by
        ``repair`` (the next extract or import of that encoder restores it)."""
        try:
            return self._attrs(f"{modality}/{encoder_id}") or {}
        except StoreError as e:
            self._warn(f"{modality}/{encoder_id}", f"encoder metadata: {e}")
            return {}

    def set_encoder_attrs(self, modality: str, encoder_id: str, attrs: dict[str, Any]) -> None:
        self._writable()
        check_id(modality, "modality")
        check_id(encoder_id, "encoder_id")
        self._set_attrs(f"{modality}/{encoder_id}", jsonable(attrs))

    def root_attrs(self) -> dict[str, Any]:
        return self._attrs("") or {}

    # ---- tables -----------------------------------------------------------------------------------
    def write_table(self, name: str, table: pd.DataFrame, attrs: dict[str, Any] | None = None) -> None:
        """Store a numeric patients x features table (index = patient_id). NaN is kept as missing."""
        self._writable()
        check_id(name, "table name")
        if table.index.has_duplicates:
            dup = table.index[table.index.duplicated()].tolist()[:5]
            raise StoreError(f"table {name!r}: duplicate patient ids {dup}")
        for pid in table.index:
            check_id(str(pid), "patient_id")
        try:
            values = table.to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise StoreError(f"table {name!r} must be numeric: {e}") from e
        meta = jsonable(dict(attrs or {}))
        meta.update(
            patients=[str(p) for p in table.index],
            columns=[str(c) for c in table.columns],
            complete=True,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        meta[CHECKSUMS] = checksums({"values": values})
        with disk_full_as_error(self.path, values.nbytes):
            self._write(f"{TABULAR}/{name}", {"values": values}, meta)

    def _table_state(self, name: str) -> ItemState:
        try:
            attrs, shapes, odd = self._meta(f"{TABULAR}/{name}", ("values",))
        except StoreError as e:
            return ItemState("corrupt", {}, str(e))
        if attrs is None:
            return ItemState("incomplete", {}, "no such table")
        if attrs.get("complete") is not True:
            return ItemState("incomplete", attrs, "incomplete table")
        pats, cols = attrs.get("patients"), attrs.get("columns")
        if odd:
            return ItemState("corrupt", attrs, "; ".join(odd))
        if not isinstance(pats, list) or not isinstance(cols, list):
            return ItemState("corrupt", attrs, "patients/columns attributes missing")
        if shapes.get("values") != (len(pats), len(cols)):
            return ItemState("corrupt", attrs, f"values shape {shapes.get('values')} != recorded "
                                               f"({len(pats)}, {len(cols)})")
        return ItemState("ok", attrs)

    def read_table(self, name: str) -> pd.DataFrame:
        check_id(name, "table name")
        state = self._table_state(name)
        if state.status == "incomplete":
            raise StoreError(f"{self.path}: no table named {name!r} (tables: {self.tables()})")
        fix = f"Fix: `mmcli store verify --repair {self.path}`, then re-run `mmcli extract --modality tabular`."
        if state.status == "corrupt":
            raise StoreError(f"{self.path}: table /{TABULAR}/{name} is corrupt: {state.why}. {fix}")
        try:
            arrays, attrs = self._read(f"{TABULAR}/{name}", ("values",))
        except Exception as e:  # noqa: BLE001 - damaged data
            raise StoreError(f"{self.path}: table /{TABULAR}/{name} is unreadable ({type(e).__name__}: {e}). "
                             f"{fix}") from e
        why = checksum_problem(attrs, arrays)
        if why:
            raise StoreError(f"{self.path}: table /{TABULAR}/{name} is corrupt: {why}. {fix}")
        bad = [p for p in attrs["patients"] if id_problem(p)]
        if bad:
            raise StoreError(f"{self.path}: table {name!r} lists unsafe patient ids {bad[:3]}; mmcli never writes "
                             "such ids. Fix: rebuild the table with `mmcli extract --modality tabular`.")
        return pd.DataFrame(
            arrays["values"], index=pd.Index(attrs["patients"], name="patient_id"), columns=attrs["columns"]
        )

    def tables(self) -> list[str]:
        """Complete, readable tables; a corrupt one is skipped with a warning."""
        out = []
        for t in self._keys(TABULAR):
            state = self._table_state(t)
            if state.status == "ok":
                out.append(t)
            elif state.status == "corrupt":
                self._warn(f"{TABULAR}/{t}", state.why)
        return out

    # ---- whole-store views ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Summary: modalities, encoders, patients, items, dims, rows and sizes. Only items whose arrays match
        their recorded shapes count as items; incomplete and corrupt ones are counted apart."""
        mods: dict[str, Any] = {}
        for m in self.modalities():
            mods[m] = {}
            for e in self.encoders(m):
                states = [(k, self._item_state(k.path)) for k in self.iter_items(m, e, include_incomplete=True)]
                done = [(k, s.attrs) for k, s in states if s.status == "ok"]
                mods[m][e] = {
                    "encoder": self.encoder_attrs(m, e).get("encoder"),
                    "patients": len({k.patient_id for k, _ in done}),
                    "items": len(done),
                    "incomplete_items": len(states) - len(done),
                    "corrupt_items": sum(s.status == "corrupt" for _, s in states),
                    "dims": sorted({a.get("dim") for _, a in done} - {None}),
                    "rows": sum(int(a.get("n", 0)) for _, a in done),
                }
        tables = {}
        for t in self.tables():
            attrs = self._table_state(t).attrs
            tables[t] = {"patients": len(attrs.get("patients", [])), "features": len(attrs.get("columns", []))}
        root = self.root_attrs()
        return {
            "path": str(self.path),
            "backend": self.backend,
            "schema_version": root.get("schema_version"),
            "mmcli_version": root.get("mmcli_version"),
            "modalities": mods,
            "tables": tables,
            "size_bytes": self.size_bytes(),
        }

    def clear_stale_staging(self) -> int:
        """Remove staging left by writers on this host that are dead (a run calls this before it starts)."""
        self._writable()
        return self._clear_staging(float("inf"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, mode={self.mode!r})"


def backend_for(path: str | Path) -> str:
    """The backend whose registered suffixes match ``path`` (``.h5``/``.hdf5``: hdf5), else the default (zarr)."""
    suffix = Path(path).suffix.lower()
    for name in STORE_BACKENDS.names():
        if suffix in STORE_BACKENDS.entry(name).meta.get("suffixes", ()):
            return name
    return STORE_BACKENDS.names(default=True)[0]


def open_store(path: str | Path, mode: str = "a", backend: str | None = None, *,
               check_root: bool = True) -> FeatureStore:
    """Open (mode ``a`` also creates) a feature store; the backend follows the suffix unless given.
    ``check_root=False``: see :class:`FeatureStore` (for ``store verify [--repair]``)."""
    return STORE_BACKENDS.get(backend or backend_for(path))(Path(path), mode, check_root=check_root)
