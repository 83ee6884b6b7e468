"""The append-only, hash-chained audit log of ``mmcli serve``, and ``mmcli audit verify``.

One JSON object per line (keys sorted, no spaces), written with ``os.write`` and ``fsync``'d before the
response leaves the server::

    {"hash": H_n, "input_sha256": ..., "latency_ms": ..., "model_sha256": ..., "output": {...},
     "prev": H_{n-1}, "request_id": ..., "seq": n, "time": "2025-01-01T12:00:00.000000+00:00"}

* ``hash`` is the sha256 of the line's canonical JSON without the ``hash`` key (so it covers ``prev``);
  ``prev`` is the ``hash`` of the line before, :data:`GENESIS` for the first line ever; ``seq`` counts
  from 1 across files. Editing a line breaks its own ``hash``; rewriting it with a fresh hash breaks the
  next line's ``prev``; removing or reordering lines breaks ``seq`` and ``prev``.
* Rotation: when a line would take the current file ``LOG`` over ``max_bytes``, ``LOG`` is renamed to
  ``LOG.000001`` (then ``.000002``, ... : a higher number is a newer file) and a new ``LOG`` begins; its
  first line's ``prev`` is the last ``hash`` of the file before, so the chain runs across files.
* ``LOG.head`` holds ``{"seq", "hash"}`` of the last line written (a fixed 128-byte record overwritten in
  place and synced after each line): a log cut at a line boundary, or a whole file removed at the end, no
  longer reaches it.

What a line never holds: patient ids, names, file paths or feature values (only their sha256).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import EXIT_ITEM_FAILURES, InputError, MmcliError
from mmcli.pipeline.io import disk_full_as_error

GENESIS = "0" * 64
HEAD_SUFFIX = ".head"
HEAD_BYTES = 128  # the head record, space-padded: {"seq": N, "hash": "<64 hex>"} fits with room for N
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_ROTATED = re.compile(r"\.(\d{6})$")


class AuditChainError(MmcliError):
    """The audit log was edited, reordered, cut or partly removed (exit 1); the message names the line."""

    exit_code = EXIT_ITEM_FAILURES


def canonical(entry: Mapping[str, Any]) -> str:
    """The one JSON spelling hashed and written: sorted keys, no spaces, NaN refused."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 of the entry's canonical JSON without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode("ascii")).hexdigest()


def log_files(path: str | Path) -> list[Path]:
    """The files of log ``path``, oldest first: ``path.000001``, ``path.000002``, ..., then ``path``."""
    path = Path(path)
    rotated = sorted((int(m.group(1)), p) for p in path.parent.glob(path.name + ".*")
                     if (m := _ROTATED.search(p.name)) and p.name == f"{path.name}.{m.group(1)}")
    files = [p for _, p in rotated]
    if path.is_file():
        files.append(path)
    return files


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_head(path: Path) -> dict[str, Any] | None:
    head = _head_path(path)
    if not head.is_file():
        return None
    try:
        doc = json.loads(head.read_text())
        if isinstance(doc, dict) and isinstance(doc.get("seq"), int) and isinstance(doc.get("hash"), str):
            return doc
    except (OSError, ValueError):
        pass
    raise AuditChainError(f"{head}: not a readable audit head (expected {{\"seq\": N, \"hash\": H}}).")


# ---- writing ---------------------------------------------------------------------------------------------
class AuditLog:
    """Appends chained lines to ``path`` (thread-safe; one writer process per log).

    Opening an existing log checks that its last line is the one ``LOG.head`` records (a full check is
    ``mmcli audit verify``); a log that does not match is refused with an :class:`InputError`.
    """

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1024:
            raise InputError(f"audit log rotation size {max_bytes} bytes is too small (minimum 1024).",
                             flag="--audit-max-bytes")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._head_fd = -1
        self.seq, self.last_hash = self._resume()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self.seq == 0:  # a new log: its head exists from the start, so removing every line is noticed
            self._write_head(0, GENESIS)
        _fsync_dir(self.path.parent)  # the new file names (log, head) survive a crash

    def _resume(self) -> tuple[int, str]:
        files = log_files(self.path)
        head = _read_head(self.path)
        if not files and head is None:
            return 0, GENESIS
        fix = (f"run `mmcli audit verify {self.path}`; to start a new log, move the old files "
               f"({self.path.name}*) aside or pass another --audit-log.")
        if head is None:
            raise InputError(f"{self.path}: audit log without its head file {_head_path(self.path).name}: it "
                             "cannot be continued safely.", fix=fix)
        last = None
        if head["seq"] == 0 and head["hash"] == GENESIS and all(f.stat().st_size == 0 for f in files):
            return 0, GENESIS
        for f in reversed(files):
            last = _last_line(f)
            if last is not None:
                break
        try:
            entry = json.loads(last) if last is not None else None
        except ValueError:
            entry = None
        ok = isinstance(entry, dict) and isinstance(entry.get("hash"), str) and entry_hash(entry) == entry["hash"]
        if ok and entry.get("seq") == head["seq"] and entry["hash"] == head["hash"]:
            return int(head["seq"]), str(head["hash"])
        if ok and entry.get("seq") == head["seq"] + 1 and entry.get("prev") == head["hash"]:
            # stopped between fsyncing a line and moving the head: the line is whole and chains
            self._write_head(int(entry["seq"]), str(entry["hash"]))
            return int(entry["seq"]), str(entry["hash"])
        raise InputError(f"{self.path}: the log's last line does not match its head "
                         f"(seq {head['seq']}); it was cut or edited.", fix=fix)

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one line (``record`` + time, seq, prev, hash), sync it, then move the head; returns the entry."""
        with self._lock:
            entry = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                     **record, "seq": self.seq + 1, "prev": self.last_hash}
            entry["hash"] = entry_hash(entry)
            line = (canonical(entry) + "\n").encode("ascii")
            with disk_full_as_error(self.path, len(line)):
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                os.write(self._fd, line)
                os.fdatasync(self._fd)  # data and size; not the mtime
                self._size += len(line)
                self._write_head(entry["seq"], entry["hash"])
            self.seq, self.last_hash = entry["seq"], entry["hash"]
            return entry

    def _rotate(self) -> None:
        numbers = [int(m.group(1)) for p in log_files(self.path)[:-1] if (m := _ROTATED.search(p.name))]
        target = self.path.with_name(f"{self.path.name}.{max(numbers, default=0) + 1:06d}")
        os.close(self._fd)
        os.rename(self.path, target)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._size = 0
        _fsync_dir(self.path.parent)

    def _write_head(self, seq: int, last: str) -> None:
        """Overwrite the head in place: one fixed-size record (well under a disk sector, so written whole),
        fdatasync'd; about half the cost of a write-rename-fsync on every request."""
        if self._head_fd < 0:
            self._head_fd = os.open(_head_path(self.path), os.O_WRONLY | os.O_CREAT, 0o600)
        record = json.dumps({"seq": seq, "hash": last}).encode("ascii").ljust(HEAD_BYTES)
        os.pwrite(self._head_fd, record, 0)
        os.fdatasync(self._head_fd)

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._head_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._head_fd = -1


def _last_line(path: Path, block: int = 65536) -> str | None:
    """The last line of ``path`` (with or without its newline), None when the file is empty."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        if end == 0:
            return None
        data = b""
        pos = end
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
            body = data[:-1] if data.endswith(b"\n") else data
            if b"\n" in body:
                return body.rsplit(b"\n", 1)[1].decode("utf-8", "replace")
        return (data[:-1] if data.endswith(b"\n") else data).decode("utf-8", "replace")


# ---- verifying -------------------------------------------------------------------------------------------
@dataclass
class Verified:
    """An intact log: its line count, files (oldest first), last hash, and notes (e.g. a lagging head)."""

    lines: int
    files: list[Path]
    last_hash: str
    notes: list[str] = field(default_factory=list)


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number from 1, bytes without the newline, ended by a newline) of each line."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            yield n, raw.rstrip(b"\n"), raw.endswith(b"\n")


def verify_log(path: str | Path) -> Verified:
    """Walk the chain over every file of log ``path``; :class:`AuditChainError` names the first bad line."""
    path = Path(path)
    files = log_files(path)
    if not files:
        raise InputError(f"{path}: no audit log here (no {path.name} and no {path.name}.NNNNNN files).",
                         fix="pass the --audit-log of `mmcli serve` (default RUN/audit/audit.log).")
    head = _read_head(path)
    seq, prev = 0, GENESIS
    head_hash_at_seq = GENESIS if head is not None and head["seq"] == 0 else None
    for f in files:
        for n, raw, ended in _lines(f):
            where = f"{f}:{n}"
            if not ended:
                raise AuditChainError(f"{where}: incomplete last line (the file was cut mid-line).")
            try:
                entry = json.loads(raw)
            except ValueError as e:
                raise AuditChainError(f"{where}: not a JSON line ({e}); the line was edited or damaged.") from e
            if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
                raise AuditChainError(f"{where}: not an audit entry (no hash); the line was edited.")
            if entry_hash(entry) != entry["hash"]:
                raise AuditChainError(f"{where}: content does not match its hash: this line was edited.")
            if entry.get("seq") != seq + 1:
                what = "lines were removed before it" if isinstance(entry.get("seq"), int) and entry["seq"] > seq + 1 \
                    else "lines are out of order or repeated"
                raise AuditChainError(f"{where}: seq {entry.get('seq')!r} where {seq + 1} was expected: {what}.")
            if entry.get("prev") != prev:
                first = seq == 0
                raise AuditChainError(
                    f"{where}: does not chain to the line before ("
                    + ("the first line must chain to the genesis value: earlier files were removed"
                       if first else "that line was rewritten, or lines were removed or reordered") + ").")
            seq, prev = entry["seq"], entry["hash"]
            if head is not None and seq == head["seq"]:
                head_hash_at_seq = prev
    notes: list[str] = []
    if head is None:
        raise AuditChainError(f"{_head_path(path)}: missing, so a log cut at a line boundary cannot be told "
                              f"from an intact one (the chain itself holds for {seq} lines).")
    if seq < head["seq"]:
        raise AuditChainError(f"{files[-1]}: the log ends at seq {seq} but its head records seq {head['seq']}: "
                              f"{head['seq'] - seq} line(s) at the end were cut or a newest file removed.")
    if head_hash_at_seq != head["hash"]:
        raise AuditChainError(f"{_head_path(path)}: line seq {head['seq']} has another hash than the head "
                              "records: that line was rewritten.")
    if seq > head["seq"]:
        notes.append(f"{seq - head['seq']} line(s) after the head's seq {head['seq']} (the server stopped "
                     "between writing a line and moving the head); they chain correctly.")
    return Verified(seq, files, prev, notes)
