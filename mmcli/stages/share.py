"""``mmcli store share``: copy a feature store for sharing, without source paths or source fingerprints and,
with a key, with pseudonymised patient and item ids.

What the shared store holds: features, tile coordinates, tables, encoder provenance (names, weights hashes,
tile parameters). What it does not hold: source paths (folder and file names often carry names or hospital
numbers), the source files' fingerprints (size, modification time and a hash of the first 64 KiB would let
anyone holding the original slides link each shared item back to its slide; with ``--pseudonymize`` they are
replaced by an HMAC under the key, so only the key holder can check an item against a slide), weights/model/QC
file locations, absolute paths inside any text attribute, note text (never stored by extract) and, with
``--pseudonymize``, the original ids (also where they occur inside text, e.g. a warning naming the slide file).
The id mapping is never written into the shared store; the owner keeps the key file and can re-derive it, or ask
for ``--mapping`` (a CSV to keep private).

The copy is built under a temporary name beside ``dst`` and renamed into place only when complete: a refused
source (a crafted key, a corrupt item) or any failure leaves no partial destination.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mmcli.pipeline.errors import DiskFullError, InputError
from mmcli.pipeline.ids import load_or_create_key, pseudonym
from mmcli.pipeline.io import disk_full_message, write_csv
from mmcli.pipeline.manifest import load_labels
from mmcli.pipeline.store import backend_for, open_store

# attrs that hold file locations: source paths, weights files / model folders, QC images
_PATH_KEYS = {"path", "source", "slide_path", "file", "filename", "weights", "qc_png"}
_PATH_SUFFIXES = ("_path", "_folder", "_dir", "_file", "_png")
# an absolute path inside free text (a warning, a description): "/a/b..." or "C:\\a\\b..."
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:/|[A-Za-z]:\\)[^\s\"'<>|;,]*[/\\][^\s\"'<>|;,]*")


def _scrub(value: Any, replace: dict[str, str]) -> Any:
    """Drop path-like keys, blank absolute paths in text and replace original ids inside any string."""
    if isinstance(value, dict):
        return {k: _scrub(v, replace) for k, v in value.items()
                if k not in _PATH_KEYS and not k.endswith(_PATH_SUFFIXES)}
    if isinstance(value, list):
        return [_scrub(v, replace) for v in value]
    if isinstance(value, str):
        value = _ABS_PATH.sub("<path>", value)
        for old in sorted(replace, key=len, reverse=True):
            value = value.replace(old, replace[old])
        return value
    return value


def _source_names(attrs: dict[str, Any], new_item: str) -> dict[str, str]:
    """The source file's name and stem (they often carry ids, e.g. in warnings) -> the item's pseudonym."""
    fp = attrs.get("source_fingerprint")
    if not isinstance(fp, dict) or not isinstance(fp.get("path"), str):
        return {}
    src = Path(fp["path"])
    return {n: new_item for n in (src.name, src.stem) if len(n) >= 3}


def _fingerprint(attrs: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """``attrs`` without the source fingerprint (no key) or with it replaced by an HMAC under ``key``."""
    fp = attrs.pop("source_fingerprint", None)
    if key is not None and isinstance(fp, dict):
        blob = json.dumps({k: v for k, v in fp.items() if k != "path"}, sort_keys=True).encode()
        attrs["source_fingerprint"] = {"hmac_sha256": hmac.new(key, blob, hashlib.sha256).hexdigest()}
    return attrs


@contextlib.contextmanager
def _building(dst: Path) -> Iterator[Path]:
    """A temporary path beside ``dst`` (same suffix, so the same backend) that becomes ``dst`` on success and is
    removed on failure, with the HDF5 lock file beside it."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.partial{dst.suffix}")
    lock = tmp.with_name(tmp.name + ".lock")
    try:
        try:
            yield tmp
        except DiskFullError as e:  # name the destination, not its temporary name
            raise DiskFullError(disk_full_message(dst)) from e
        if dst.exists() or dst.is_symlink():
            raise InputError(f"{dst} was created by someone else meanwhile. Fix: choose a new path.")
        os.rename(tmp, dst)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


def _key(path: Path) -> tuple[bytes, bool]:
    """The pseudonymisation key of ``--pseudonymize`` (created when absent); InputError naming the flag."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a key file.", flag="--pseudonymize",
                         fix="pass a file path (a new random key is created there when it does not exist)")
    try:
        return load_or_create_key(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read or create the key file ({e.strerror or e}).", flag="--pseudonymize",
                         fix="pass a key file you can read, or a new path in a folder you can write") from e


def _check_output(path: Path, flag: str) -> None:
    """An output file path must not be a folder and its folder must exist (checked before any work)."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; {flag} takes a file path.", flag=flag)
    if not path.parent.is_dir():
        raise InputError(f"{path}: its folder {path.parent} does not exist.", flag=flag,
                         fix="create the folder first, or choose another path")


def share_store(
    src: str | Path,
    dst: str | Path,
    key_file: str | Path | None = None,
    labels: str | Path | None = None,
    labels_out: str | Path | None = None,
    mapping: str | Path | None = None,
) -> dict[str, Any]:
    """Copy ``src`` to a new store ``dst`` meant for sharing. See the module docstring for what it holds."""
    dst = Path(dst)
    src_store = open_store(src, "r")
    if dst.exists() or dst.is_symlink():
        raise InputError(f"{dst} already exists. Fix: choose a new path for the shared store.")
    if labels is not None and labels_out is None:
        raise InputError("--labels needs --labels-out (where to write the pseudonymised labels).")
    for flag, out in (("--labels-out", labels_out), ("--mapping", mapping)):
        if out is not None:
            _check_output(Path(out), flag)
    keys = list(src_store.iter_items())  # refuses a crafted source before anything is written
    tables = {t: src_store.read_table(t) for t in src_store.tables()}
    df = load_labels(labels) if labels is not None else None  # a bad labels file, too, before any output
    key, created = _key(Path(key_file)) if key_file else (None, False)
    with _building(dst) as tmp:
        res = _copy(src_store, open_store(tmp, "a", backend=backend_for(dst)), keys, tables, key)
    ids = res.pop("ids")
    if df is not None:
        df.index = [pseudonym(key, str(p)) if key else str(p) for p in df.index]
        df.index.name = "patient_id"
        write_csv(labels_out, df, index=True)
    if mapping is not None:
        write_csv(mapping, pd.DataFrame(sorted(ids.items()), columns=["patient_id", "pseudonym"]))
    return {**res, "pseudonymized": bool(key), "key_created": created}


def _copy(src_store: Any, dst_store: Any, keys: list, tables: dict[str, pd.DataFrame],
          key: bytes | None) -> dict[str, Any]:

    def pid_of(p: str) -> str:
        return pseudonym(key, p) if key else p

    def iid_of(p: str, i: str) -> str:
        return pseudonym(key, f"{p}/{i}", prefix="i", n_hex=12) if key else i

    ids: dict[str, str] = {}
    for k in keys:
        ids[k.patient_id] = pid_of(k.patient_id)
    for t in tables.values():
        ids.update({str(p): pid_of(str(p)) for p in t.index})
    for m in src_store.modalities():
        for e in src_store.encoders(m):
            dst_store.set_encoder_attrs(m, e, _scrub(src_store.encoder_attrs(m, e), ids if key else {}))
    n_items = 0
    for k in keys:
        item = src_store.read_item(k.modality, k.encoder_id, k.patient_id, k.item_id)
        new_item = iid_of(k.patient_id, k.item_id)
        replace = {**ids, k.item_id: new_item, **_source_names(item.attrs, new_item)} if key else {}
        attrs = {a: v for a, v in item.attrs.items() if a not in ("complete", "n", "dim", "arrays")}
        attrs = _scrub(_fingerprint(attrs, key), replace)
        dst_store.write_item(k.modality, k.encoder_id, ids[k.patient_id], new_item, item.features, item.coords, attrs)
        n_items += 1
    for name, t in tables.items():
        t = t.copy()
        t.index = [ids[str(p)] for p in t.index]
        dst_store.write_table(name, t)
    return {"items": n_items, "patients": len(ids), "tables": len(tables), "ids": ids}
