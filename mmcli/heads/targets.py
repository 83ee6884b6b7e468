"""Prediction targets from a labels table, validated: classification (``--target``), regression (``--target``
with ``--task regression``: a continuous value such as a biomarker level, in the column's own unit) or survival
(``--time``/``--event``).

Every problem is an :class:`~mmcli.pipeline.errors.InputError` naming the file, the column, the rows
(line numbers of the CSV, header = line 1) and the fix.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import InputError

MAX_LISTED = 8


def survival_target(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Structured array ``(event: bool, time: float64)``; ``event`` 1/True = observed, 0 = censored."""
    y = np.empty(len(time), dtype=[("event", bool), ("time", np.float64)])
    y["event"] = np.asarray(event).astype(bool)
    y["time"] = np.asarray(time, dtype=np.float64)
    return y


@dataclass
class Target:
    """Validated targets, one per patient (``patients`` order).

    ``y``: classification -> int codes into ``classes``; survival -> structured ``(event, time)`` array.
    ``classes`` are the label values as text, sorted (numerically when all are numbers); for binary tasks
    ``classes[1]`` is the positive class.
    """

    task: str  # classification | survival | regression (binary: n_classes == 2)
    patients: list[str]
    y: np.ndarray
    classes: list[str] | None = None
    target: str | None = None
    time: str | None = None
    event: str | None = None
    source: str = "labels"
    dropped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def binary(self) -> bool:
        return self.task == "classification" and self.n_classes == 2

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes else 0

    def strata(self) -> np.ndarray:
        """What CV stratifies on: the class, or the event indicator."""
        if self.task == "survival":
            return self.y["event"].astype(int)
        if self.task == "regression":  # quintiles of the value: every fold sees the whole range
            return _quantile_bins(np.asarray(self.y, dtype=np.float64))
        return np.asarray(self.y)

    def subset(self, patients: Sequence[str]) -> Target:
        pos = {p: i for i, p in enumerate(self.patients)}
        idx = np.array([pos[p] for p in patients], dtype=int)
        return Target(self.task, list(patients), self.y[idx], self.classes, self.target, self.time, self.event,
                      self.source, {k: list(v) for k, v in self.dropped.items()})


def read_labels(labels: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A labels table indexed by ``patient_id`` (CSV path via :func:`mmcli.pipeline.manifest.load_labels`)."""
    if isinstance(labels, pd.DataFrame):
        df = labels.copy()
        if df.index.name != "patient_id":
            if "patient_id" not in df.columns:
                raise InputError("labels table has no patient_id column or index. Fix: add patient_id.")
            df = df.set_index("patient_id")
        df.index = df.index.astype(str)
        df.attrs.setdefault("source", "labels")
        return df
    from mmcli.pipeline.manifest import load_labels

    return load_labels(labels)


def _where(df: pd.DataFrame, pids: Sequence[str]) -> str:
    lines = df.attrs.get("lines", {})
    shown = [f"line {lines[p]} ({p})" if p in lines else str(p) for p in list(pids)[:MAX_LISTED]]
    more = f" and {len(pids) - MAX_LISTED} more" if len(pids) > MAX_LISTED else ""
    return ", ".join(shown) + more


def _column(df: pd.DataFrame, col: str, flag: str) -> pd.Series:
    if col not in df.columns:
        raise InputError(f"{df.attrs.get('source', 'labels')}: no column {col!r} for {flag}; columns are "
                         f"{list(df.columns)}. Fix: pass {flag} with one of them.")
    return df[col]


def _is_missing(s: pd.Series) -> pd.Series:
    return s.isna() | s.astype(str).str.strip().str.lower().isin({"", "nan", "na", "none", "null"})


def build_target(labels: pd.DataFrame, *, target: str | None = None, time: str | None = None,
                 event: str | None = None, drop_missing: bool = False, task: str | None = None) -> Target:
    """Validate the label columns and build a :class:`Target`.

    Exactly one of ``target`` (classification, or regression with ``task="regression"``) or ``time`` +
    ``event`` (survival; ``event`` 1 = observed, 0 = censored; ``time`` > 0 in any unit) must be given. Rows with
    a missing value are an error unless ``drop_missing`` (then they are dropped and listed in
    ``Target.dropped["missing_label"]``). A numeric target with many distinct values and no ``task`` is refused
    with a hint to ``--task regression`` rather than becoming hundreds of classes.
    """
    src = labels.attrs.get("source", "labels")
    if task is not None and task not in ("classification", "survival", "regression"):
        raise InputError(f"--task {task!r}: one of classification | survival | regression.")
    if task == "survival" and target is not None:
        raise InputError("--task survival takes --time COL --event COL, not --target.")
    if task in ("classification", "regression") and target is None:
        raise InputError(f"--task {task} needs --target COL.")
    if (target is None) == (time is None and event is None):
        raise InputError("give either a classification target (--target COL) or survival columns "
                         "(--time COL --event COL), not both or neither.")
    if target is None and (time is None or event is None):
        raise InputError("survival needs both --time COL and --event COL.")
    cols = [target] if target is not None else [time, event]
    series = {c: _column(labels, c, "--target" if c == target else ("--time" if c == time else "--event"))
              for c in cols if c is not None}
    missing = pd.Series(False, index=labels.index)
    for s in series.values():
        missing |= _is_missing(s)
    dropped: dict[str, list[str]] = {}
    if missing.any():
        bad = [str(p) for p in labels.index[missing]]
        if not drop_missing:
            raise InputError(f"{src}: missing value in column(s) {cols} at {_where(labels, bad)}. "
                             "Fix: fill them in, remove those rows, or pass --drop-unmatched to leave them out.")
        dropped["missing_label"] = bad
    df = labels.loc[~missing]
    pids = [str(p) for p in df.index]
    if target is not None and task == "regression":
        return _regression(df, target, pids, src, dropped)
    if target is not None:
        return _classification(df, target, pids, src, dropped, explicit=task == "classification")
    assert time is not None and event is not None
    return _survival(df, time, event, pids, src, dropped)


MAX_INFERRED_CLASSES = 20  # a numeric target with more distinct values and no --task is refused (regression?)


def _regression(df: pd.DataFrame, col: str, pids: list[str], src: str, dropped: dict) -> Target:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = [str(p) for p in df.index[values.isna() | ~np.isfinite(values.fillna(0).to_numpy(dtype=float))]]
    if bad:
        raise InputError(f"{src}: column {col!r} (regression target) is not a finite number at {_where(df, bad)}. "
                         "Fix: give numbers (in one unit), or leave the cell empty and pass --drop-unmatched.")
    y = values.to_numpy(dtype=np.float64)
    if len(np.unique(y)) < 3:
        raise InputError(f"{src}: column {col!r} has {len(np.unique(y))} distinct value(s); a regression needs a "
                         "continuous target. Fix: use a classification --task for a label with few values.")
    return Target("regression", pids, y, None, target=col, source=src, dropped=dropped)


def _quantile_bins(y: np.ndarray, k: int = 5) -> np.ndarray:
    """Quantile bins of a continuous target (0..k-1), fewer when there are few distinct values."""
    edges = np.unique(np.quantile(y, np.linspace(0, 1, k + 1)[1:-1]))
    return np.searchsorted(edges, y, side="right")


def _classification(df: pd.DataFrame, col: str, pids: list[str], src: str, dropped: dict,
                    explicit: bool = False) -> Target:
    values = df[col].map(lambda v: str(v).strip())
    uniq = sorted(values.unique())
    num = pd.to_numeric(pd.Series(uniq), errors="coerce")
    if num.notna().all() and len(uniq) > MAX_INFERRED_CLASSES and not explicit:
        raise InputError(f"{src}: column {col!r} is numeric with {len(uniq)} distinct values: as classes that "
                         f"would be {len(uniq)} classes. Fix: pass --task regression to predict the value, or "
                         "--task classification if these really are classes.")
    if num.notna().all():
        uniq = [u for _, u in sorted(zip(num, uniq))]
    if len(uniq) < 2:
        raise InputError(f"{src}: column {col!r} has a single class {uniq} over {len(pids)} patients. "
                         "Fix: a classifier needs at least two classes; check the column.")
    codes = values.map({c: i for i, c in enumerate(uniq)}).to_numpy(dtype=int)
    return Target("classification", pids, codes, uniq, target=col, source=src, dropped=dropped)


def _survival(df: pd.DataFrame, time_col: str, event_col: str, pids: list[str], src: str, dropped: dict) -> Target:
    t = pd.to_numeric(df[time_col], errors="coerce")
    bad = [str(p) for p in df.index[t.isna() | ~np.isfinite(t.fillna(0).to_numpy(dtype=float))]]
    if bad:
        raise InputError(f"{src}: column {time_col!r} (time) is not a finite number at {_where(df, bad)}. "
                         "Fix: give follow-up times as numbers (any unit, e.g. months).")
    bad = [str(p) for p in df.index[t <= 0]]
    if bad:
        raise InputError(f"{src}: column {time_col!r} (time) must be > 0, found <= 0 at {_where(df, bad)}. "
                         "Fix: time is the follow-up from baseline to event or censoring.")
    e = pd.to_numeric(df[event_col], errors="coerce")
    bad = [str(p) for p in df.index[~e.isin([0, 1])]]
    if bad:
        raise InputError(f"{src}: column {event_col!r} (event) must be 0 or 1 at {_where(df, bad)}. "
                         "Fix: 1 = event observed, 0 = censored.")
    e_arr = e.to_numpy(dtype=int)
    if e_arr.sum() == 0:
        raise InputError(f"{src}: column {event_col!r} has no observed event (all 0). "
                         "Fix: survival models need events; check the column.")
    y = survival_target(t.to_numpy(dtype=np.float64), e_arr)
    return Target("survival", pids, y, None, time=time_col, event=event_col, source=src, dropped=dropped)
