"""Validation of ``patient_id`` / ``item_id``: they become store keys and file names."""
from __future__ import annotations

import re

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
