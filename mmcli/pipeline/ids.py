"""Patient and item ids: validation (they become store keys and file names) and keyed pseudonyms for sharing
(``HMAC-SHA256(key, id)``: without the key nobody can map a pseudonym back or test a guessed id; with the key
the owner re-derives every pseudonym, so no mapping table needs to travel)."""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from mmcli.pipeline.errors import InputError

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_ID_LEN = 128


def id_problem(value: object) -> str | None:
    """Return why ``value`` is not a safe id, or None when it is safe.

    Safe ids use only ``[A-Za-z0-9._-]``, are 1..128 characters, are not ``.``/``..`` and do not
    start with ``.`` (hidden files, staging folders) or ``-`` (option-like).
    """
    if not isinstance(value, str):
        return f"id must be text, got {type(value).__name__}"
    if value == "":
        return "id is empty"
    if len(value) > MAX_ID_LEN:
        return f"id is longer than {MAX_ID_LEN} characters"
    if not _SAFE.match(value):
        bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9._-]", c)})
        return f"id {value!r} has characters outside [A-Za-z0-9._-]: {''.join(bad)!r}"
    if value.startswith(".") or value.startswith("-"):
        return f"id {value!r} may not start with '.' or '-'"
    return None


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`InputError`."""
    problem = id_problem(value)
    if problem:
        raise InputError(f"unsafe {what}: {problem}. Fix: use only letters, digits, '.', '_' and '-'.")
    return value  # type: ignore[return-value]


# ---- pseudonyms --------------------------------------------------------------------------------------------
KEY_BYTES = 32


def load_or_create_key(path: str | Path) -> tuple[bytes, bool]:
    """Read the secret key (≥ 16 bytes) or create a new random one (mode 0600). Returns (key, created)."""
    p = Path(path)
    if p.exists():
        key = p.read_bytes().strip()
        if len(key) < 16:
            raise InputError(f"{p}: key file holds {len(key)} bytes; need at least 16. Fix: use a new key file.")
        return key, False
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_hex(KEY_BYTES).encode())
    return p.read_bytes().strip(), True


def pseudonym(key: bytes, value: str, prefix: str = "p", n_hex: int = 20) -> str:
    """Stable pseudonym of ``value``: ``<prefix>-<first n_hex hex digits of HMAC-SHA256>`` (80 bits by default)."""
    return f"{prefix}-{hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:n_hex]}"
