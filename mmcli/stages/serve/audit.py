"""The append-only, keyed, hash-chained audit log of ``mmcli serve`` (checked by :mod:`.verify`).

One JSON object per line (keys sorted, no spaces), written whole and ``fdatasync``'d before the response
leaves the server::

    {"hash": H_n, "input_sha256": ..., "key_id": K, "latency_ms": ..., "model_sha256": ..., "output": {...},
     "prev": H_{n-1}, "request_id": ..., "seq": n, "time": "2025-01-01T12:00:00.000000+00:00"}

* ``hash`` is HMAC-SHA256 under the audit key (:class:`AuditKey`, a file outside the log's folder) of the
  line's canonical JSON without the ``hash`` key (so it covers ``prev``, ``seq`` and ``key_id``); ``prev`` is
  the ``hash`` of the line before, :data:`GENESIS` for the first line ever; ``seq`` counts from 1 across
  files; ``key_id`` names the key (a hash of it, not the key). Without the key nobody can write a line that
  verifies: an edited, inserted or re-hashed line fails; removing or reordering lines breaks ``seq`` and
  ``prev``.
* Rotation: when a line would take the current file ``LOG`` over ``max_bytes``, ``LOG`` is renamed to
  ``LOG.000001`` (then ``.000002``, ... : a higher number is a newer file) and a new ``LOG`` begins; its
  first line's ``prev`` is the last ``hash`` of the file before, so the chain runs across files.
* ``LOG.head`` holds ``{"seq", "hash", "mac"}`` of the last line written, the ``mac`` keyed too (a fixed
  256-byte record overwritten in place and synced after each line): a log cut at a line boundary, or a whole
  file removed at the end, no longer reaches it, and a head cannot be made up for an earlier line.
* ``LOG.lock``: the running server holds an exclusive ``flock`` on it; a second writer is refused.

Failure policy (fail closed): a line that cannot be written whole (disk full, a short write, an I/O error) is
cut off again (the file is truncated back to its last good line and the head rewritten), and the request is
answered 503 (:class:`AuditUnavailable`); a log file or head that vanished or was replaced while the server
ran makes every later request a 503 until the server is restarted.

What a line never holds: patient ids, names, file paths or feature values (only their sha256).
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import EXIT_ITEM_FAILURES, InputError, MmcliError

GENESIS = "0" * 64
HEAD_SUFFIX, LOCK_SUFFIX = ".head", ".lock"
HEAD_BYTES = 256  # {"seq": N, "hash": <64 hex>, "mac": <64 hex>}, space-padded; well under one disk sector
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
KEY_MIN_BYTES = 16
_ROTATED = re.compile(r"\.(\d{6})$")


class AuditChainError(MmcliError):
    """The audit log was edited, forged, reordered, cut or partly removed (exit 1); the message names the line."""

    exit_code = EXIT_ITEM_FAILURES


class AuditUnavailable(MmcliError):
    """The log cannot take a line now (disk full, I/O error, the file vanished): the request is answered 503.
    ``str()`` is a short reason without paths (it is sent to the client); ``detail`` is for the server's log."""

    exit_code = EXIT_ITEM_FAILURES

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail or reason


# ---- the key ---------------------------------------------------------------------------------------------
def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/mmcli/audit.key`` (``~/.config/mmcli/audit.key``): per user, outside any run folder."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mmcli" / "audit.key"


@dataclass(frozen=True)
class AuditKey:
    """The HMAC key of a log. ``id`` (16 hex digits of a hash of the key) is written into each line so that a
    wrong key is told apart from a forged line; it reveals nothing usable about the key."""

    secret: bytes = field(repr=False)

    @property
    def id(self) -> str:
        return hashlib.sha256(b"mmcli-audit-key-id\0" + self.secret).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()

    @classmethod
    def load(cls, path: str | Path, *, create: bool = False, log: str | Path | None = None,
             flag: str = "--audit-key") -> tuple[AuditKey, bool]:
        """The key in ``path`` (its bytes, surrounding whitespace dropped; at least 16), created (random, mode
        0600, its folder 0700) when absent and ``create``. Refused inside the folder of ``log``: whoever can
        edit the log must not be able to read the key. Returns (key, created)."""
        path = Path(path).expanduser()
        if log is not None:
            folder = Path(log).expanduser().resolve().parent
            if path.resolve() == folder or folder in path.resolve().parents:
                raise InputError(f"{path}: the audit key is inside the audit log's folder {folder}; whoever can "
                                 "edit the log could then re-sign it.", flag=flag,
                                 fix="keep the key elsewhere, e.g. the default ~/.config/mmcli/audit.key")
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a key file.", flag=flag,
                             fix="pass a file path (created with a new random key when absent)")
        created = False
        if not path.exists():
            if not create:
                raise InputError(f"{path}: no audit key here.", flag=flag,
                                 fix="pass the --audit-key file the server used (default "
                                 f"{default_key_path()})")
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(secrets.token_hex(32).encode() + b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                created = True
            except FileExistsError:
                pass  # another server created it meanwhile: read that one
            except OSError as e:
                raise InputError(f"{path}: cannot create the audit key ({e.strerror}).", flag=flag,
                                 fix="pass a writable --audit-key path, or create the key yourself: python -c "
                                 "\"import secrets; print(secrets.token_hex(32))\" > audit.key") from e
        try:
            secret = path.read_bytes().strip()
        except OSError as e:
            raise InputError(f"{path}: cannot read the audit key ({e.strerror}).", flag=flag) from e
        if len(secret) < KEY_MIN_BYTES:
            raise InputError(f"{path}: the audit key holds {len(secret)} bytes; at least {KEY_MIN_BYTES} are needed.",
                             flag=flag, fix="use a new key file (a missing one is created)")
        return cls(secret), created


# ---- lines -------------------------------------------------------------------------------------------------
def canonical(entry: Mapping[str, Any]) -> str:
    """The one JSON spelling signed and written: sorted keys, no spaces, NaN refused."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def entry_hash(entry: Mapping[str, Any], key: AuditKey) -> str:
    """HMAC-SHA256 under ``key`` of the entry's canonical JSON without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return key.mac(canonical(body).encode("ascii"))


def head_mac(seq: int, last: str, key: AuditKey) -> str:
    return key.mac(f"mmcli-audit-head\0{seq}\0{last}".encode("ascii"))


def log_files(path: str | Path) -> list[Path]:
    """The files of log ``path``, oldest first: ``path.000001``, ``path.000002``, ..., then ``path``."""
    path = Path(path)
    rotated = sorted((int(m.group(1)), p) for p in path.parent.glob(path.name + ".*")
                     if (m := _ROTATED.search(p.name)) and p.name == f"{path.name}.{m.group(1)}")
    files = [p for _, p in rotated]
    if path.is_file():
        files.append(path)
    return files


def head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_head(path: Path, key: AuditKey) -> dict[str, Any] | None:
    """The head record (None when there is none); AuditChainError when it is unreadable or not signed by ``key``."""
    head = head_path(path)
    if not head.is_file():
        return None
    try:
        doc = json.loads(head.read_text())
    except (OSError, ValueError):
        doc = None
    if not (isinstance(doc, dict) and isinstance(doc.get("seq"), int) and isinstance(doc.get("hash"), str)):
        raise AuditChainError(f"{head}: not a readable audit head (expected {{\"seq\": N, \"hash\": H, \"mac\": M}}).")
    if not hmac.compare_digest(str(doc.get("mac", "")), head_mac(doc["seq"], doc["hash"], key)):
        raise AuditChainError(f"{head}: its signature does not match the key (id {key.id}): the head was "
                              "edited, or the log was written with another --audit-key.")
    return doc


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """Write all of ``data`` (``os.write`` may write less than asked, e.g. as a disk fills up)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset + len(data) - len(view))
        if n <= 0:
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[n:]


def _why(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if e.errno == errno.EFBIG:
        return "file size limit reached"
    return os.strerror(e.errno) if e.errno else type(e).__name__


# ---- writing ---------------------------------------------------------------------------------------------
class AuditLog:
    """Appends signed, chained lines to ``path`` (thread-safe; one writer process per log, enforced by a lock).

    Opening checks that no other writer holds the log, and that its last line is the one ``LOG.head``
    records and is signed by ``key`` (a full check is ``mmcli audit verify``); a log that does not match is
    refused with an :class:`InputError`.
    """

    def __init__(self, path: str | Path, key: AuditKey, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1024:
            raise InputError(f"audit log rotation size {max_bytes} bytes is too small (minimum 1024).",
                             flag="--audit-max-mb")
        self.path = Path(path)
        self.key = key
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._fd = self._head_fd = self._lock_fd = -1
        self._broken: str | None = None  # why the log stopped taking lines for good (vanished, replaced)
        self._dirty = False  # a failed write left bytes after the last good line, or the head out of step
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        flag = "--audit-log"
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder; --audit-log takes a file path.", flag=flag,
                             fix=f"e.g. --audit-log {self.path / 'audit.log'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path.with_name(self.path.name + LOCK_SUFFIX), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise InputError(f"{self.path}: cannot create the audit log there ({e.strerror}).", flag=flag,
                             fix="pass an --audit-log in a folder you can write") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode("ascii", "replace").strip() or "?"
            raise InputError(f"{self.path}: another `mmcli serve` (pid {holder}) is writing this audit log; two "
                             "writers would fork its chain.", flag=flag,
                             fix="stop that server, or give this one its own --audit-log") from None
        pid = str(os.getpid()).encode()
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, pid, 0)
        self.seq, self.last_hash = self._resume()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise InputError(f"{self.path}: cannot open the audit log ({e.strerror}).", flag=flag) from e
        self._size = os.fstat(self._fd).st_size
        if self._head_fd < 0 and head_path(self.path).exists():
            self._head_fd = os.open(head_path(self.path), os.O_WRONLY)
        elif self._head_fd < 0:  # a new log: its head exists from the start, so removing every line is noticed
            self._write_head(0, GENESIS)
        _fsync_dir(self.path.parent)  # the new file names (log, head) survive a crash

    def _resume(self) -> tuple[int, str]:
        files = log_files(self.path)
        fix = (f"run `mmcli audit verify {self.path}`; to start a new log, move the old files "
               f"({self.path.name}*) aside or pass another --audit-log.")
        try:
            head = read_head(self.path, self.key)
        except AuditChainError as e:
            raise InputError(str(e), fix=fix) from None
        if not files and head is None:
            return 0, GENESIS
        if head is None:
            raise InputError(f"{self.path}: audit log without its head file {head_path(self.path).name}: it "
                             "cannot be continued safely.", fix=fix)
        if head["seq"] == 0 and head["hash"] == GENESIS and all(f.stat().st_size == 0 for f in files):
            return 0, GENESIS
        last = None
        for f in reversed(files):
            last = _last_line(f)
            if last is not None:
                break
        try:
            entry = json.loads(last) if last is not None else None
        except ValueError:
            entry = None
        if isinstance(entry, dict) and entry.get("key_id") not in (None, self.key.id):
            raise InputError(f"{self.path}: this log was written with another audit key (id {entry['key_id']}; "
                             f"this one is {self.key.id}).", flag="--audit-key",
                             fix="pass that key with --audit-key, or start a new --audit-log")
        ok = (isinstance(entry, dict) and isinstance(entry.get("hash"), str)
              and hmac.compare_digest(entry_hash(entry, self.key), entry["hash"]))
        if ok and entry.get("seq") == head["seq"] and entry["hash"] == head["hash"]:
            return int(head["seq"]), str(head["hash"])
        if ok and entry.get("seq") == head["seq"] + 1 and entry.get("prev") == head["hash"]:
            # stopped between syncing a line and moving the head: the line is whole and chains
            self._write_head(int(entry["seq"]), str(entry["hash"]))
            return int(entry["seq"]), str(entry["hash"])
        raise InputError(f"{self.path}: the log's last line does not match its head "
                         f"(seq {head['seq']}); it was cut or edited.", fix=fix)

    # ---- appending -------------------------------------------------------------------------------------
    @property
    def problem(self) -> str | None:
        """Why the log cannot take lines now (None: it can): it vanished, was replaced, or a failed write could
        not be undone yet."""
        with self._lock:
            return self._check()

    def _check(self) -> str | None:
        if self._broken is None:
            for fd, p, what in ((self._fd, self.path, "log file"), (self._head_fd, head_path(self.path), "head")):
                try:
                    same = fd >= 0 and os.path.samestat(os.fstat(fd), os.stat(p))
                except OSError:
                    same = False
                if not same:
                    self._broken = (f"the audit {what} {p} was removed or replaced while the server ran "
                                    f"(the last line written was seq {self.seq})")
                    break
        if self._broken is not None:
            return self._broken
        return "a failed write is not undone yet" if self._dirty and not self._undo() else None

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one line (``record`` + time, key_id, seq, prev, hash), sync it, then move the head; returns the
        entry. :class:`AuditUnavailable` when it cannot be written whole (nothing of it is left in the log)."""
        with self._lock:
            problem = self._check()
            if problem is not None:
                raise AuditUnavailable("audit log unavailable", problem)
            entry = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                     **record, "key_id": self.key.id, "seq": self.seq + 1, "prev": self.last_hash}
            entry["hash"] = entry_hash(entry, self.key)
            line = (canonical(entry) + "\n").encode("ascii")
            try:
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                self._dirty = True
                _write_all(self._fd, line)
                os.fdatasync(self._fd)  # data and size; not the mtime
                self._write_head(entry["seq"], entry["hash"])
            except OSError as e:
                undone = self._undo()
                raise AuditUnavailable(
                    f"audit log unavailable ({_why(e)})",
                    f"{self.path}: cannot write audit line seq {entry['seq']} ({e}); "
                    + ("it was cut off again, the log ends at its last good line" if undone else
                       "it could not be cut off yet: retried before the next line")) from e
            self._dirty = False
            self._size += len(line)
            self.seq, self.last_hash = entry["seq"], entry["hash"]
            return entry

    def _undo(self) -> bool:
        """Cut the log back to its last good line and rewrite the head for it; True when that worked."""
        try:
            os.ftruncate(self._fd, self._size)
            os.fdatasync(self._fd)
            self._write_head(self.seq, self.last_hash)
        except OSError:
            return False
        self._dirty = False
        return True

    def _rotate(self) -> None:
        numbers = [int(m.group(1)) for p in log_files(self.path)[:-1] if (m := _ROTATED.search(p.name))]
        target = self.path.with_name(f"{self.path.name}.{max(numbers, default=0) + 1:06d}")
        os.rename(self.path, target)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            os.rename(target, self.path)
            raise
        os.close(self._fd)
        self._fd, self._size = fd, 0
        _fsync_dir(self.path.parent)

    def _write_head(self, seq: int, last: str) -> None:
        """Overwrite the head in place: one fixed-size record (well under a disk sector, so written whole),
        fdatasync'd; about half the cost of a write-rename-fsync on every request."""
        if self._head_fd < 0:
            self._head_fd = os.open(head_path(self.path), os.O_WRONLY | os.O_CREAT, 0o600)
        record = json.dumps({"seq": seq, "hash": last, "mac": head_mac(seq, last, self.key)}).encode("ascii")
        _write_all(self._head_fd, record.ljust(HEAD_BYTES), offset=0)
        os.fdatasync(self._head_fd)

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._head_fd, self._lock_fd):  # closing the lock file releases the flock
                if fd >= 0:
                    os.close(fd)
            self._fd = self._head_fd = self._lock_fd = -1


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
