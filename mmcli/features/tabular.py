"""Tabular ingest: omics, proteomics and clinical tables (``patient_id`` + feature columns) into ``/tabular/<name>``.

Conventions:

- one row per patient; ids validated as in the manifest (safe characters, no duplicates) with the CSV line named;
- **missing values stay NaN** (empty cells and the usual tokens ``NA``, ``NaN``, ``null``, ``N/A``, ``None``...);
  no scaling or imputation here: that happens inside each training fold at fit time;
- numeric columns are stored as float64; ``inf`` is refused (it is not "missing"), and so is a finite value
  beyond the float32 range (``1e308``): the heads read tables as float32, where it would become ``inf``;
- text columns are **categorical** when they have at most ``max_levels`` distinct values (compared
  case-insensitively): two levels become one 0/1 column (``negative``/``positive``-style words map to 0/1,
  otherwise levels in sorted order), more levels become one-hot columns ``<col>=<level>``; a missing category
  stays NaN in every column it produces. ``categorical`` forces a column (e.g. numeric grades) to be one.
  The encoding is recorded in the table's attrs (``encodings``). A text column with more levels, or a mostly
  numeric column with stray text (``<0.01``, ``n.d.``), is refused with the offending lines named.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import source_fingerprint
from mmcli.pipeline.ids import check_id, id_problem
from mmcli.pipeline.manifest import read_csv_text
from mmcli.pipeline.options import Options

NA_VALUES = ["", "NA", "N/A", "n/a", "na", "NaN", "nan", "NAN", "null", "NULL", "None", "none", "#N/A", "-", "."]
NEGATIVE = {"negative", "neg", "no", "false", "absent", "0", "-"}
POSITIVE = {"positive", "pos", "yes", "true", "present", "1", "+"}
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the heads read tables as float32: a larger value becomes inf


class TabularOptions(Options):
    """Options of ``extract --modality tabular`` (recorded in the table's attrs)."""

    id_column: str = Field("patient_id", min_length=1, description="the patient id column, a column name")
    categorical: tuple[str, ...] = Field((), description="columns to treat as categorical (repeatable), names")
    max_levels: int = Field(20, ge=2, description="text columns with at most this many levels are categorical, "
                            "an integer >= 2")


@dataclass
class TableSummary:
    """What :func:`ingest_table` stored."""

    name: str
    store: str
    patients: int
    features: int
    missing_fraction: float
    encodings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_table(path: str | Path, id_column: str = "patient_id") -> pd.DataFrame:
    """Raw table as stripped strings (NaN for missing), indexed by validated, unique ids.

    Errors name the file, the CSV line and the fix. ``attrs["lines"]`` maps each id to its line.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_csv_text(path), newline=""))
    records: list[tuple[int, list[str]]] = []
    for rec in reader:
        if rec and any(c.strip() for c in rec):
            records.append((reader.line_num, [c.strip() for c in rec]))
    if not records:
        raise InputError(f"{path}: empty file. Fix: a header row with {id_column} and feature columns.")
    (_, header), rows = records[0], records[1:]
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        raise InputError(f"{path}: line 1: duplicate column names {dups}. Fix: give each column its own name.")
    if id_column not in header:
        raise InputError(f"{path}: no {id_column!r} column; header starts {header[:6]}. Fix: name the id column "
                         f"{id_column!r} (or pass --id-column); rows must be patients, columns features.")
    if len(header) < 2:
        raise InputError(f"{path}: no feature columns besides {id_column!r}.")
    if not rows:
        raise InputError(f"{path}: no data rows.")
    k = header.index(id_column)
    seen: dict[str, int] = {}
    for line, rec in rows:
        if len(rec) != len(header):
            raise InputError(f"{path}: line {line}: {len(rec)} fields, header has {len(header)}. "
                             "Fix: quote values that contain commas.")
        pid = rec[k]
        problem = id_problem(pid)
        if problem:
            raise InputError(f"{path}: line {line}: unsafe {id_column}: {problem}. "
                             "Fix: use only letters, digits, '.', '_' and '-'.")
        if pid in seen:
            raise InputError(f"{path}: line {line}: {id_column} {pid!r} repeated (first on line {seen[pid]}). "
                             "Fix: one row per patient.")
        seen[pid] = line
    df = pd.DataFrame([r for _, r in rows], columns=header).set_index(id_column)
    df = df.mask(df.isin(NA_VALUES))
    df.attrs["lines"] = seen
    return df


def _as_number(col: pd.Series) -> pd.Series:
    return pd.to_numeric(col, errors="coerce")


def _binary_levels(levels: list[str]) -> list[str]:
    """Order two levels so that the 'negative'-like one maps to 0."""
    low = [lv.lower() for lv in levels]
    if (low[0] in POSITIVE and low[1] in NEGATIVE) or (low[1] in NEGATIVE and low[0] not in NEGATIVE):
        return [levels[1], levels[0]]
    return levels


def encode_columns(df: pd.DataFrame, path: Path, max_levels: int = 20, categorical: set[str] | None = None
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Numeric float64 table and the encodings of its categorical columns (see module docstring)."""
    categorical = categorical or set()
    unknown = categorical - set(df.columns)
    if unknown:
        raise InputError(f"{path}: --categorical names unknown column(s) {sorted(unknown)}")
    lines = df.attrs.get("lines", {})
    out: dict[str, pd.Series] = {}
    encodings: dict[str, Any] = {}
    for name in df.columns:
        col = df[name]
        present = col.notna()
        num = _as_number(col)
        stray = present & num.isna()
        if name not in categorical and not stray.any():
            if np.isinf(num).any():
                i = num.index[np.isinf(num)][0]
                raise InputError(f"{path}: line {lines.get(i, '?')}: column {name!r}: infinite value. "
                                 "Fix: leave the cell empty for a missing value.")
            huge = num.abs() > FLOAT32_MAX
            if huge.any():
                i = num.index[huge][0]
                raise InputError(f"{path}: line {lines.get(i, '?')}: column {name!r}: value {df.at[i, name]} is "
                                 f"beyond the float32 range the heads compute in (|x| <= {FLOAT32_MAX:.4g}). Fix: "
                                 "rescale the column (e.g. other units or a log), or leave the cell empty if it "
                                 "is a placeholder for a missing value.")
            out[name] = num.astype(np.float64)
            continue
        col = col.str.casefold()  # "Positive" and "positive" are one level
        levels = sorted(col[present].unique().tolist())
        mostly_numeric = name not in categorical and present.sum() and (~stray[present]).mean() >= 0.5
        if mostly_numeric or len(levels) > max_levels:
            bad = col[stray].head(3)
            where = ", ".join(f"line {lines.get(i, '?')}: {v!r}" for i, v in bad.items())
            why = "mostly numbers with stray text" if mostly_numeric else f"{len(levels)} distinct text values"
            raise InputError(
                f"{path}: column {name!r} is not numeric ({why}; e.g. {where}). Fix: clean those cells (leave "
                f"missing values empty), or declare it categorical with --categorical {name} "
                f"(up to {max_levels} levels by default).")
        if len(levels) <= 2:
            levels = _binary_levels(levels) if len(levels) == 2 else levels
            mapping = {lv: float(k) for k, lv in enumerate(levels)}
            out[name] = col.map(mapping).astype(np.float64)
            encodings[name] = {"type": "binary", "levels": levels, "columns": [name],
                               "mapping": mapping}
        else:
            cols = []
            for lv in levels:
                cname = f"{name}={lv}"
                out[cname] = np.where(present, (col == lv).astype(np.float64), np.nan)
                cols.append(cname)
            encodings[name] = {"type": "one_hot", "levels": levels, "columns": cols}
    table = pd.DataFrame(out, index=df.index)
    return table, encodings


def ingest_table(table: str | Path, name: str, store: str | Path, options: TabularOptions | None = None,
                 **given: Any) -> TableSummary:
    """Validate ``table`` and write it to ``/tabular/<name>`` of ``store`` (NaN kept, categoricals encoded).

    ``options``: a :class:`TabularOptions`, or its fields as keywords (``id_column``, ``categorical``,
    ``max_levels``; ``None`` = the default)."""
    from mmcli.pipeline.store import open_store

    if options is not None and given:
        raise TypeError("pass either TabularOptions or keyword options, not both")
    opts = options or TabularOptions.build(given)
    id_column = opts.id_column
    check_id(name, "table --name")
    path = Path(table)
    raw = read_table(path, id_column)
    values, encodings = encode_columns(raw, path, opts.max_levels, set(opts.categorical))
    warnings = [f"column {c!r} has no values (all missing)" for c in values.columns if values[c].isna().all()]
    missing = float(values.isna().to_numpy().mean()) if values.size else 0.0
    attrs = {
        "source": str(path.resolve()), "source_fingerprint": source_fingerprint(path), "id_column": id_column,
        "encodings": encodings, "missing_fraction": round(missing, 6),
        "missing_per_column": {c: int(n) for c, n in values.isna().sum().items() if n},
        "note": "raw values: no scaling or imputation at ingest (done in-fold at fit time)",
        "options": opts.to_json(),
    }
    if warnings:
        attrs["warnings"] = warnings
    values.index.name = "patient_id"
    open_store(store, "a").write_table(name, values, attrs)
    return TableSummary(name, str(store), int(values.shape[0]), int(values.shape[1]), missing, encodings, warnings)


def ingest_vcf(vcf: str | Path, name: str, store: str | Path, genes: str | None = None,
               regions: str | Path | None = None) -> dict[str, Any]:
    """VCF entry of tabular ingest: alt-allele dosages per gene / region / locus (:mod:`mmcli.features.vcf`)."""
    from mmcli.features.vcf import ingest_vcf as _ingest

    return _ingest(vcf, name, store, genes=genes, regions=regions)
