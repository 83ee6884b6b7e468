"""Keyed pseudonyms for sharing: ``HMAC-SHA256(key, id)``. Without the key nobody can map a pseudonym back
or test a guessed id; with the key the owner re-derives every pseudonym (no mapping table needs to travel)."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from mmcli.pipeline.errors import InputError

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
