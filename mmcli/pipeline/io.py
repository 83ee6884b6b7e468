"""Atomic file writes, JSON and CSV: the one implementation every module uses.

Every file mmcli writes goes through a temporary name in the same folder and ``os.replace``, so a reader
(or a crash) never sees half a file; a failed write removes its temporary file. A full disk (ENOSPC)
becomes a :class:`~mmcli.pipeline.errors.DiskFullError` naming the path (:func:`is_disk_full`, the one
disk-full test, also used by the item runner and the run folder writer). CSV cells and headers are escaped
against formula injection (OWASP): a text value starting with ``=``, ``+``, ``-``, ``@``, tab or CR gets a
leading ``'``, so a spreadsheet shows it as text instead of running it. Numbers are never touched.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.errors import DiskFullError

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
LONE_SIGNS = ("-", "+")  # a sign alone is no formula (e.g. "-" for "not applicable"): left as written


# ---- atomic writes ---------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_full_as_error(path):
            yield tmp
            os.chmod(tmp, mode)  # mkstemp makes 0600; results are meant to be read by others
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Text that says "disk full" where a library dropped the errno (h5py, safetensors, xgboost's FileStream on a short
# write): matched anywhere in an exception chain by :func:`is_disk_full`.
DISK_FULL_TEXT = ("No space left on device", "os error 28", "Errno 28", "errno = 28", "Disk quota exceeded",
                  "Write incomplete")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during (each once)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in ``exc``'s chain: raised directly, as a :class:`DiskFullError`, or wrapped by a
    library that kept only the message (:data:`DISK_FULL_TEXT`). The one disk-full test of mmcli."""
    for e in _chain(exc):
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in DISK_FULL_TEXT):
            return True
    return False


def is_read_only(exc: BaseException) -> bool:
    """EROFS (a read-only file system) anywhere in ``exc``'s chain."""
    return any(isinstance(e, OSError) and e.errno == errno.EROFS for e in _chain(exc))


@contextmanager
def disk_full_as_error(path: str | Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk met inside the block (:func:`is_disk_full`) into :class:`DiskFullError` naming ``path``;
    a :class:`DiskFullError` raised inside passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(disk_full_message(path, needed_bytes)) from e
        raise


def disk_full_message(path: str | Path, needed_bytes: int | None = None) -> str:
    target = Path(path)
    where = next((p for p in [target, *target.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    need = f" (needs about {max(1, math.ceil(needed_bytes / 1e6))} MB more)" if needed_bytes else ""
    return (f"disk full: {path}{need}; {free / 1e6:.0f} MB free on that device. "
            "Fix: free space (or pick another location), then re-run: finished work is kept.")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp_path)`` fills the temporary file (e.g. an h5 file, a PNG, a matplotlib figure)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


# ---- JSON ------------------------------------------------------------------------------------------------------
def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays, tuples, sets and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def dumps(doc: Any, *, indent: int | None = 2, allow_nan: bool = False) -> str:
    """JSON text; NaN/inf refused by default (write ``None`` for an undefined number)."""
    return json.dumps(doc, indent=indent, default=json_default, allow_nan=allow_nan)


def write_json(path: str | Path, doc: Any, *, allow_nan: bool = False) -> Path:
    return atomic_write_text(path, dumps(doc, allow_nan=allow_nan))


def jsonable(doc: Any) -> Any:
    """``doc`` with numpy values etc. turned into plain JSON types (a round trip through JSON)."""
    return json.loads(json.dumps(doc, default=json_default))


# ---- CSV -------------------------------------------------------------------------------------------------------
def escape_cell(value: Any) -> Any:
    """A text value that a spreadsheet would run as a formula gets a leading ``'``; others pass through."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and value not in LONE_SIGNS:
        return "'" + value
    return value


def _escape_column(col: Any) -> Any:
    """``col`` with its text cells escaped, each distinct value looked at once (an attention table repeats a
    patient id for each of its thousands of tiles)."""
    import pandas as pd

    changed = {v: e for v in pd.unique(col) for e in [escape_cell(v)] if e is not v}
    return col.map(lambda v: changed.get(v, v)) if changed else col


def safe_frame(df: Any) -> Any:
    """A copy of DataFrame ``df`` with text cells, the header and a text index escaped (see module doc)."""
    out = df.copy()
    out.columns = [escape_cell(str(c)) if isinstance(c, str) else c for c in out.columns]
    for col in out.columns:
        if out[col].dtype == object or str(out[col].dtype) in ("string", "category"):
            out[col] = _escape_column(out[col])
    if out.index.dtype == object:
        out.index = out.index.map(escape_cell)
        if isinstance(out.index.name, str):
            out.index.name = escape_cell(out.index.name)
    return out


def write_csv(path: str | Path, df: Any, *, index: bool = False, float_format: str | None = "%.8g") -> Path:
    """Write DataFrame ``df`` atomically, formula-escaped (the one CSV writer of mmcli)."""
    safe = safe_frame(df)
    return atomic_write_with(path, lambda tmp: safe.to_csv(tmp, index=index, float_format=float_format))
