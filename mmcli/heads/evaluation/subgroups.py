"""Subgroup analysis: every main metric per group of a patient attribute, with CIs and the gap to overall.

``--subgroups COL[,COL...]``: columns of the labels file or of a table in the store (e.g. a clinical table).
A column with text values, or with at most :data:`MAX_LEVELS` distinct numbers (0/1 flags, grades), is
categorical: one group per value. Other numeric columns are binned: by default at their quartiles (the edges
are computed on the evaluated patients and recorded), or at given edges with ``COL:edges=40,60`` (groups
``< 40``, ``[40, 60)``, ``>= 60``). A missing value is its own group ``missing``.

Point estimates come from fairlearn's ``MetricFrame`` (``by_group``, ``overall``); the metric functions get the
row indices of a group, so any metric of ``mmcli.heads.evaluation.metrics`` works unchanged. 95% intervals: percentile
bootstrap over patients (the whole cohort resampled, so the gap ``group - overall`` is resampled jointly; a
replicate where a metric is undefined in a group is skipped and counted in ``n_valid``). A group with fewer than
``min_size`` patients is listed with its size and ``too_small: true`` and no metrics — reported, not hidden.
Metrics are computed on the pooled out-of-fold predictions (a group spans folds).

The bootstrap evaluates the metrics thousands of times on small groups, where scikit-learn's per-call input
validation dominates; :func:`fast_classification_metrics` computes the same five numbers as
:func:`mmcli.heads.evaluation.metrics.classification_metrics` in plain numpy (the tests check them equal to
scikit-learn's).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

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
                     f"tables {list(tables)}. Fix: name a labels column or a column of a store table.")


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


def subgroup_metrics(groups: np.ndarray, metric_fn: Callable[[np.ndarray], dict[str, float]], *, min_size: int = 10,
                     n_boot: int = 200, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Per group: ``n``, and (when ``n >= min_size``) each metric's value, CI, gap to overall and the gap's CI.

    ``metric_fn(rows)`` returns ``{metric: value}`` for the patients at ``rows``."""
    from fairlearn.metrics import MetricFrame

    groups = np.asarray(groups, dtype=object)
    n = len(groups)
    rows = np.arange(n)
    cache: dict[bytes, dict[str, float]] = {}

    def cached(r: np.ndarray) -> dict[str, float]:
        key = np.asarray(r, dtype=np.int64).tobytes()
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = metric_fn(np.asarray(r, dtype=int))
        return cache[key]

    names = list(cached(rows))
    sizes = pd.Series(groups).value_counts()
    big = [g for g in sizes.index if sizes[g] >= min_size]
    keep = np.isin(groups, big)
    mf = MetricFrame(metrics={m: (lambda _y, r, m=m: cached(r)[m]) for m in names}, y_true=np.zeros(n),
                     y_pred=rows, sensitive_features=pd.Series(groups, name="group")) if keep.any() else None
    overall = {m: cached(rows)[m] for m in names}
    by_group = mf.by_group if mf is not None else pd.DataFrame(columns=names)

    rng = np.random.default_rng(seed)
    boot_group = {g: np.full((n_boot, len(names)), np.nan) for g in big}
    boot_gap = {g: np.full((n_boot, len(names)), np.nan) for g in big}
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        ov = cached(idx)
        ov_v = np.array([ov[m] for m in names], dtype=float)
        for g in big:
            r = idx[groups[idx] == g]
            if not len(r):
                continue
            v = np.array([cached(r)[m] for m in names], dtype=float)
            boot_group[g][b], boot_gap[g][b] = v, v - ov_v
    out_groups = []
    for g in sizes.index:
        entry: dict[str, Any] = {"group": str(g), "n": int(sizes[g])}
        if g not in big:
            entry.update(too_small=True, note=f"fewer than {min_size} patients: no metrics")
            out_groups.append(entry)
            continue
        entry["too_small"] = False
        metrics = {}
        for j, m in enumerate(names):
            value = float(by_group.loc[g, m])
            lo, hi, nv = _pct(boot_group[g][:, j], alpha)
            glo, ghi, _ = _pct(boot_gap[g][:, j], alpha)
            metrics[m] = {"value": _num(value), "ci_low": lo, "ci_high": hi, "n_valid": nv,
                          "gap": _num(value - overall[m]), "gap_ci_low": glo, "gap_ci_high": ghi}
        entry["metrics"] = metrics
        out_groups.append(entry)
    return {"overall": {m: _num(v) for m, v in overall.items()}, "groups": out_groups, "min_size": min_size}


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties (= scikit-learn's ``roc_auc_score``)."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision, step-wise over distinct scores (= scikit-learn's ``average_precision_score``)."""
    if not y.any():
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]
    tps = np.cumsum(ys)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fast_classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """auroc, auprc, f1_macro, balanced_accuracy, brier with the definitions of
    :func:`mmcli.heads.evaluation.metrics.classification_metrics`, in numpy."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    K = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = np.bincount(y * K + pred, minlength=K * K).reshape(K, K)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(K), where=denom > 0)
    support = cm.sum(axis=1)
    recall = tp[support > 0] / support[support > 0]
    onehot = np.eye(K)[y]
    out = {"f1_macro": float(f1.mean()), "balanced_accuracy": float(recall.mean()) if len(recall) else math.nan}
    if K == 2:
        pos = y == 1
        out["auroc"] = _auroc(pos, probs[:, 1])
        out["auprc"] = _average_precision(pos, probs[:, 1])
        out["brier"] = float(np.mean((probs[:, 1] - pos) ** 2))
    else:
        complete = len(np.unique(y)) == K
        out["auroc"] = float(np.mean([_auroc(y == k, probs[:, k]) for k in range(K)])) if complete else math.nan
        out["auprc"] = float(np.mean([_average_precision(y == k, probs[:, k]) for k in range(K)])) if complete \
            else math.nan
        out["brier"] = float(np.mean(np.mean((probs - onehot) ** 2, axis=0)))
    return {k: out[k] for k in ("auroc", "auprc", "f1_macro", "balanced_accuracy", "brier")}


def _pct(v: np.ndarray, alpha: float) -> tuple[float | None, float | None, int]:
    v = v[np.isfinite(v)]
    if not len(v):
        return None, None, 0
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(len(v))


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def subgroup_report(specs: Sequence[SubgroupSpec], patients: Sequence[str], labels: pd.DataFrame | None,
                    tables: dict[str, Any], metric_fn: Callable[[np.ndarray], dict[str, float]], *,
                    min_size: int = 10, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """metrics.json's ``subgroups`` block: one entry per column (source, how grouped, per-group metrics)."""
    out: dict[str, Any] = {
        "what": "metrics of the pooled out-of-fold predictions per group; gap = group - overall",
        "ci": "95% percentile bootstrap over patients (cohort resampled; gap resampled jointly)",
        "method": "fairlearn MetricFrame (by_group, overall)", "min_size": min_size, "n_boot": n_boot,
        "columns": {},
    }
    for k, spec in enumerate(specs):
        values, source = column_values(spec.column, patients, labels, tables)
        groups, how = assign_groups(values, spec)
        res = subgroup_metrics(groups, metric_fn, min_size=min_size, n_boot=n_boot, seed=seed + k)
        rank = {g: i for i, g in enumerate(how["groups"])}  # bins in ascending order, categories sorted
        res["groups"].sort(key=lambda g: rank.get(g["group"], len(rank)))
        out["columns"][spec.column] = {"source": source, **how, **res}
    return out
