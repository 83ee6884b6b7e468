"""The HDF5 backend: one file, same hierarchy as the Zarr store.

An item is written under ``/.staging/<uuid>`` and moved into place under an exclusive ``flock`` on
``<file>.lock``; readers hold a shared lock, so concurrent readers never see a half-written item. HDF5 itself is
not crash-safe (a process killed inside an HDF5 write can damage the file); Zarr is the default for that reason.
Attributes are one JSON text per group (HDF5 attributes cannot hold nested dicts).
"""
from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.faults import fault
from mmcli.pipeline.io import disk_full_as_error
from mmcli.pipeline.store.checksum import has_checksums
from mmcli.pipeline.store.interface import FeatureStore, register_backend
from mmcli.pipeline.store.keys import SCHEMA_VERSION, STAGING
from mmcli.pipeline.store.staging import flock

_H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)
CHUNK_ROWS = 8192


@register_backend("hdf5", suffixes=(".h5", ".hdf5"))
class H5Store(FeatureStore):
    """HDF5 file store; a reader/writer ``flock`` on ``<file>.lock`` guards every open."""

    backend = "hdf5"
    _ATTRS = "mmcli_attrs"  # JSON text: HDF5 attributes cannot hold nested dicts

    def __init__(self, path: Path, mode: str = "a", *, check_root: bool = True) -> None:
        import h5py

        super().__init__(path, mode, check_root=check_root)
        self._h5py = h5py
        self._lock = self.path.with_name(self.path.name + ".lock")
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not an HDF5 store (a file). Fix: give a new path or an "
                             "existing .h5 file.")
        if not self.path.exists():
            if mode == "r":
                raise StoreError(f"no feature store at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with disk_full_as_error(self.path), self._open("a") as f:  # under the lock: readers wait for it
                if self._ATTRS not in f.attrs:  # not created by another process meanwhile
                    f.attrs[self._ATTRS] = json.dumps({"mmcli_version": __version__,
                                                       "schema_version": SCHEMA_VERSION})
        try:
            with self._open("r"):
                pass
        except StoreError as e:  # not an HDF5 file at all: nothing to repair
            raise StoreError(f"{self.path}: not a readable mmcli store ({e})") from e
        self._check_root(strict=check_root)

    @contextlib.contextmanager
    def _open(self, mode: str) -> Iterator[Any]:
        write = mode != "r"
        if not write and not self.path.exists():
            raise StoreError(f"no feature store at {self.path}")
        with flock(self._lock, exclusive=write):
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
            stage = f"/{STAGING}/{uuid.uuid4().hex}"
            try:
                g = f.create_group(stage)
                for name, arr in arrays.items():
                    chunks = (max(1, min(arr.shape[0], CHUNK_ROWS)),) + arr.shape[1:] if arr.size else None
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
                    if STAGING in f and not len(f[STAGING]):
                        del f[STAGING]

    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        with self._open("r") as f:
            g = f[key_path]
            arrays = {n: g[n][()] for n in names if n in g}
            return arrays, self._parse(g, key_path)

    def _read_rows(self, key_path: str, name: str, rows: np.ndarray) -> np.ndarray:
        # one contiguous slab per chunk touched: HDF5 decodes each chunk once (fancy indexing with the default
        # 1 MiB chunk cache could decode a 16 MiB chunk again for every row)
        with self._open("r") as f:
            ds = f[key_path][name]
            step = ds.chunks[0] if ds.chunks else max(1, ds.shape[0])
            out = np.empty((rows.size,) + ds.shape[1:], dtype=ds.dtype)
            which = rows // step
            for c in np.unique(which):
                sel = np.flatnonzero(which == c)
                lo, hi = int(rows[sel[0]]), int(rows[sel[-1]]) + 1
                out[sel] = ds[lo:hi][rows[sel] - lo]
            return out

    def _array_info(self, key_path: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
        with self._open("r") as f:
            try:
                ds = f[key_path][name]
                return tuple(ds.shape), np.dtype(ds.dtype)
            except _H5_ERRORS as e:
                raise StoreError(f"{self.path}: /{key_path}/{name}: unreadable ({type(e).__name__}: {e})") from e

    def _attrs(self, key_path: str) -> dict[str, Any] | None:
        with self._open("r") as f:
            try:
                if key_path and f.get(key_path, getlink=True) is None:
                    return None
                g = f[key_path] if key_path else f
            except _H5_ERRORS as e:
                raise StoreError(f"{self.path}: /{key_path}: unreadable ({type(e).__name__}: {e})") from e
            if not key_path and self._ATTRS not in g.attrs:
                return None
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
                all_chunks = has_checksums(attrs)
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
                    if all_chunks and ds.chunks and ds.size:
                        want = math.prod(math.ceil(s / c) for s, c in zip(ds.shape, ds.chunks))
                        have = ds.id.get_num_chunks()
                        if have < want:
                            odd.append(f"{name}: {want - have} of {want} chunks missing, which would read as zeros")
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
                return sorted(k for k in g if not (not key_path and k == STAGING))
            except _H5_ERRORS as e:
                raise StoreError(f"{self.path}: /{key_path}: unreadable ({type(e).__name__}: {e})") from e

    def _entry_problem(self, key_path: str) -> str | None:
        h5py = self._h5py
        with self._open("r") as f:
            try:
                link = f.get(key_path, getlink=True)
                if link is None:
                    return None
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

    def _reset_group(self, key_path: str, attrs: dict[str, Any]) -> None:
        with self._open("a") as f:
            (f[key_path] if key_path else f).attrs[self._ATTRS] = json.dumps(attrs)

    def _staging_leftovers(self) -> list[str]:
        with self._open("r") as f:
            return [f"/{STAGING}/{k}" for k in f[STAGING]] if STAGING in f else []

    def _clear_staging(self, older_than_s: float) -> int:
        # HDF5 groups carry no timestamps; staging is only ever left by a dead writer since every write
        # happens under the exclusive lock, so all of it is stale once we hold the lock.
        with self._open("a") as f:
            if STAGING not in f:
                return 0
            n = len(f[STAGING])
            del f[STAGING]
            return n

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0
