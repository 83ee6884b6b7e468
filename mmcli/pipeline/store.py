"""The feature store: one interface, a Zarr v3 backend (default, a directory) and an HDF5 backend (one file).

Hierarchy (same for both backends)::

    /                                     attrs: mmcli_version, schema_version
    /<modality>/<encoder_id>/             attrs: encoder-level provenance (name, dim, params)
    /<modality>/<encoder_id>/<patient_id>/<item_id>/
        features  (N, D) float16|float32
        coords    (N, 2) int64            (WSI: level-0 pixel x, y of each tile's top-left)
        attrs: provenance ..., n, dim, arrays, complete=true  (written last)
    /tabular/<name>/values  (patients x features) float64, attrs: patients, columns, complete=true

Writes are atomic per item. Zarr: the item is written into ``<store>/.staging/<uuid>.<pid>.<host>`` and renamed
into place (a POSIX directory rename), so a killed writer leaves at most a staging folder that no reader looks at;
the owner in its name tells a live writer's staging from a dead one's (cleared by the next run on that host).
HDF5: the item is written under ``/.staging/<uuid>`` and moved into place under an exclusive ``flock`` on
``<file>.lock``; readers hold a shared lock, so concurrent readers never see a half-written item. HDF5 itself is
not crash-safe (a process killed inside an HDF5 write can damage the file); Zarr is the default for that reason.

Readers trust an item only when its ``complete`` attribute is true *and* its arrays exist with the recorded
shapes (checked from metadata only, no array data is read). An item whose metadata cannot be parsed, or whose
``features``/``coords`` array is missing or of another shape, is *corrupt*: readers skip it with a warning on
stderr (once per process),
:meth:`FeatureStore.verify` reports it and :meth:`FeatureStore.repair` removes it so the next extract redoes it.

A key mmcli never writes (an unsafe or hidden name, ``..``, a symbolic / soft / external link) means the store
was edited by hand or crafted: readers refuse it (:class:`UnsafeEntry`, exit 2) instead of following it, verify
reports it and repair removes the entry itself (a link is unlinked, its target is never touched).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli import __version__
from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.faults import fault
from mmcli.pipeline.ids import check_id, id_problem
from mmcli.pipeline.io import atomic_write_text, disk_full_as_error, json_default
from mmcli.pipeline.registry import Registry

SCHEMA_VERSION = 1
TABULAR = "tabular"
_STAGING = ".staging"
ITEM_ARRAYS = ("features", "coords")

log = logging.getLogger("mmcli.store")
_WARNED: set[tuple[str, str]] = set()

STORE_BACKENDS: Registry[type[FeatureStore]] = Registry("store backend", flag="open_store(backend=...)")


class UnsafeEntry(StoreError):
    """The store holds an entry mmcli never writes (unsafe/hidden name, link): refused, never followed."""


@dataclass(frozen=True, order=True)
class ItemKey:
    """Address of one item: ``/<modality>/<encoder_id>/<patient_id>/<item_id>``."""

    modality: str
    encoder_id: str
    patient_id: str
    item_id: str

    @property
    def path(self) -> str:
        return f"{self.modality}/{self.encoder_id}/{self.patient_id}/{self.item_id}"

    def validate(self) -> ItemKey:
        check_id(self.modality, "modality")
        if self.modality == TABULAR:
            raise StoreError("'tabular' is reserved for tables; use write_table()")
        check_id(self.encoder_id, "encoder_id")
        check_id(self.patient_id, "patient_id")
        check_id(self.item_id, "item_id")
        return self


@dataclass
class Item:
    """A stored item: features (N, D), optional coords (N, 2) and its attributes."""

    key: ItemKey
    features: np.ndarray
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """One problem found by :meth:`FeatureStore.verify`; ``where`` is a store path.

    ``kind`` says what :meth:`FeatureStore.repair` does with it: ``item`` / ``table`` (removed, the next run
    redoes it), ``entry`` (a key mmcli never writes: removed, a link without its target), ``group`` (unreadable
    group metadata: reset), ``staging`` (a dead writer's leftovers: cleared), ``none`` (reported only).
    """

    where: str
    message: str
    kind: str = field(default="item", compare=False)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class ItemState:
    """What the metadata says about an item: ``ok``, ``incomplete`` or ``corrupt`` (``why`` says what)."""

    status: str
    attrs: dict[str, Any]
    why: str = ""


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(attrs, default=json_default))
    except (TypeError, ValueError) as e:
        raise StoreError(f"item attributes must be JSON-serialisable: {e}") from e


def _check_arrays(features: np.ndarray, coords: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    features = np.asarray(features)
    if features.ndim != 2:
        raise StoreError(f"features must be 2-D (N, D), got shape {features.shape}")
    if features.dtype not in (np.float16, np.float32, np.float64):
        raise StoreError(f"features must be float16/float32/float64, got {features.dtype}")
    if coords is not None:
        coords = np.asarray(coords, dtype=np.int64)
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
            raise StoreError(f"coords must be (N, 2) with N={features.shape[0]}, got {coords.shape}")
    return features, coords


def _shape_problem(attrs: dict[str, Any], shapes: dict[str, tuple[int, ...]], odd: list[str]) -> str:
    """Why the arrays of a complete item do not match its recorded shapes ('' when they do)."""
    if odd:
        return "; ".join(odd)
    n, dim = attrs.get("n"), attrs.get("dim")
    if "features" not in shapes:
        return "features array missing"
    if shapes["features"] != (n, dim):
        return f"features shape {shapes['features']} != recorded ({n}, {dim})"
    recorded = attrs.get("arrays")
    if isinstance(recorded, list) and "coords" in recorded and "coords" not in shapes:
        return "coords array missing"
    if "coords" in shapes and shapes["coords"] != (n, 2):
        return f"coords shape {shapes['coords']} != recorded ({n}, 2)"
    return ""


def _repair_hint(path: Path) -> str:
    return f"Fix: `mmcli store verify --repair {path}`, then re-run `mmcli extract` to redo it."


class FeatureStore(ABC):
    """Common interface of the Zarr and HDF5 backends. Open one with :func:`open_store`."""

    backend: str = ""

    def __init__(self, path: Path, mode: str = "a") -> None:
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        self.path = Path(path)
        self.mode = mode

    # ---- backend primitives -------------------------------------------------------------------
    @abstractmethod
    def _write(self, key_path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Atomically create (or replace) the group ``key_path`` with ``arrays`` and ``attrs``."""

    @abstractmethod
    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Read arrays ``names`` (missing ones are skipped) and attrs of group ``key_path``."""

    @abstractmethod
    def _attrs(self, key_path: str) -> dict[str, Any] | None:
        """Attrs of group ``key_path``, None when it does not exist; :class:`StoreError` when unreadable."""

    @abstractmethod
    def _meta(self, key_path: str, arrays: tuple[str, ...]) -> tuple[dict[str, Any] | None, dict[str, tuple], list]:
        """Metadata only: (attrs or None when absent, shapes of the present ``arrays``, problems with array
        entries such as links). :class:`StoreError` when the group's or an array's metadata is unreadable."""

    @abstractmethod
    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        """Merge ``attrs`` into group ``key_path`` (created if missing; unreadable attrs are replaced)."""

    @abstractmethod
    def _children(self, key_path: str) -> list[str]:
        """Names of every child entry of group ``key_path`` that could be a key (root staging excluded)."""

    @abstractmethod
    def _entry_problem(self, key_path: str) -> str | None:
        """Why the entry ``key_path`` is not a plain group of this store (a link, ...), else None."""

    @abstractmethod
    def _delete(self, key_path: str) -> bool:
        """Remove group ``key_path``; True if it existed."""

    @abstractmethod
    def _remove_entry(self, key_path: str) -> bool:
        """Remove an odd entry (a link without its target, a hidden folder...); True if it existed."""

    @abstractmethod
    def _reset_group(self, key_path: str) -> None:
        """Replace the unreadable metadata of group ``key_path`` by empty attrs."""

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
        """Atomically write one item (replacing an older one); ``complete=true`` is set last."""
        self._writable()
        key = ItemKey(modality, encoder_id, patient_id, item_id).validate()
        features, coords = _check_arrays(features, coords)
        meta = _jsonable(dict(attrs or {}))
        arrays = {"features": features}
        if coords is not None:
            arrays["coords"] = coords
        meta.update(n=int(features.shape[0]), dim=int(features.shape[1]), arrays=sorted(arrays), complete=True)
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with disk_full_as_error(self.path, sum(a.nbytes for a in arrays.values())):
            self._write(key.path, arrays, meta)
        return key

    def item_state(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> ItemState:
        """``ok`` / ``incomplete`` / ``corrupt`` from metadata only (attrs, array presence and shapes)."""
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
        why = _shape_problem(attrs, shapes, odd)
        return ItemState("corrupt", attrs, why) if why else ItemState("ok", attrs)

    def read_item(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> Item:
        """Read a complete item; raises :class:`StoreError` if it is missing, incomplete or corrupt."""
        key = ItemKey(modality, encoder_id, patient_id, item_id).validate()
        state = self._item_state(key.path)
        if state.status == "incomplete":
            raise StoreError(f"{self.path}: no complete item at /{key.path}")
        if state.status == "corrupt":
            raise StoreError(f"{self.path}: item /{key.path} is corrupt: {state.why}. {_repair_hint(self.path)}")
        try:
            arrays, attrs = self._read(key.path, ITEM_ARRAYS)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - zarr codecs / h5py raise many types for damaged data
            raise StoreError(f"{self.path}: item /{key.path} is unreadable ({type(e).__name__}: {e}). "
                             f"{_repair_hint(self.path)}") from e
        if "features" not in arrays:
            raise StoreError(f"{self.path}: item /{key.path} has no features array. {_repair_hint(self.path)}")
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
        self, modality: str, encoder_id: str, patient_id: str, item_id: str, fingerprint: dict | None = None
    ) -> bool:
        """True when the item is complete, its arrays exist with the recorded shapes (metadata only) and (if
        given) its ``source_fingerprint`` equals ``fingerprint``."""
        state = self.item_state(modality, encoder_id, patient_id, item_id)
        if state.status != "ok":
            return False
        return fingerprint is None or state.attrs.get("source_fingerprint") == _jsonable(fingerprint)

    def delete_item(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> bool:
        self._writable()
        return self._delete(ItemKey(modality, encoder_id, patient_id, item_id).validate().path)

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

    def _warn(self, key_path: str, why: str) -> None:
        token = (str(self.path.absolute()), key_path)
        if token in _WARNED:
            return
        _WARNED.add(token)
        msg = f"warning: {self.path}: skipping /{key_path}: {why}. {_repair_hint(self.path)}"
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
        """Encoder provenance; ``{}`` (with a warning) when that metadata is unreadable."""
        try:
            return self._attrs(f"{modality}/{encoder_id}") or {}
        except StoreError as e:
            self._warn(f"{modality}/{encoder_id}", f"encoder metadata: {e}")
            return {}

    def set_encoder_attrs(self, modality: str, encoder_id: str, attrs: dict[str, Any]) -> None:
        self._writable()
        check_id(modality, "modality")
        check_id(encoder_id, "encoder_id")
        self._set_attrs(f"{modality}/{encoder_id}", _jsonable(attrs))

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
        meta = _jsonable(dict(attrs or {}))
        meta.update(
            patients=[str(p) for p in table.index],
            columns=[str(c) for c in table.columns],
            complete=True,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
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
        if state.status == "corrupt":
            raise StoreError(f"{self.path}: table /{TABULAR}/{name} is corrupt: {state.why}. Fix: `mmcli store "
                             f"verify --repair {self.path}`, then re-run `mmcli extract --modality tabular`.")
        try:
            arrays, attrs = self._read(f"{TABULAR}/{name}", ("values",))
        except Exception as e:  # noqa: BLE001 - damaged data
            raise StoreError(f"{self.path}: table /{TABULAR}/{name} is unreadable ({type(e).__name__}: {e}). "
                             f"{_repair_hint(self.path)}") from e
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

    def verify(self, check_values: bool = True, check_sources: bool = True) -> list[Problem]:
        """Every incomplete or corrupt item and table, unreadable group metadata, entry mmcli never writes
        (refused keys, links) and staging leftover, as a list of problems. Never raises for what it finds.

        With ``check_sources``, an item whose source file is still reachable at its recorded path must match
        its recorded fingerprint (a changed slide means stale features); unreachable sources are not checked.
        """
        problems = [Problem(s, "staging data left by an interrupted writer", "staging")
                    for s in self._staging_leftovers()]
        top, bad = self._scan_keys("")
        problems += bad
        for m in top:
            problems += self._verify_group(m)
            if m == TABULAR:
                tables, bad = self._scan_keys(TABULAR)
                problems += bad
                for t in tables:
                    state = self._table_state(t)
                    if state.status != "ok":
                        problems.append(Problem(f"/{TABULAR}/{t}", state.why, "table"))
                continue
            encoders, bad = self._scan_keys(m)
            problems += bad
            for e in encoders:
                problems += self._verify_group(f"{m}/{e}")
                dims: dict[int, str] = {}
                patients, bad = self._scan_keys(f"{m}/{e}")
                problems += bad
                for p in patients:
                    problems += self._verify_group(f"{m}/{e}/{p}")
                    item_ids, bad = self._scan_keys(f"{m}/{e}/{p}")
                    problems += bad
                    for i in item_ids:
                        problems += self._verify_item(ItemKey(m, e, p, i), check_values, dims, check_sources)
                if len(dims) > 1:
                    problems.append(Problem(f"/{m}/{e}", f"items disagree on feature dim: {sorted(dims)}", "none"))
        return problems

    def _verify_group(self, key_path: str) -> list[Problem]:
        try:
            self._attrs(key_path)
        except StoreError as e:
            return [Problem(f"/{key_path}", f"unreadable group metadata ({e})", "group")]
        return []

    def _verify_item(
        self, key: ItemKey, check_values: bool, dims: dict[int, str], check_sources: bool = True
    ) -> list[Problem]:
        where = f"/{key.path}"
        state = self._item_state(key.path)
        if state.status != "ok":
            return [Problem(where, state.why if state.status == "incomplete" else f"corrupt: {state.why}")]
        links = self._deep_links(key.path)
        if links:
            return [Problem(where, f"corrupt: holds links ({', '.join(links[:3])}); mmcli never writes links")]
        attrs = state.attrs
        try:
            arrays, _ = self._read(key.path, ITEM_ARRAYS)
        except Exception as e:  # noqa: BLE001 - any read failure is corruption to report
            return [Problem(where, f"unreadable: {type(e).__name__}: {e}")]
        f, c = arrays.get("features"), arrays.get("coords")
        if f is None or f.ndim != 2:
            return [Problem(where, f"features missing or not 2-D: {None if f is None else f.shape}")]
        out = []
        if attrs.get("n") != f.shape[0] or attrs.get("dim") != f.shape[1]:
            out.append(Problem(where, f"attrs n/dim {attrs.get('n')}/{attrs.get('dim')} != shape {f.shape}"))
        if c is not None and c.shape != (f.shape[0], 2):
            out.append(Problem(where, f"coords shape {c.shape} != ({f.shape[0]}, 2)"))
        if check_values and f.size and not np.isfinite(f).all():
            out.append(Problem(where, f"{int((~np.isfinite(f)).sum())} non-finite feature values"))
        dims.setdefault(int(f.shape[1]), where)
        fp = attrs.get("source_fingerprint")
        if check_sources and isinstance(fp, dict) and isinstance(fp.get("path"), str) and Path(fp["path"]).is_file():
            from mmcli.pipeline.fingerprint import source_fingerprint

            if source_fingerprint(fp["path"]) != fp:
                out.append(Problem(where, f"source {fp['path']} changed since extraction (stale features)"))
        return out

    def repair(self, problems: list[Problem] | None = None, staging_older_than_s: float = 3600.0) -> list[str]:
        """Act on the problems of :meth:`verify`: remove broken items and tables (a re-run redoes them) and
        entries mmcli never writes, reset unreadable group metadata, clear old staging leftovers."""
        self._writable()
        removed = []
        for p in problems if problems is not None else self.verify():
            path = p.where.strip("/")
            remove = {"item": self._delete, "table": self._delete, "entry": self._remove_entry}.get(p.kind)
            if remove is not None and remove(path):
                removed.append(p.where)
            elif p.kind == "group":
                self._reset_group(path)
                removed.append(f"{p.where} (unreadable metadata reset)")
        if self._clear_staging(staging_older_than_s):
            removed.append(f"/{_STAGING}")
        return removed

    def clear_stale_staging(self) -> int:
        """Remove staging left by writers on this host that are dead (a run calls this before it starts)."""
        self._writable()
        return self._clear_staging(float("inf"))

    def close(self) -> None:  # backends open files per operation; kept for a uniform API
        return None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, mode={self.mode!r})"


# ---- Zarr v3 ------------------------------------------------------------------------------------------
@STORE_BACKENDS.register("zarr", suffixes=(".zarr",), default=True)
class ZarrStore(FeatureStore):
    """Zarr v3 directory store; items are staged and renamed into place."""

    backend = "zarr"

    def __init__(self, path: Path, mode: str = "a") -> None:
        import zarr

        super().__init__(path, mode)
        self._zarr = zarr
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a Zarr store (a directory). Fix: give a new path or an "
                             "existing .zarr directory (use a .h5 suffix for an HDF5 store).")
        if not (self.path / "zarr.json").exists():
            if mode == "r":
                raise StoreError(f"no feature store at {self.path} (expected a .zarr directory with zarr.json)")
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreError(f"{self.path} exists, is not empty and is not a Zarr store")
            with disk_full_as_error(self.path):
                root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
                root.attrs.update(mmcli_version=__version__, schema_version=SCHEMA_VERSION)
        schema = self.root_attrs().get("schema_version")
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema_version {schema!r}, this mmcli reads {SCHEMA_VERSION}")

    def _dir(self, key_path: str) -> Path:
        return self.path / key_path if key_path else self.path

    def _ensure_parents(self, key_path: str) -> None:
        parts = key_path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = self._dir("/".join(parts[:i]))
            if not (d / "zarr.json").exists():
                d.mkdir(parents=True, exist_ok=True)
                atomic_write_text(d / "zarr.json", json.dumps(_GROUP_META))

    def _write(self, key_path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        zarr = self._zarr
        stage = self.path / _STAGING / _stage_name()
        stage.parent.mkdir(exist_ok=True)
        try:
            g = zarr.open_group(str(stage), mode="w", zarr_format=3)
            for name, arr in arrays.items():
                chunks = (max(1, min(arr.shape[0], 8192)),) + arr.shape[1:]
                z = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks)
                if arr.size:
                    z[...] = arr
            g.update_attributes(attrs)  # one metadata write (attrs.update writes it once per key)
            fault("store.staged")
            self._ensure_parents(key_path)
            final = self._dir(key_path)
            trash = None
            if final.exists() or final.is_symlink():
                trash = self.path / _STAGING / _stage_name("old-")
                os.rename(final, trash)
            os.rename(stage, final)
            if trash is not None:
                _remove_path(trash)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        links = self._deep_links(key_path)
        if links:
            raise UnsafeEntry(f"{self.path}: /{key_path} holds links ({', '.join(links[:3])}); mmcli never writes "
                              f"links and does not follow them. {_repair_hint(self.path)}")
        g = self._zarr.open_group(str(self._dir(key_path)), mode="r", zarr_format=3)
        present = set(g.array_keys())
        return {n: np.asarray(g[n][...]) for n in names if n in present}, dict(g.attrs)

    @staticmethod
    def _json(meta: Path) -> dict[str, Any] | None:
        """A zarr.json as a dict, None when absent; StoreError naming the file when it cannot be parsed."""
        try:
            doc = json.loads(meta.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise StoreError(f"{meta}: unreadable metadata ({type(e).__name__}: {e})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("attributes", {}), dict):
            raise StoreError(f"{meta}: unreadable metadata (not a JSON object with an attributes object)")
        return doc

    def _attrs(self, key_path: str) -> dict[str, Any] | None:
        doc = self._json(self._dir(key_path) / "zarr.json")
        return None if doc is None else dict(doc.get("attributes", {}))

    def _meta(self, key_path: str, arrays: tuple[str, ...]) -> tuple[dict[str, Any] | None, dict[str, tuple], list]:
        d = self._dir(key_path)
        if d.is_symlink():
            raise StoreError(f"{d} is a symbolic link")
        if not d.exists():
            return None, {}, []
        doc = self._json(d / "zarr.json")
        if doc is None:
            raise StoreError(f"{d / 'zarr.json'}: metadata file missing")
        if doc.get("node_type") != "group":
            raise StoreError(f"{d / 'zarr.json'}: node_type {doc.get('node_type')!r}, expected a group")
        shapes, odd = {}, []
        for name in arrays:
            a = d / name
            if a.is_symlink():
                odd.append(f"{name} is a symbolic link")
                continue
            am = self._json(a / "zarr.json")
            if am is None:
                if a.exists():
                    raise StoreError(f"{a / 'zarr.json'}: metadata file missing")
                continue
            shape = am.get("shape")
            if am.get("node_type") != "array" or not isinstance(shape, list):
                raise StoreError(f"{a / 'zarr.json'}: not an array's metadata")
            shapes[name] = tuple(shape)
        return dict(doc.get("attributes", {})), shapes, odd

    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        self._ensure_parents(key_path + "/x")
        meta_path = self._dir(key_path) / "zarr.json"
        with _flock(self.path / ".attrs.lock", exclusive=True):
            try:
                meta = self._json(meta_path) or dict(_GROUP_META)
            except StoreError:  # unreadable: rewritten whole (group attrs hold only provenance)
                meta = json.loads(json.dumps(_GROUP_META))
            meta.setdefault("attributes", {}).update(attrs)
            atomic_write_text(meta_path, json.dumps(meta))

    def _children(self, key_path: str) -> list[str]:
        d = self._dir(key_path)
        if d.is_symlink() or not d.is_dir():
            return []
        return sorted(c.name for c in d.iterdir()
                      if (c.is_symlink() or c.is_dir()) and not (not key_path and c.name == _STAGING))

    def _entry_problem(self, key_path: str) -> str | None:
        d = self._dir(key_path)
        if d.is_symlink():
            return f"a symbolic link (to {os.readlink(d)})"
        return None

    def _deep_links(self, key_path: str) -> list[str]:
        d = self._dir(key_path)
        found = []
        for root, dirs, files in os.walk(d):  # os.walk does not descend into symlinked folders
            for n in dirs + files:
                p = Path(root, n)
                if p.is_symlink():
                    found.append(str(p.relative_to(d)))
        return found

    def _delete(self, key_path: str) -> bool:
        d = self._dir(key_path)
        if not d.exists() and not d.is_symlink():
            return False
        trash = self.path / _STAGING / _stage_name("del-")
        trash.parent.mkdir(exist_ok=True)
        os.rename(d, trash)  # renames a link itself, never its target
        _remove_path(trash)
        return True

    def _remove_entry(self, key_path: str) -> bool:
        name = key_path.rsplit("/", 1)[-1]
        if name in ("", ".", "..") or "\\" in name:
            return False
        return self._delete(key_path)

    def _reset_group(self, key_path: str) -> None:
        with _flock(self.path / ".attrs.lock", exclusive=True):
            atomic_write_text(self._dir(key_path) / "zarr.json", json.dumps(_GROUP_META))

    def _staging_leftovers(self) -> list[str]:
        s = self.path / _STAGING
        if not s.is_dir():
            return []
        return [f"/{_STAGING}/{c.name}" for c in sorted(s.iterdir()) if _stage_owner(c.name) != "live"]

    def _clear_staging(self, older_than_s: float) -> int:
        s = self.path / _STAGING
        n = 0
        if s.is_dir():
            for c in s.iterdir():
                owner = _stage_owner(c.name)
                try:
                    old = time.time() - c.lstat().st_mtime >= older_than_s
                except FileNotFoundError:  # removed by its writer meanwhile
                    continue
                if owner == "dead" or (owner == "unknown" and old):
                    _remove_path(c)
                    n += 1
        return n

    def size_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.path):  # links are not followed
            for n in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, n)).st_size
        return total


_GROUP_META = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def _remove_path(p: Path) -> None:
    """Remove a file, link (not its target) or folder tree."""
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def _stage_name(kind: str = "") -> str:
    """``[kind]<uuid>.<pid>.<host>``: unique, and names its writer so leftovers of dead writers can be found."""
    return f"{kind}{uuid.uuid4().hex}.{os.getpid()}.{socket.gethostname()}"


def _stage_owner(name: str) -> str:
    """``live`` / ``dead``: the staging entry's writer runs on this host / is gone; ``unknown``: another host
    or an unnamed entry (only its age can tell)."""
    _, _, rest = name.partition(".")
    pid, _, host = rest.partition(".")
    if not pid.isdigit() or host != socket.gethostname():
        return "unknown"
    return "live" if pid_alive(int(pid)) else "dead"


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` runs on this host (it may belong to another user). A zombie (dead, not yet
    reaped by its parent, e.g. a killed dask worker before its nanny notices) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a valid pid at all
        return False
    try:  # Linux: field 3 of /proc/<pid>/stat is the state; the name before it may hold spaces and ')'
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


@contextlib.contextmanager
def _flock(lock_path: Path, exclusive: bool) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- HDF5 ------------------------------------------------------------------------------------------------
_H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


@STORE_BACKENDS.register("hdf5", suffixes=(".h5", ".hdf5"))
class H5Store(FeatureStore):
    """HDF5 file store; a reader/writer ``flock`` on ``<file>.lock`` guards every open."""

    backend = "hdf5"
    _ATTRS = "mmcli_attrs"  # JSON text: HDF5 attributes cannot hold nested dicts

    def __init__(self, path: Path, mode: str = "a") -> None:
        import h5py

        super().__init__(path, mode)
        self._h5py = h5py
        self._lock = self.path.with_name(self.path.name + ".lock")
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not an HDF5 store (a file). Fix: give a new path or an "
                             "existing .h5 file.")
        if not self.path.exists():
            if mode == "r":
                raise StoreError(f"no feature store at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with disk_full_as_error(self.path), self._open("a") as f:
                f.attrs[self._ATTRS] = json.dumps({"mmcli_version": __version__, "schema_version": SCHEMA_VERSION})
        try:
            schema = self.root_attrs().get("schema_version")
        except StoreError as e:
            raise StoreError(f"{self.path}: not a readable mmcli store ({e})") from e
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema_version {schema!r}, this mmcli reads {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _open(self, mode: str) -> Iterator[Any]:
        write = mode != "r"
        if not write and not self.path.exists():
            raise StoreError(f"no feature store at {self.path}")
        with _flock(self._lock, exclusive=write):
            try:
                f = self._h5py.File(self.path, mode, locking=False)
            except OSError as e:
                raise StoreError(f"{self.path}: cannot open HDF5 file ({e})") from e
            try:
                yield f
            finally:
                f.close()

    def _parse(self, obj: Any, where: str) -> dict[str, Any]:
        try:
            doc = json.loads(obj.attrs.get(self._ATTRS, "{}"))
        except (ValueError, TypeError, OSError) as e:
            raise StoreError(f"{self.path}: /{where}: unreadable attributes ({type(e).__name__}: {e})") from e
        if not isinstance(doc, dict):
            raise StoreError(f"{self.path}: /{where}: unreadable attributes (not a JSON object)")
        return doc

    def _write(self, key_path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        with self._open("a") as f:
            stage = f"/{_STAGING}/{uuid.uuid4().hex}"
            try:
                g = f.create_group(stage)
                for name, arr in arrays.items():
                    chunks = (max(1, min(arr.shape[0], 8192)),) + arr.shape[1:] if arr.size else None
                    g.create_dataset(name, data=arr, chunks=chunks, compression="gzip" if arr.size else None)
                g.attrs[self._ATTRS] = json.dumps(attrs)
                fault("store.staged")
                if f.get(key_path, getlink=True) is not None:
                    del f[key_path]
                parent = key_path.rsplit("/", 1)[0]
                if parent and parent not in f:
                    f.create_group(parent)
                f.move(stage, key_path)
            finally:  # a failed write (disk full, a bug) leaves no staged group behind
                with contextlib.suppress(*_H5_ERRORS):
                    if stage in f:
                        del f[stage]
                    if _STAGING in f and not len(f[_STAGING]):
                        del f[_STAGING]

    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        with self._open("r") as f:
            g = f[key_path]
            arrays = {n: g[n][()] for n in names if n in g}
            return arrays, self._parse(g, key_path)

    def _attrs(self, key_path: str) -> dict[str, Any] | None:
        with self._open("r") as f:
            try:
                if key_path and f.get(key_path, getlink=True) is None:
                    return None
                g = f[key_path] if key_path else f
            except _H5_ERRORS as e:
                raise StoreError(f"{self.path}: /{key_path}: unreadable ({type(e).__name__}: {e})") from e
            return self._parse(g, key_path)

    def _meta(self, key_path: str, arrays: tuple[str, ...]) -> tuple[dict[str, Any] | None, dict[str, tuple], list]:
        h5py = self._h5py
        with self._open("r") as f:
            try:
                link = f.get(key_path, getlink=True)
                if link is None:
                    return None, {}, []
                if not isinstance(link, h5py.HardLink):
                    raise StoreError(f"{self.path}: /{key_path} is a {type(link).__name__}")
                g = f[key_path]
                if not isinstance(g, h5py.Group):
                    raise StoreError(f"{self.path}: /{key_path} is not a group")
                attrs = self._parse(g, key_path)
                shapes, odd = {}, []
                for name in arrays:
                    a = g.get(name, getlink=True)
                    if a is None:
                        continue
                    if not isinstance(a, h5py.HardLink):
                        odd.append(f"{name} is a {type(a).__name__}")
                        continue
                    ds = g[name]
                    if not isinstance(ds, h5py.Dataset):
                        raise StoreError(f"{self.path}: /{key_path}/{name} is not a dataset")
                    shapes[name] = tuple(ds.shape)
            except _H5_ERRORS as e:
                raise StoreError(f"{self.path}: /{key_path}: unreadable ({type(e).__name__}: {e})") from e
            return attrs, shapes, odd

    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        with self._open("a") as f:
            g = f.require_group(key_path)
            try:
                meta = self._parse(g, key_path)
            except StoreError:  # unreadable: rewritten whole (group attrs hold only provenance)
                meta = {}
            meta.update(attrs)
            g.attrs[self._ATTRS] = json.dumps(meta)

    def _children(self, key_path: str) -> list[str]:
        with self._open("r") as f:
            try:
                if key_path and not isinstance(f.get(key_path, getlink=True), self._h5py.HardLink):
                    return []
                g = f[key_path] if key_path else f
                if not isinstance(g, self._h5py.Group):
                    return []
                return sorted(k for k in g if not (not key_path and k == _STAGING))
            except _H5_ERRORS as e:
                raise StoreError(f"{self.path}: /{key_path}: unreadable ({type(e).__name__}: {e})") from e

    def _entry_problem(self, key_path: str) -> str | None:
        h5py = self._h5py
        with self._open("r") as f:
            try:
                link = f.get(key_path, getlink=True)
                if isinstance(link, h5py.SoftLink):
                    return f"an HDF5 soft link (to {link.path})"
                if isinstance(link, h5py.ExternalLink):
                    return f"an HDF5 external link (to {link.filename}:{link.path})"
                if not isinstance(f[key_path], h5py.Group):
                    return "a dataset where a group belongs"
            except _H5_ERRORS as e:
                return f"unreadable ({type(e).__name__}: {e})"
        return None

    def _delete(self, key_path: str) -> bool:
        with self._open("a") as f:
            if f.get(key_path, getlink=True) is None:
                return False
            del f[key_path]
            return True

    def _remove_entry(self, key_path: str) -> bool:
        parent, _, name = key_path.rpartition("/")
        with self._open("a") as f:
            g = f[parent] if parent else f
            if g.get(name, getlink=True) is None:
                return False
            del g[name]  # removes the link only; a soft/external link's target is untouched
            return True

    def _reset_group(self, key_path: str) -> None:
        with self._open("a") as f:
            f[key_path].attrs[self._ATTRS] = "{}"

    def _staging_leftovers(self) -> list[str]:
        with self._open("r") as f:
            return [f"/{_STAGING}/{k}" for k in f[_STAGING]] if _STAGING in f else []

    def _clear_staging(self, older_than_s: float) -> int:
        # HDF5 groups carry no timestamps; staging is only ever left by a dead writer since every write
        # happens under the exclusive lock, so all of it is stale once we hold the lock.
        with self._open("a") as f:
            if _STAGING not in f:
                return 0
            n = len(f[_STAGING])
            del f[_STAGING]
            return n

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def backend_for(path: str | Path) -> str:
    """The backend whose registered suffixes match ``path`` (``.h5``/``.hdf5``: hdf5), else the default (zarr)."""
    suffix = Path(path).suffix.lower()
    for name in STORE_BACKENDS.names():
        if suffix in STORE_BACKENDS.entry(name).meta.get("suffixes", ()):
            return name
    return STORE_BACKENDS.names(default=True)[0]


def open_store(path: str | Path, mode: str = "a", backend: str | None = None) -> FeatureStore:
    """Open (mode ``a`` also creates) a feature store; the backend follows the suffix unless given."""
    return STORE_BACKENDS.get(backend or backend_for(path))(Path(path), mode)
