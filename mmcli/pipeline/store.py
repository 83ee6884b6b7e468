"""The feature store: one interface, a Zarr v3 backend (default, a directory) and an HDF5 backend (one file).

Hierarchy (same for both backends)::

    /                                     attrs: mmcli_version, schema_version
    /<modality>/<encoder_id>/             attrs: encoder-level provenance (name, dim, params)
    /<modality>/<encoder_id>/<patient_id>/<item_id>/
        features  (N, D) float16|float32
        coords    (N, 2) int64            (WSI: level-0 pixel x, y of each tile's top-left)
        attrs: provenance ..., complete=true  (written last)
    /tabular/<name>/values  (patients x features) float64, attrs: patients, columns, complete=true

Writes are atomic per item. Zarr: the item is written into ``<store>/.staging/<uuid>.<pid>.<host>`` and renamed
into place (a POSIX directory rename), so a killed writer leaves at most a staging folder that no reader looks at;
the owner in its name tells a live writer's staging from a dead one's (cleared by the next run on that host).
HDF5: the item is written under ``/.staging/<uuid>`` and moved into place under an exclusive ``flock`` on
``<file>.lock``; readers hold a shared lock, so concurrent readers never see a half-written item. HDF5 itself is
not crash-safe (a process killed inside an HDF5 write can damage the file); Zarr is the default for that reason.
Readers trust an item only when its ``complete`` attribute is true.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
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

SCHEMA_VERSION = 1
TABULAR = "tabular"
_STAGING = ".staging"


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
    """One problem found by :meth:`FeatureStore.verify`; ``where`` is a store path."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(attrs, default=_json_default))
    except (TypeError, ValueError) as e:
        raise StoreError(f"item attributes must be JSON-serialisable: {e}") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


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
        """Attrs of group ``key_path``, or None when it does not exist."""

    @abstractmethod
    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        """Merge ``attrs`` into group ``key_path`` (created if missing)."""

    @abstractmethod
    def _children(self, key_path: str) -> list[str]:
        """Names of the child groups of ``key_path`` (staging names excluded)."""

    @abstractmethod
    def _delete(self, key_path: str) -> bool:
        """Remove group ``key_path``; True if it existed."""

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
        meta.update(n=int(features.shape[0]), dim=int(features.shape[1]), complete=True)
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        arrays = {"features": features}
        if coords is not None:
            arrays["coords"] = coords
        self._write(key.path, arrays, meta)
        return key

    def read_item(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> Item:
        """Read a complete item; raises :class:`StoreError` if it is missing or incomplete."""
        key = ItemKey(modality, encoder_id, patient_id, item_id).validate()
        attrs = self._attrs(key.path)
        if attrs is None or attrs.get("complete") is not True:
            raise StoreError(f"{self.path}: no complete item at /{key.path}")
        arrays, attrs = self._read(key.path, ("features", "coords"))
        if "features" not in arrays:
            raise StoreError(f"{self.path}: item /{key.path} has no features array")
        return Item(key, arrays["features"], arrays.get("coords"), attrs)

    def item_attrs(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> dict[str, Any] | None:
        """Attrs of an item (complete or not), or None when absent."""
        return self._attrs(ItemKey(modality, encoder_id, patient_id, item_id).validate().path)

    def is_cached(
        self, modality: str, encoder_id: str, patient_id: str, item_id: str, fingerprint: dict | None = None
    ) -> bool:
        """True when the item is complete and (if given) its ``source_fingerprint`` equals ``fingerprint``."""
        attrs = self.item_attrs(modality, encoder_id, patient_id, item_id)
        if not attrs or attrs.get("complete") is not True:
            return False
        return fingerprint is None or attrs.get("source_fingerprint") == _jsonable(fingerprint)

    def delete_item(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> bool:
        self._writable()
        return self._delete(ItemKey(modality, encoder_id, patient_id, item_id).validate().path)

    def iter_items(
        self, modality: str | None = None, encoder_id: str | None = None, include_incomplete: bool = False
    ) -> Iterator[ItemKey]:
        """Keys of items, sorted; incomplete ones only when ``include_incomplete``."""
        for m in [modality] if modality else self.modalities():
            for e in [encoder_id] if encoder_id else self.encoders(m):
                for p in self._keys(f"{m}/{e}"):
                    for i in self._keys(f"{m}/{e}/{p}"):
                        key = ItemKey(m, e, p, i)
                        if include_incomplete or (self._attrs(key.path) or {}).get("complete") is True:
                            yield key

    def _keys(self, key_path: str) -> list[str]:
        """Child group names, each a safe id. mmcli writes no other names, so another one means the store was
        changed by hand or crafted: it is refused rather than used as a key, CSV value or file name."""
        names = self._children(key_path)
        for n in names:
            problem = id_problem(n)
            if problem:
                raise StoreError(f"{self.path}: entry /{key_path + '/' if key_path else ''}{n}: {problem}; mmcli "
                                 "never writes such a key. Fix: remove or rename that entry.")
        return names

    def modalities(self) -> list[str]:
        return [m for m in self._keys("") if m != TABULAR]

    def encoders(self, modality: str) -> list[str]:
        return self._keys(modality)

    def patients(self, modality: str, encoder_id: str) -> list[str]:
        """Patients with at least one complete item for this modality and encoder."""
        return sorted({k.patient_id for k in self.iter_items(modality, encoder_id)})

    def encoder_attrs(self, modality: str, encoder_id: str) -> dict[str, Any]:
        return self._attrs(f"{modality}/{encoder_id}") or {}

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
        self._write(f"{TABULAR}/{name}", {"values": values}, meta)

    def read_table(self, name: str) -> pd.DataFrame:
        check_id(name, "table name")
        attrs = self._attrs(f"{TABULAR}/{name}")
        if not attrs or attrs.get("complete") is not True:
            raise StoreError(f"{self.path}: no table named {name!r} (tables: {self.tables()})")
        arrays, attrs = self._read(f"{TABULAR}/{name}", ("values",))
        bad = [p for p in attrs["patients"] if id_problem(p)]
        if bad:
            raise StoreError(f"{self.path}: table {name!r} lists unsafe patient ids {bad[:3]}; mmcli never writes "
                             "such ids. Fix: rebuild the table with `mmcli extract --modality tabular`.")
        return pd.DataFrame(
            arrays["values"], index=pd.Index(attrs["patients"], name="patient_id"), columns=attrs["columns"]
        )

    def tables(self) -> list[str]:
        return [t for t in self._keys(TABULAR) if (self._attrs(f"{TABULAR}/{t}") or {}).get("complete")]

    # ---- whole-store views ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Summary: modalities, encoders, patients, items, dims, rows and sizes."""
        mods: dict[str, Any] = {}
        for m in self.modalities():
            mods[m] = {}
            for e in self.encoders(m):
                keys = list(self.iter_items(m, e, include_incomplete=True))
                done = [k for k in keys if (self._attrs(k.path) or {}).get("complete") is True]
                dims = sorted({(self._attrs(k.path) or {}).get("dim") for k in done} - {None})
                rows = sum(int((self._attrs(k.path) or {}).get("n", 0)) for k in done)
                mods[m][e] = {
                    "encoder": self.encoder_attrs(m, e).get("encoder"),
                    "patients": len({k.patient_id for k in done}),
                    "items": len(done),
                    "incomplete_items": len(keys) - len(done),
                    "dims": dims,
                    "rows": rows,
                }
        tables = {}
        for t in self.tables():
            attrs = self._attrs(f"{TABULAR}/{t}") or {}
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
        """Every incomplete or corrupt item, table and staging leftover, as a list of problems.

        With ``check_sources``, an item whose source file is still reachable at its recorded path must match
        its recorded fingerprint (a changed slide means stale features); unreachable sources are not checked.
        """
        problems = [Problem(s, "staging data left by an interrupted writer") for s in self._staging_leftovers()]
        for m in self.modalities():
            for e in self.encoders(m):
                dims: dict[int, str] = {}
                for key in self.iter_items(m, e, include_incomplete=True):
                    problems += self._verify_item(key, check_values, dims, check_sources)
                if len(dims) > 1:
                    problems.append(Problem(f"/{m}/{e}", f"items disagree on feature dim: {sorted(dims)}"))
        for t in self._keys(TABULAR):
            attrs = self._attrs(f"{TABULAR}/{t}") or {}
            if attrs.get("complete") is not True:
                problems.append(Problem(f"/{TABULAR}/{t}", "incomplete table"))
        return problems

    def _verify_item(
        self, key: ItemKey, check_values: bool, dims: dict[int, str], check_sources: bool = True
    ) -> list[Problem]:
        where = f"/{key.path}"
        attrs = self._attrs(key.path) or {}
        if attrs.get("complete") is not True:
            return [Problem(where, "incomplete item (complete flag missing)")]
        try:
            arrays, _ = self._read(key.path, ("features", "coords"))
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
        if check_sources and isinstance(fp, dict) and fp.get("path") and Path(fp["path"]).is_file():
            from mmcli.pipeline.fingerprint import source_fingerprint

            if source_fingerprint(fp["path"]) != fp:
                out.append(Problem(where, f"source {fp['path']} changed since extraction (stale features)"))
        return out

    def repair(self, problems: list[Problem] | None = None, staging_older_than_s: float = 3600.0) -> list[str]:
        """Remove items listed by :meth:`verify` (so a re-run redoes them) and old staging leftovers."""
        self._writable()
        removed = []
        for p in problems if problems is not None else self.verify():
            parts = p.where.strip("/").split("/")
            is_item = len(parts) == 4 and parts[0] != _STAGING
            is_table = len(parts) == 2 and parts[0] == TABULAR
            if (is_item or is_table) and self._delete("/".join(parts)):
                removed.append(p.where)
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
class ZarrStore(FeatureStore):
    """Zarr v3 directory store; items are staged and renamed into place."""

    backend = "zarr"

    def __init__(self, path: Path, mode: str = "a") -> None:
        import zarr

        super().__init__(path, mode)
        self._zarr = zarr
        if not (self.path / "zarr.json").exists():
            if mode == "r":
                raise StoreError(f"no feature store at {self.path} (expected a .zarr directory with zarr.json)")
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreError(f"{self.path} exists, is not empty and is not a Zarr store")
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
                _atomic_write_text(d / "zarr.json", json.dumps(_GROUP_META))

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
            g.attrs.update(attrs)
            fault("store.staged")
            self._ensure_parents(key_path)
            final = self._dir(key_path)
            trash = None
            if final.exists():
                trash = self.path / _STAGING / _stage_name("old-")
                os.rename(final, trash)
            os.rename(stage, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        g = self._zarr.open_group(str(self._dir(key_path)), mode="r", zarr_format=3)
        present = set(g.array_keys())
        return {n: np.asarray(g[n][...]) for n in names if n in present}, dict(g.attrs)

    def _attrs(self, key_path: str) -> dict[str, Any] | None:
        meta = self._dir(key_path) / "zarr.json"
        try:
            return dict(json.loads(meta.read_text()).get("attributes", {}))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError) as e:
            raise StoreError(f"{meta}: unreadable metadata ({e})") from e

    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        self._ensure_parents(key_path + "/x")
        meta_path = self._dir(key_path) / "zarr.json"
        with _flock(self.path / ".attrs.lock", exclusive=True):
            meta = json.loads(meta_path.read_text())
            meta.setdefault("attributes", {}).update(attrs)
            _atomic_write_text(meta_path, json.dumps(meta))

    def _children(self, key_path: str) -> list[str]:
        d = self._dir(key_path)
        if not d.is_dir():
            return []
        return sorted(
            c.name for c in d.iterdir() if not c.name.startswith(".") and (c / "zarr.json").is_file()
            and json.loads((c / "zarr.json").read_text()).get("node_type") == "group"
        )

    def _delete(self, key_path: str) -> bool:
        d = self._dir(key_path)
        if not d.exists():
            return False
        trash = self.path / _STAGING / _stage_name("del-")
        trash.parent.mkdir(exist_ok=True)
        os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

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
                    old = time.time() - c.stat().st_mtime >= older_than_s
                except FileNotFoundError:  # removed by its writer meanwhile
                    continue
                if owner == "dead" or (owner == "unknown" and old):
                    shutil.rmtree(c, ignore_errors=True)
                    n += 1
        return n

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


_GROUP_META = {"zarr_format": 3, "node_type": "group", "attributes": {}}


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _flock(lock_path: Path, exclusive: bool) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- HDF5 ------------------------------------------------------------------------------------------------
class H5Store(FeatureStore):
    """HDF5 file store; a reader/writer ``flock`` on ``<file>.lock`` guards every open."""

    backend = "hdf5"
    _ATTRS = "mmcli_attrs"  # JSON text: HDF5 attributes cannot hold nested dicts

    def __init__(self, path: Path, mode: str = "a") -> None:
        import h5py

        super().__init__(path, mode)
        self._h5py = h5py
        self._lock = self.path.with_name(self.path.name + ".lock")
        if not self.path.exists():
            if mode == "r":
                raise StoreError(f"no feature store at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._open("a") as f:
                f.attrs[self._ATTRS] = json.dumps({"mmcli_version": __version__, "schema_version": SCHEMA_VERSION})
        schema = self.root_attrs().get("schema_version")
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

    def _write(self, key_path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        with self._open("a") as f:
            stage = f"/{_STAGING}/{uuid.uuid4().hex}"
            g = f.create_group(stage)
            for name, arr in arrays.items():
                chunks = (max(1, min(arr.shape[0], 8192)),) + arr.shape[1:] if arr.size else None
                g.create_dataset(name, data=arr, chunks=chunks, compression="gzip" if arr.size else None)
            g.attrs[self._ATTRS] = json.dumps(attrs)
            fault("store.staged")
            if key_path in f:
                del f[key_path]
            parent = key_path.rsplit("/", 1)[0]
            if parent and parent not in f:
                f.create_group(parent)
            f.move(stage, key_path)
            if not len(f[_STAGING]):
                del f[_STAGING]

    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        with self._open("r") as f:
            g = f[key_path]
            arrays = {n: g[n][()] for n in names if n in g}
            return arrays, json.loads(g.attrs.get(self._ATTRS, "{}"))

    def _attrs(self, key_path: str) -> dict[str, Any] | None:
        with self._open("r") as f:
            if key_path and key_path not in f:
                return None
            g = f[key_path] if key_path else f
            return json.loads(g.attrs.get(self._ATTRS, "{}"))

    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        with self._open("a") as f:
            g = f.require_group(key_path)
            meta = json.loads(g.attrs.get(self._ATTRS, "{}"))
            meta.update(attrs)
            g.attrs[self._ATTRS] = json.dumps(meta)

    def _children(self, key_path: str) -> list[str]:
        with self._open("r") as f:
            if key_path and key_path not in f:
                return []
            g = f[key_path] if key_path else f
            return sorted(
                k for k in g if not k.startswith(".") and isinstance(g[k], self._h5py.Group)
            )

    def _delete(self, key_path: str) -> bool:
        with self._open("a") as f:
            if key_path not in f:
                return False
            del f[key_path]
            return True

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


BACKENDS: dict[str, type[FeatureStore]] = {"zarr": ZarrStore, "hdf5": H5Store}


def backend_for(path: str | Path) -> str:
    """``hdf5`` for ``.h5``/``.hdf5`` paths, else ``zarr``."""
    return "hdf5" if Path(path).suffix.lower() in (".h5", ".hdf5") else "zarr"


def open_store(path: str | Path, mode: str = "a", backend: str | None = None) -> FeatureStore:
    """Open (mode ``a`` also creates) a feature store; the backend follows the suffix unless given."""
    backend = backend or backend_for(path)
    if backend not in BACKENDS:
        raise StoreError(f"unknown store backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](Path(path), mode)
