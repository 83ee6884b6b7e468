"""Cohort manifest and labels tables: loading with validation.

Manifest CSV: ``patient_id,modality,path[,item_id]`` — one row per file. ``item_id`` separates several files of one
patient (default: the file stem, e.g. a slide name, or ``T1``/``T2`` for MRI). Relative paths are resolved against
the manifest's folder. Labels CSV: ``patient_id`` + target columns; survival uses ``time`` (any unit, stated by the
user) and ``event`` (1 = observed, 0 = censored).
"""
from __future__ import annotations

import codecs
import csv
import errno
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.ids import id_problem

MANIFEST_COLUMNS = ("patient_id", "modality", "path")


@dataclass(frozen=True)
class ManifestRow:
    """One file of the cohort. ``row`` is the 1-based line number in the CSV (header = line 1)."""

    patient_id: str
    modality: str
    path: Path
    item_id: str
    row: int


@dataclass
class Manifest:
    """Validated manifest rows plus the rows whose file is missing (reported, not fatal; :func:`file_problem`
    says why: not found, a symlink loop, a dangling symlink)."""

    source: Path
    rows: list[ManifestRow]
    missing: list[ManifestRow]

    def for_modality(self, modality: str) -> list[ManifestRow]:
        return [r for r in self.rows if r.modality == modality]

    def missing_for(self, modality: str) -> list[ManifestRow]:
        return [r for r in self.missing if r.modality == modality]


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None when it exists: a symlink loop and a dangling symlink are
    named as such (``Path.exists()`` answers False for both, which reads as "file not found")."""
    path = Path(path)
    try:
        path.stat()
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symlink loop: {path} (a symbolic link that resolves to itself). Fix: point the link at the " \
                   "real file, or the manifest at the file itself."
        if path.is_symlink():
            return f"dangling symlink: {path} -> {os.readlink(path)} (the target does not exist). " \
                   "Fix: point the link at the real file."
        if e.errno == errno.ENOENT:
            return f"file not found: {path}"
        return f"cannot read {path}: {e.strerror or e}"


def read_csv_text(path: Path) -> str:
    """CSV text of UTF-8 (BOM removed) or BOM-marked UTF-16 (Excel's "Unicode text"); a clear error for
    missing files and other encodings (e.g. Latin-1, which cannot be told apart from other 8-bit codes)."""
    path = Path(path)
    if not path.is_file():
        problem = file_problem(path)
        if problem is None or problem.startswith("file not found"):  # None: a folder
            raise InputError(f"{path}: file not found. Fix: check the path.")
        raise InputError(problem)
    raw = path.read_bytes()
    codec = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        what = "UTF-16 text with a BOM" if codec == "utf-16" else "UTF-8 text"
        raise InputError(f"{path}: not valid {what} (byte {e.start}). Fix: save the file as UTF-8 CSV.") from e
    if "\x00" in text:
        raise InputError(f"{path}: contains NUL characters (a binary file, or UTF-16 without a BOM). "
                         "Fix: save the file as UTF-8 CSV.")
    return text


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    text = read_csv_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    for record in reader:
        line = reader.line_num
        if not record or all(not c.strip() for c in record):
            continue
        rows.append((line, [c.strip() for c in record]))
    if not rows:
        raise InputError(f"{path}: empty file. Fix: add a header row and one row per item.")
    header_line, header = rows[0]
    if len(set(header)) != len(header):
        raise InputError(f"{path}: line {header_line}: duplicate column names in header {header}. "
                         "Fix: give every column its own name.")
    out = []
    for line, rec in rows[1:]:
        if len(rec) != len(header):
            raise InputError(
                f"{path}: line {line}: {len(rec)} fields, header has {len(header)}. "
                "Fix: quote values that contain commas."
            )
        out.append((line, dict(zip(header, rec))))
    return header, out


def load_manifest(path: str | Path, modalities: set[str] | None = None) -> Manifest:
    """Load and validate a cohort manifest.

    Refuses (``InputError``, exit 2) unsafe ids, unknown columns, empty paths and duplicate
    ``(patient_id, modality, item_id)`` rows. Files that do not exist are collected in ``missing``
    so the caller can report them per row and go on with the rest.
    """
    path = Path(path)
    header, records = _read_rows(path)
    absent = [c for c in MANIFEST_COLUMNS if c not in header]
    if absent:
        raise InputError(
            f"{path}: missing column(s) {absent}; header is {header}. "
            "Fix: the manifest needs patient_id,modality,path[,item_id]."
        )
    base = path.parent.absolute()  # absolute, so dask workers in other folders find the files
    seen: dict[tuple[str, str, str], int] = {}
    rows: list[ManifestRow] = []
    missing: list[ManifestRow] = []
    for line, rec in records:
        pid, modality, rel = rec["patient_id"], rec["modality"].lower(), rec["path"]
        if not rel:
            raise InputError(f"{path}: line {line}: empty path. Fix: give the file of this row.")
        if modalities is not None and modality not in modalities:
            raise InputError(
                f"{path}: line {line}: unknown modality {modality!r}. Fix: use one of {sorted(modalities)}."
            )
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        item = rec.get("item_id") or _stem(file)
        for what, value in (("patient_id", pid), ("modality", modality), ("item_id", item)):
            problem = id_problem(value)
            if problem:
                hint = (" (taken from the file name; add an item_id column to name it)"
                        if what == "item_id" and not rec.get("item_id") else "")
                raise InputError(
                    f"{path}: line {line}: unsafe {what}{hint}: {problem}. "
                    "Fix: use only letters, digits, '.', '_' and '-' (no path separators, no '..')."
                )
        k = (pid, modality, item)
        if k in seen:
            raise InputError(
                f"{path}: line {line}: duplicate (patient_id, modality, item_id) = {k}, first on line {seen[k]}. "
                "Fix: give each file its own item_id or remove the repeated row."
            )
        seen[k] = line
        row = ManifestRow(pid, modality, file, item, line)
        (rows if file.exists() else missing).append(row)
    return Manifest(path, rows, missing)


def _stem(file: Path) -> str:
    name = file.name
    for suffix in (".nii.gz", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return file.stem


def load_labels(path: str | Path) -> pd.DataFrame:
    """Labels table indexed by ``patient_id`` (validated, unique). Values are left as read (strings kept)."""
    path = Path(path)
    header, records = _read_rows(path)
    if "patient_id" not in header:
        raise InputError(f"{path}: no patient_id column; header is {header}. Fix: add a patient_id column.")
    if not records:
        raise InputError(f"{path}: no label rows below the header. Fix: add one row per patient.")
    seen: dict[str, int] = {}
    for line, rec in records:
        pid = rec["patient_id"]
        problem = id_problem(pid)
        if problem:
            raise InputError(f"{path}: line {line}: unsafe patient_id: {problem}. Fix: use the store's patient "
                             "ids (letters, digits, '.', '_' and '-').")
        if pid in seen:
            raise InputError(
                f"{path}: line {line}: patient_id {pid!r} repeated (first on line {seen[pid]}). "
                "Fix: one row per patient."
            )
        seen[pid] = line
    df = pd.DataFrame([rec for _, rec in records], columns=header).set_index("patient_id")
    df.attrs["source"] = str(path)
    df.attrs["lines"] = {pid: line for pid, line in seen.items()}
    return df.replace({"": pd.NA})
