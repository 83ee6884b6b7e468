"""Source fingerprints and content hashes: what decides whether a cached item is still valid."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

HEAD_BYTES = 1 << 16


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file (used for weights files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(path: str | Path) -> dict[str, Any]:
    """Cheap identity of a source file: resolved path, size, mtime (ns) and SHA-256 of its first 64 KiB.

    A cached item is reused only while this matches, so an edited or replaced file is re-extracted.
    """
    p = Path(path).resolve()
    st = p.stat()
    with open(p, "rb") as fh:
        head = hashlib.sha256(fh.read(HEAD_BYTES)).hexdigest()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def params_hash(params: dict[str, Any], n: int = 10) -> str:
    """Short stable hash of a JSON-able parameter dict."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def make_encoder_id(name: str, weights_sha256: str | None, params: dict[str, Any]) -> str:
    """``<name>-<hash>``: the hash covers the weights and the preprocessing params, so features of different
    encoders or settings never mix and a changed parameter never reuses stale features."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "encoder"
    return f"{safe}-{params_hash({'weights': weights_sha256 or 'random-init', **params})}"
