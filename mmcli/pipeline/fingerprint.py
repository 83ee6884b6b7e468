"""Source fingerprints and content hashes: what decides whether a cached item is still valid.

A source file's fingerprint (:func:`source_fingerprint`) is its resolved path, size, mtime and the SHA-256 of
its first 64 KiB, plus the SHA-256 of the whole file when it is at most :data:`FULL_HASH_MAX` bytes (notes, MRI
volumes, tables, small slides). :func:`same_source` decides whether a cached item still matches its file: same
path, size and head hash, and then either the same mtime or, where both fingerprints carry it, the same whole-file
hash. So a file rewritten with identical bytes (``mmcli synth`` run again, ``cp`` or ``touch``) is unchanged;
an edited one is not. A file above :data:`FULL_HASH_MAX` whose mtime changed counts as changed: hashing every
large slide whole on every resume check would cost a read of the whole cohort.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

HEAD_BYTES = 1 << 16
FULL_HASH_MAX = 32 << 20  # bytes: files up to this size also carry the SHA-256 of their whole content
IDENTITY = ("path", "size", "head_sha256")  # what must match for a file to be the same source


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file (used for weights files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(path: str | Path) -> dict[str, Any]:
    """Cheap identity of a source file: resolved path, size, mtime (ns), SHA-256 of its first 64 KiB and, for a
    file of at most :data:`FULL_HASH_MAX` bytes, ``sha256`` of the whole file.

    A cached item is reused only while :func:`same_source` holds, so an edited or replaced file is re-extracted.
    """
    p = Path(path).resolve()
    st = p.stat()
    with open(p, "rb") as fh:
        head_bytes = fh.read(HEAD_BYTES)
        out = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
               "head_sha256": hashlib.sha256(head_bytes).hexdigest()}
        if st.st_size <= FULL_HASH_MAX:
            whole = hashlib.sha256(head_bytes)
            while block := fh.read(1 << 20):
                whole.update(block)
            out["sha256"] = whole.hexdigest()
    return out


def same_source(recorded: Any, current: Any) -> bool:
    """True when ``current`` (a fresh :func:`source_fingerprint`) is the file ``recorded`` was taken of:
    identical fingerprints; or the same path, size and head hash with the same mtime, or with a different mtime
    and the same whole-file ``sha256`` (both must carry it). Fingerprints written before ``sha256`` existed still
    match while the mtime is unchanged."""
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return False
    if recorded == current:
        return True
    if any(k not in recorded or recorded.get(k) != current.get(k) for k in IDENTITY):
        return False
    if recorded.get("mtime_ns") == current.get("mtime_ns"):
        return recorded.get("sha256", current.get("sha256")) == current.get("sha256", recorded.get("sha256"))
    return recorded.get("sha256") is not None and recorded.get("sha256") == current.get("sha256")


def params_hash(params: dict[str, Any], n: int = 10) -> str:
    """Short stable hash of a JSON-able parameter dict."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def make_encoder_id(name: str, weights_sha256: str | None, params: dict[str, Any]) -> str:
    """``<name>-<hash>``: the hash covers the weights and the preprocessing params, so features of different
    encoders or settings never mix and a changed parameter never reuses stale features."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "encoder"
    return f"{safe}-{params_hash({'weights': weights_sha256 or 'random-init', **params})}"
