"""Subgroup analysis: every main metric per group of a patient attribute, with CIs and the gap to overall.

``--subgroups COL[,COL...]``: columns of the labels file or of a table in the store (e.g. a clinical table).
A column with text values, or with at most :data:`MAX_LEVELS` distinct numbers (0/1 flags, grades), is
categorical: one group per value. Other numeric columns are binned: by default at their quartiles (the edges
are computed on the evaluated patients and recorded), or at given edges with ``COL:edges=40,60`` (groups
``< 40``, ``[40, 60)``, ``>= 60``). A missing value is its own group ``missing``.

Point estimates come from fairlearn's ``MetricFrame`` (``by_group``, ``overall``). Metrics are computed on the
pooled out-of-fold predictions (a group spans folds). A group with fewer than ``min_size`` patients is listed
with its size and ``too_small: true`` and no metrics: reported, not hidden.

95% intervals: percentile bootstrap over patients with :mod:`.bootstrap`'s rule. The whole cohort is resampled
at once, so the gap ``group - overall`` is resampled jointly; with ``strata`` (the outcome: class codes, or the
event indicator) the resampling is stratified by group x outcome, so every replicate keeps each group's class
(or event) counts and the AUROC / c-index of a group is evaluable in every replicate, as in
:func:`mmcli.heads.evaluation.metrics.summarise`. An interval is null when fewer than ``MIN_VALID_SHARE`` of
the replicates gave a value (``n_valid`` is always reported).

The metric function is *weighted* and vectorised: ``metric_fn(rows, W)`` returns ``{metric: (B,) values}`` for
the patients at ``rows`` with multiplicities ``W`` (B, len(rows)), e.g.
:func:`mmcli.heads.evaluation.metrics.weighted_classification_metrics`, so all replicates of a group cost one
call.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mmcli.heads.evaluation.bootstrap import (
    finite_or_none,
    multiplicities,
    percentile_interval,
    resample_indices,
    resample_weights,
)
from mmcli.pipeline.errors import InputError

MAX_LEVELS = 5
MISSING = "missing"


@dataclass(frozen=True)
class SubgroupSpec:
    """One ``--subgroups`` column and its explicit bin edges (None: categorical or quartiles)."""

    column: str
    edges: tuple[float, ...] | None = None


def parse_subgroups(text: str | None) -> list[SubgroupSpec]:
    """``"age:edges=40,60,er_status"`` -> [age with edges (40, 60), er_status]. A bare number after an
    ``edges=`` list continues that list."""
    if not text or not text.strip():
        return []
    specs: list[SubgroupSpec] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if specs and specs[-1].edges is not None and _is_number(token):
            specs[-1] = SubgroupSpec(specs[-1].column, (*specs[-1].edges, float(token)))
            continue
        col, sep, rest = token.partition(":")
        if not col.strip():
            raise InputError(f"--subgroups {text!r}: empty column name. Fix: e.g. --subgroups age,er_status.")
        if not sep:
            specs.append(SubgroupSpec(col.strip()))
            continue
        key, _, value = rest.partition("=")
        if key.strip() != "edges" or not _is_number(value):
            raise InputError(f"--subgroups {text!r}: {token!r} is not COL or COL:edges=N[,N...] "
                             "(e.g. --subgroups age:edges=40,60,er_status).")
        specs.append(SubgroupSpec(col.strip(), (float(value),)))
    for s in specs:
        if s.edges is not None and list(s.edges) != sorted(set(s.edges)):
            raise InputError(f"--subgroups: edges of {s.column!r} must increase, got {list(s.edges)}.")
    names = [s.column for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"--subgroups {text!r}: a column is listed twice.")
    return specs


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def column_values(column: str, patients: Sequence[str], labels: pd.DataFrame | None, tables: dict[str, Any]
                  ) -> tuple[pd.Series, str]:
    """The column's values for ``patients`` and where they come from: the labels table first, else the first
    store table (``{name: DataFrame indexed by patient_id}``, read lazily by callables) that has it."""
    if labels is not None and column in labels.columns:
        s = labels[column]
        s.index = s.index.astype(str)
        return s.reindex(list(patients)), "labels"
    for name, table in tables.items():
        df = table() if callable(table) else table
        if column in df.columns:
            s = df[column].copy()
            s.index = s.index.astype(str)
            return s.reindex(list(patients)), f"store table {name!r}"
    where = list(labels.columns) if labels is not None else []
    raise InputError(f"--subgroups: no column {column!r} in the labels (columns {where}) or in the store's "
                     f"tables {list(tables)}. Fix: name a labels column or a column of a store table, or load the "
                     "table that holds it first (mmcli extract --modality tabular --table CSV --name NAME).")


def assign_groups(values: pd.Series, spec: SubgroupSpec) -> tuple[np.ndarray, dict[str, Any]]:
    """Group label per patient (text) and how the groups were made (kind, edges)."""
    raw = values.to_numpy(dtype=object)
    num = pd.to_numeric(values, errors="coerce")
    missing = values.isna().to_numpy() | values.astype(str).str.strip().str.lower().isin(
        {"", "nan", "na", "none", "null"}).to_numpy()
    numeric = bool(num[~missing].notna().all()) and (~missing).any()
    levels = np.unique(num[~missing].to_numpy(float)) if numeric else np.zeros(0)
    out = np.full(len(values), MISSING, dtype=object)
    if numeric and (spec.edges is not None or len(levels) > MAX_LEVELS):
        x = num.to_numpy(float)
        if spec.edges is not None:
            edges, how = np.asarray(spec.edges, dtype=float), "given edges"
        else:
            edges, how = np.unique(np.percentile(x[~missing], [25, 50, 75])), "quartiles of the evaluated patients"
        names = [f"< {edges[0]:g}"] + [f"[{a:g}, {b:g})" for a, b in zip(edges[:-1], edges[1:])] \
            + [f">= {edges[-1]:g}"]
        pos = np.searchsorted(edges, x, side="right")
        for i in np.flatnonzero(~missing):
            out[i] = names[pos[i]]
        return out, {"kind": "numeric", "edges": [float(e) for e in edges], "binning": how,
                     "groups": names + ([MISSING] if missing.any() else [])}
    for i in np.flatnonzero(~missing):
        out[i] = f"{float(num.iloc[i]):g}" if numeric else str(raw[i]).strip()
    groups = sorted(set(out[~missing]))
    return out, {"kind": "categorical", "groups": groups + ([MISSING] if missing.any() else [])}


WeightedMetrics = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def subgroup_metrics(groups: np.ndarray, metric_fn: WeightedMetrics, *, min_size: int = 10, n_boot: int = 200,
                     seed: int = 0, alpha: float = 0.05, strata: np.ndarray | None = None) -> dict[str, Any]:
    """Per group: ``n``, and (when ``n >= min_size``) each metric's value, CI, ``n_valid``, the gap to overall and
    the gap's CI. ``metric_fn(rows, W)``: see the module docstring; ``strata``: the outcome to stratify by."""
    from fairlearn.metrics import MetricFrame

    groups = np.asarray(groups, dtype=object)
    n = len(groups)
    rows = np.arange(n)
    cache: dict[bytes, dict[str, float]] = {}

    def point(r: np.ndarray) -> dict[str, float]:
        r = np.asarray(r, dtype=np.int64)
        key = r.tobytes()
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = {m: float(v[0]) for m, v in metric_fn(r, np.ones((1, len(r)))).items()}
        return cache[key]

    overall = point(rows)
    names = list(overall)
    sizes = pd.Series(groups).value_counts()
    big = [g for g in sizes.index if sizes[g] >= min_size]
    keep = np.isin(groups, big)
    mf = MetricFrame(metrics={m: (lambda _y, r, m=m: point(r)[m]) for m in names}, y_true=np.zeros(n),
                     y_pred=rows, sensitive_features=pd.Series(groups, name="group")) if keep.any() else None
    by_group = mf.by_group if mf is not None else pd.DataFrame(columns=names)

    rng = np.random.default_rng(seed)
    if strata is None:
        W = multiplicities(resample_indices(rng, n_boot, n), n)
    else:
        cells = np.array([f"{g}\x1f{s}" for g, s in zip(groups, np.asarray(strata))], dtype=object)
        W = resample_weights(rng, n_boot, cells)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot_overall = metric_fn(rows, W)
        boot_group = {g: metric_fn(np.flatnonzero(groups == g), W[:, groups == g]) for g in big}
    out_groups = []
    for g in sizes.index:
        entry: dict[str, Any] = {"group": str(g), "n": int(sizes[g])}
        if g not in big:
            entry.update(too_small=True, note=f"fewer than {min_size} patients: no metrics")
            out_groups.append(entry)
            continue
        entry["too_small"] = False
        metrics = {}
        for m in names:
            value = float(by_group.loc[g, m])
            gap = value - overall[m]
            ci = percentile_interval(boot_group[g][m], alpha, estimate=value)
            gap_ci = percentile_interval(boot_group[g][m] - boot_overall[m], alpha, estimate=gap)
            metrics[m] = {"value": finite_or_none(value), **ci.json(), "n_valid": ci.n_valid,
                          "gap": finite_or_none(gap), **gap_ci.json("gap_ci"), "gap_n_valid": gap_ci.n_valid}
        entry["metrics"] = metrics
        out_groups.append(entry)
    return {"overall": {m: finite_or_none(v) for m, v in overall.items()}, "groups": out_groups,
            "min_size": min_size}


def subgroup_report(specs: Sequence[SubgroupSpec], patients: Sequence[str], labels: pd.DataFrame | None,
                    tables: dict[str, Any], metric_fn: WeightedMetrics, *, min_size: int = 10, n_boot: int = 200,
                    seed: int = 0, strata: np.ndarray | None = None) -> dict[str, Any]:
    """metrics.json's ``subgroups`` block: one entry per column (source, how grouped, per-group metrics)."""
    out: dict[str, Any] = {
        "what": "metrics of the pooled out-of-fold predictions per group; gap = group - overall",
        "ci": "95% percentile bootstrap over patients (cohort resampled"
              + (", stratified by group x outcome" if strata is not None else "")
              + "; gap resampled jointly); null when fewer than 95% of the resamples gave a value",
        "method": "fairlearn MetricFrame (by_group, overall)", "min_size": min_size, "n_boot": n_boot,
        "columns": {},
    }
    for k, spec in enumerate(specs):
        values, source = column_values(spec.column, patients, labels, tables)
        groups, how = assign_groups(values, spec)
        res = subgroup_metrics(groups, metric_fn, min_size=min_size, n_boot=n_boot, seed=seed + k, strata=strata)
        rank = {g: i for i, g in enumerate(how["groups"])}  # bins in ascending order, categories sorted
        res["groups"].sort(key=lambda g: rank.get(g["group"], len(rank)))
        out["columns"][spec.column] = {"source": source, **how, **res}
    return out
