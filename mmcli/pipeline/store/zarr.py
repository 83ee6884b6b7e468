"""The Zarr v3 backend (the default): a directory; items are staged and renamed into place.

An item is written into ``<store>/.staging/<uuid>.<pid>.<host>`` and renamed into place (a POSIX directory
rename), so a killed writer leaves at most a staging folder that no reader looks at; the owner in its name tells
a live writer's staging from a dead one's (cleared by the next run on that host). Every chunk is written, even
an all-zero one (``write_empty_chunks``), so for an item written with checksums a missing chunk file is a lost
chunk (Zarr itself would read it as zeros): the metadata check counts chunk files against the array's shape.

The root ``zarr.json`` is created complete in one step (written beside the store, then hard-linked into it), so
a process opening a store that another one is creating sees either no root or the whole root, never one without
its ``schema_version``.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.faults import fault
from mmcli.pipeline.io import atomic_write_text, disk_full_as_error
from mmcli.pipeline.store.checksum import has_checksums
from mmcli.pipeline.store.interface import FeatureStore, register_backend
from mmcli.pipeline.store.keys import SCHEMA_VERSION, STAGING, UnsafeEntry, repair_hint
from mmcli.pipeline.store.staging import flock, remove_path, stage_name, stage_owner

GROUP_META = {"zarr_format": 3, "node_type": "group", "attributes": {}}
CHUNK_ROWS = 8192  # rows per chunk: a chunk of 1024-d float16 features is 16 MiB
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


@register_backend("zarr", suffixes=(".zarr",), default=True)
class ZarrStore(FeatureStore):
    """Zarr v3 directory store; items are staged and renamed into place."""

    backend = "zarr"

    def __init__(self, path: Path, mode: str = "a", *, check_root: bool = True) -> None:
        import zarr

        super().__init__(path, mode, check_root=check_root)
        self._zarr = zarr
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a Zarr store (a directory). Fix: give a new path or an "
                             "existing .zarr directory (use a .h5 suffix for an HDF5 store).")
        root = self.path / "zarr.json"
        if not (root.exists() or root.is_symlink() or self._has_groups()):
            if mode == "r":
                raise StoreError(f"no feature store at {self.path} (expected a .zarr directory with zarr.json)")
            # another process may create the root meanwhile: only a folder that still has none is refused
            if self.path.exists() and any(self.path.iterdir()) and not root.exists():
                raise StoreError(f"{self.path} exists, is not empty and is not a Zarr store")
            with disk_full_as_error(self.path):
                self._create_root()
        self._check_root(strict=check_root)

    def _has_groups(self) -> bool:
        """True when the folder holds Zarr groups (a store whose root metadata was lost)."""
        if not self.path.is_dir():
            return False
        return any(c.is_dir() and not c.name.startswith(".") and (c / "zarr.json").is_file()
                   for c in self.path.iterdir())

    def _create_root(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        doc = {**GROUP_META, "attributes": {"mmcli_version": __version__, "schema_version": SCHEMA_VERSION}}
        tmp = self.path.with_name(f".{self.path.name}.{stage_name('root-')}.tmp")
        try:
            tmp.write_text(json.dumps(doc))
            try:
                os.link(tmp, self.path / "zarr.json")
            except FileExistsError:  # created by another process meanwhile: the same content
                pass
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise
                os.replace(tmp, self.path / "zarr.json")
        finally:
            tmp.unlink(missing_ok=True)

    def _dir(self, key_path: str) -> Path:
        return self.path / key_path if key_path else self.path

    def _ensure_parents(self, key_path: str) -> None:
        parts = key_path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = self._dir("/".join(parts[:i]))
            if not (d / "zarr.json").exists():
                d.mkdir(parents=True, exist_ok=True)
                atomic_write_text(d / "zarr.json", json.dumps(GROUP_META))

    def _write(self, key_path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        zarr = self._zarr
        stage = self.path / STAGING / stage_name()
        stage.parent.mkdir(exist_ok=True)
        try:
            g = zarr.open_group(str(stage), mode="w", zarr_format=3)
            for name, arr in arrays.items():
                chunks = (max(1, min(arr.shape[0], CHUNK_ROWS)),) + arr.shape[1:]
                z = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                   config={"write_empty_chunks": True})
                if arr.size:
                    z[...] = arr
            g.update_attributes(attrs)  # one metadata write (attrs.update writes it once per key)
            fault("store.staged")
            self._ensure_parents(key_path)
            final = self._dir(key_path)
            trash = None
            if final.exists() or final.is_symlink():
                trash = self.path / STAGING / stage_name("old-")
                os.rename(final, trash)
            os.rename(stage, final)
            if trash is not None:
                remove_path(trash)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _refuse_links(self, key_path: str) -> None:
        links = self._deep_links(key_path)
        if links:
            raise UnsafeEntry(f"{self.path}: /{key_path} holds links ({', '.join(links[:3])}); mmcli never writes "
                              f"links and does not follow them. {repair_hint(self.path)}")

    def _read(self, key_path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._refuse_links(key_path)
        g = self._zarr.open_group(str(self._dir(key_path)), mode="r", zarr_format=3)
        present = set(g.array_keys())
        return {n: np.asarray(g[n][...]) for n in names if n in present}, dict(g.attrs)

    def _read_rows(self, key_path: str, name: str, rows: np.ndarray) -> np.ndarray:
        self._refuse_links(key_path)
        arr = self._zarr.open_array(str(self._dir(key_path) / name), mode="r", zarr_format=3)
        return np.asarray(arr.get_orthogonal_selection((rows, slice(None))))

    def _array_info(self, key_path: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
        meta = self._json(self._dir(key_path) / name / "zarr.json")
        if meta is None:
            raise StoreError(f"{self.path}: /{key_path}/{name}: no such array")
        try:
            return tuple(meta["shape"]), np.dtype(meta["data_type"])
        except (KeyError, TypeError) as e:
            raise StoreError(f"{self.path}: /{key_path}/{name}: unreadable array metadata ({e})") from e

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
        attrs = dict(doc.get("attributes", {}))
        all_chunks = has_checksums(attrs)  # written with every chunk: a missing chunk file is a lost chunk
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
            missing = _missing_chunks(a, am) if all_chunks else []
            if missing:
                odd.append(f"{name}: {len(missing)} chunk file(s) missing ({', '.join(missing[:3])}), which would "
                           "read as zeros")
        return attrs, shapes, odd

    def _set_attrs(self, key_path: str, attrs: dict[str, Any]) -> None:
        self._ensure_parents(key_path + "/x")
        meta_path = self._dir(key_path) / "zarr.json"
        with flock(self.path / ".attrs.lock", exclusive=True):
            try:
                meta = self._json(meta_path) or dict(GROUP_META)
            except StoreError:  # unreadable: rewritten whole (group attrs hold only provenance)
                meta = json.loads(json.dumps(GROUP_META))
            meta.setdefault("attributes", {}).update(attrs)
            atomic_write_text(meta_path, json.dumps(meta))

    def _children(self, key_path: str) -> list[str]:
        d = self._dir(key_path)
        if d.is_symlink() or not d.is_dir():
            return []
        return sorted(c.name for c in d.iterdir()
                      if (c.is_symlink() or c.is_dir()) and not (not key_path and c.name == STAGING))

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
        trash = self.path / STAGING / stage_name("del-")
        trash.parent.mkdir(exist_ok=True)
        os.rename(d, trash)  # renames a link itself, never its target
        remove_path(trash)
        return True

    def _remove_entry(self, key_path: str) -> bool:
        name = key_path.rsplit("/", 1)[-1]
        if name in ("", ".", "..") or "\\" in name:
            return False
        return self._delete(key_path)

    def _reset_group(self, key_path: str, attrs: dict[str, Any]) -> None:
        with flock(self.path / ".attrs.lock", exclusive=True):
            atomic_write_text(self._dir(key_path) / "zarr.json", json.dumps({**GROUP_META, "attributes": attrs}))

    def _staging_leftovers(self) -> list[str]:
        s = self.path / STAGING
        if not s.is_dir():
            return []
        return [f"/{STAGING}/{c.name}" for c in sorted(s.iterdir()) if stage_owner(c.name) != "live"]

    def _clear_staging(self, older_than_s: float) -> int:
        s = self.path / STAGING
        n = 0
        if s.is_dir():
            for c in s.iterdir():
                owner = stage_owner(c.name)
                try:
                    old = time.time() - c.lstat().st_mtime >= older_than_s
                except FileNotFoundError:  # removed by its writer meanwhile
                    continue
                if owner == "dead" or (owner == "unknown" and old):
                    remove_path(c)
                    n += 1
        return n

    def size_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.path):  # links are not followed
            for n in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, n)).st_size
        return total


def _missing_chunks(array_dir: Path, meta: dict[str, Any]) -> list[str]:
    """Chunk keys of a regular-grid, unsharded array (what mmcli writes) whose file is missing; ``[]`` for other
    layouts, which this check does not know."""
    grid, enc = meta.get("chunk_grid") or {}, meta.get("chunk_key_encoding") or {"name": "default"}
    codecs = meta.get("codecs") or []
    if grid.get("name") != "regular" or any(isinstance(c, dict) and c.get("name") == "sharding_indexed"
                                            for c in codecs):
        return []
    try:
        chunk = [int(c) for c in grid["configuration"]["chunk_shape"]]
        counts = [math.ceil(int(s) / c) for s, c in zip(meta["shape"], chunk)]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return []
    name = enc.get("name")
    sep = (enc.get("configuration") or {}).get("separator", "/" if name == "default" else ".")
    if name not in ("default", "v2") or 0 in counts:
        return []
    prefix = f"c{sep}" if name == "default" else ""
    keys = (prefix + sep.join(map(str, idx)) for idx in itertools.product(*(range(n) for n in counts)))
    return [k for k in keys if not (array_dir / k).is_file()]
