"""``mmcli audit verify``: walk the signed chain of an audit log of ``mmcli serve`` (format: :mod:`.audit`) and
name the first line that was edited, forged, removed, reordered or cut; what it proves is in docs/serving.md."""
from __future__ import annotations

import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmcli.pipeline.errors import InputError
from mmcli.stages.serve.audit import GENESIS, AuditChainError, AuditKey, entry_hash, head_path, log_files, read_head


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


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (as ``mmcli audit verify`` prints it) -> (seq, hash)."""
    seq, _, digest = text.partition(":")
    if not (seq.isdigit() and int(seq) >= 1 and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise InputError(f"--anchor {text!r}: expected SEQ:HASH, e.g. 812:{'ab' * 32} (from an earlier "
                         "`mmcli audit verify`).", flag="--anchor")
    return int(seq), digest


def verify_log(path: str | Path, key: AuditKey, anchor: tuple[int, str] | None = None) -> Verified:
    """Walk the chain over every file of log ``path``, checking each line's signature under ``key``;
    :class:`AuditChainError` names the first bad line. ``anchor`` (seq, hash), recorded earlier outside the
    log's folder, must still be in the chain: that catches a log cut back to an older, saved head."""
    path = Path(path)
    files = log_files(path)
    if not files:
        raise InputError(f"{path}: no audit log here (no {path.name} and no {path.name}.NNNNNN files).",
                         fix="pass the --audit-log of `mmcli serve` (default RUN.audit/audit.log beside the run).")
    head = read_head(path, key)
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
            if entry.get("key_id") != key.id:
                raise AuditChainError(f"{where}: signed with key id {entry.get('key_id')!r}, the --key given has id "
                                      f"{key.id}: the wrong key, or a forged line.")
            if not hmac.compare_digest(entry_hash(entry, key), entry["hash"]):
                raise AuditChainError(f"{where}: content does not match its signature: this line was edited "
                                      "or forged.")
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
            if anchor is not None and seq == anchor[0] and prev != anchor[1]:
                raise AuditChainError(f"{where}: seq {seq} has another hash than the anchor {anchor[0]}:"
                                      f"{anchor[1][:16]}...: the log was replaced or rewritten since.")
            if head is not None and seq == head["seq"]:
                head_hash_at_seq = prev
    notes: list[str] = []
    if head is None:
        raise AuditChainError(f"{head_path(path)}: missing, so a log cut at a line boundary cannot be told "
                              f"from an intact one (the chain itself holds for {seq} lines).")
    if seq < head["seq"]:
        raise AuditChainError(f"{files[-1]}: the log ends at seq {seq} but its head records seq {head['seq']}: "
                              f"{head['seq'] - seq} line(s) at the end were cut or a newest file removed.")
    if head_hash_at_seq != head["hash"]:
        raise AuditChainError(f"{head_path(path)}: line seq {head['seq']} has another hash than the head "
                              "records: that line was rewritten.")
    if anchor is not None and seq < anchor[0]:
        raise AuditChainError(f"{files[-1]}: the log ends at seq {seq}, before the anchor's seq {anchor[0]}: "
                              f"{anchor[0] - seq} or more line(s) at the end were cut (and an older head put back).")
    if seq > head["seq"]:
        notes.append(f"{seq - head['seq']} line(s) after the head's seq {head['seq']} (the server stopped "
                     "between writing a line and moving the head); they chain correctly.")
    return Verified(seq, files, prev, notes)
