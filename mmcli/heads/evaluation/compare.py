"""``mmcli compare RUN_A RUN_B``: is run A better than run B on the same patients?

Both runs' out-of-fold predictions are matched by ``patient_id`` (patients in only one run are counted and
left out). Differences are always ``A - B``.

* Binary classification: DeLong test for two correlated AUROCs (:func:`mmcli.heads.evaluation.stats.delong_test`); its
  interval is the Wald interval of the same variance and reference distribution as its p-value. Fewer than 2
  shared patients in a class: refused (no variance to test with).
* Multiclass: the headline is the **macro one-vs-rest AUROC** difference with a paired bootstrap stratified by
  class (DeLong covers one binary AUROC, not a macro average); each class's one-vs-rest AUROC is also tested
  with DeLong (unadjusted p-values, listed per class; null with a message for a class under 2 patients).
* Survival: Harrell's c-index difference by paired bootstrap stratified by event status (lifelines
  ``concordance_index``; higher risk = shorter survival), on risks **centred per fold** first
  (:func:`mmcli.heads.evaluation.metrics.center_risks_by_fold`: the Cox loss leaves each fold model's offset arbitrary).

Every interval and its p-value come from one method (DeLong: one variance; bootstrap: the p-value inverts the
percentile interval), so ``p < alpha`` exactly when the ``1 - alpha`` interval excludes 0.

Two questions, two intervals (issue 24 item 3):

* **These fitted models** (``difference, ci_low, ci_high, p_value``, the methods above): on the **pooled
  out-of-fold predictions** of the shared patients (one prediction per patient, from the fold model that did
  not see it). The fold models are held fixed: test-patient variability only.
* **The procedures** (``procedure``: Nadeau & Bengio's corrected paired t over the per-fold differences,
  :func:`mmcli.heads.evaluation.stats.corrected_t_test`), when both runs were cross-validated on the same folds
  (every shared patient in the same fold): covers training variability too, which is what "is head A better
  than head B on this kind of data" asks. The DeLong interval under-covers that question
  (``benchmarks/bench_coverage.py``), so ``headline`` is ``"procedure"`` whenever it is defined.

Each run's ``value`` is its pooled out-of-fold metric; ``fold_mean`` is the mean over folds from its
``metrics.json`` (all of that run's patients), the number ``mmcli fit`` prints; both are labelled in the text.

Runs must have the same task and endpoint (target, or time/event columns), the same classes and the same
labels on every shared patient; otherwise :class:`InputError` (exit 2).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.heads.evaluation.bootstrap import finite_or_none
from mmcli.heads.evaluation.metrics import auroc, center_risks_by_fold
from mmcli.heads.evaluation.regression import regression_metrics
from mmcli.heads.evaluation.stats import (
    auroc_bootstrap,
    cindex_bootstrap,
    concordance,
    corrected_t_test,
    delong_test,
    paired_bootstrap,
)
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.rundir import CLASSIFICATION, REGRESSION, SURVIVAL, Run, load_run


def _check_compatible(a: Run, b: Run) -> None:
    if a.task != b.task:
        raise InputError(f"cannot compare a {a.task} run ({a.path}) with a {b.task} run ({b.path})")
    ea, eb = a.endpoint, b.endpoint
    for key in ea:
        if ea[key] is not None and eb[key] is not None and ea[key] != eb[key]:
            raise InputError(f"runs predict different endpoints: {key}={ea[key]!r} in {a.path} "
                             f"but {key}={eb[key]!r} in {b.path}")
    if a.task == CLASSIFICATION and sorted(a.classes) != sorted(b.classes):
        raise InputError(f"runs have different classes: {a.classes} ({a.path}) vs {b.classes} ({b.path})")


def _matched(a: Run, b: Run) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    pa, pb = a.require_predictions(), b.require_predictions()
    if a.task == SURVIVAL:  # on each run's full predictions, before patients are matched
        pa, pb = _centred(pa, a), _centred(pb, b)
    ids_a, ids_b = set(pa["patient_id"]), set(pb["patient_id"])
    shared = sorted(ids_a & ids_b)
    if not shared:
        raise InputError(f"no patient appears in both {a.path / 'predictions.csv'} and "
                         f"{b.path / 'predictions.csv'}: nothing to compare")
    ia = pa.set_index("patient_id").loc[shared].reset_index()
    ib = pb.set_index("patient_id").loc[shared].reset_index()
    return ia, ib, len(ids_a - ids_b), len(ids_b - ids_a)


def _centred(pred: pd.DataFrame, run: Run) -> pd.DataFrame:
    if "fold" not in pred.columns:
        raise InputError(f"{run.path / 'predictions.csv'} has no 'fold' column, needed to centre each fold "
                         "model's risks. Fix: re-run `mmcli fit`.")
    return center_risks_by_fold(pred)


def _check_same_labels(what: str, va: np.ndarray, vb: np.ndarray, ids: pd.Series, a: Run, b: Run) -> None:
    differ = ~np.isclose(va, vb) if np.issubdtype(va.dtype, np.floating) else va != vb
    if differ.any():
        bad = ids[differ].tolist()[:5]
        raise InputError(f"runs disagree on {what} for {int(differ.sum())} shared patient(s), e.g. {bad} "
                         f"({a.path} vs {b.path}): were they fitted on the same labels table?")


def _subrun(run: Run, pred: pd.DataFrame) -> Run:
    return Run(run.path, run.config, run.metrics, pred)


def _side(run: Run, value: float) -> dict[str, Any]:
    return {"path": str(run.path), "head": run.head, "modalities": run.modalities, "value": value}


def _classification(a: Run, b: Run, pa: pd.DataFrame, pb: pd.DataFrame, n_boot: int, seed: int,
                    alpha: float) -> dict[str, Any]:
    ra, rb = _subrun(a, pa), _subrun(b, pb)
    classes = a.classes
    ya = ra.class_index()
    yb = np.array([classes.index(c) for c in b.classes])[rb.class_index()]  # B's class order -> A's
    _check_same_labels("y_true", ya, yb, pa["patient_id"], a, b)
    prob_a = ra.prob_matrix()
    prob_b = pb[["prob_" + c for c in classes]].to_numpy(dtype=float)
    present = np.unique(ya)
    if len(present) < 2:
        raise InputError(f"the {len(ya)} shared patients all have class {classes[present[0]]!r}: AUROC is undefined")
    if len(classes) == 2:
        d = delong_test((ya == 1).astype(int), prob_a[:, 1], prob_b[:, 1], alpha=alpha)
        if not d.defined:
            raise InputError(f"{d.message} among the {len(ya)} shared patients")
        return {"metric": "auroc", "method": "delong", "positive_class": classes[1],
                "value_a": d.auc_a, "value_b": d.auc_b, "difference": d.difference, "ci_low": d.ci_low,
                "ci_high": d.ci_high, "p_value": d.p_value, "se": d.se, "z": finite_or_none(d.z),
                "reference": d.reference, "df": finite_or_none(d.df), "message": d.message}
    if len(present) < len(classes):
        missing = [classes[i] for i in range(len(classes)) if i not in present]
        raise InputError(f"classes {missing} have no shared patient: the macro AUROC is undefined")
    boot = auroc_bootstrap(ya, prob_a, prob_b, n_boot=n_boot, seed=seed, alpha=alpha)
    per_class = []
    for c, name in enumerate(classes):
        d = delong_test((ya == c).astype(int), prob_a[:, c], prob_b[:, c], alpha=alpha)
        per_class.append({"class": name, "auc_a": d.auc_a, "auc_b": d.auc_b, "difference": d.difference,
                          "ci_low": finite_or_none(d.ci_low), "ci_high": finite_or_none(d.ci_high),
                          "p_value": finite_or_none(d.p_value), "reference": d.reference, "message": d.message})
    return {"metric": "auroc_macro_ovr", "method": "paired_bootstrap", "value_a": boot.estimate_a,
            "value_b": boot.estimate_b, "difference": boot.difference, "ci_low": finite_or_none(boot.ci_low),
            "ci_high": finite_or_none(boot.ci_high), "p_value": finite_or_none(boot.p_value), "n_boot": n_boot,
            "n_valid": boot.n_valid, "seed": seed, "per_class": per_class,
            "per_class_method": "delong_ovr_unadjusted", "message": boot.message}


def _survival(a: Run, b: Run, pa: pd.DataFrame, pb: pd.DataFrame, n_boot: int, seed: int,
              alpha: float) -> dict[str, Any]:
    ids = pa["patient_id"]
    ta, tb = pa["time"].to_numpy(float), pb["time"].to_numpy(float)
    ea, eb = pa["event"].to_numpy(int), pb["event"].to_numpy(int)
    _check_same_labels("time", ta, tb, ids, a, b)
    _check_same_labels("event", ea, eb, ids, a, b)
    if ea.sum() == 0:
        raise InputError(f"none of the {len(ea)} shared patients has an observed event: the c-index is undefined")
    boot = cindex_bootstrap(ta, ea, pa["risk"].to_numpy(float), pb["risk"].to_numpy(float),
                            n_boot=n_boot, seed=seed, alpha=alpha)
    return {"metric": "c_index", "method": "paired_bootstrap", "value_a": boot.estimate_a,
            "value_b": boot.estimate_b, "difference": boot.difference, "ci_low": finite_or_none(boot.ci_low),
            "ci_high": finite_or_none(boot.ci_high), "p_value": finite_or_none(boot.p_value), "n_boot": n_boot,
            "n_valid": boot.n_valid, "seed": seed, "n_events": int(ea.sum()), "message": boot.message,
            "risk_centring": "each run's risks minus the mean of its fold's out-of-fold risks"}


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(regression_metrics(y, pred)["r2"])


def _regression(a: Run, b: Run, pa: pd.DataFrame, pb: pd.DataFrame, n_boot: int, seed: int,
                alpha: float) -> dict[str, Any]:
    ids = pa["patient_id"]
    ya, yb = pa["y_true"].to_numpy(float), pb["y_true"].to_numpy(float)
    _check_same_labels("y_true", ya, yb, ids, a, b)
    va, vb = pa["y_pred"].to_numpy(float), pb["y_pred"].to_numpy(float)
    boot = paired_bootstrap(lambda i: _r2(ya[i], va[i]), lambda i: _r2(ya[i], vb[i]), len(ya), n_boot=n_boot,
                            seed=seed, alpha=alpha)
    return {"metric": "r2", "method": "paired_bootstrap", "value_a": boot.estimate_a, "value_b": boot.estimate_b,
            "difference": boot.difference, "ci_low": finite_or_none(boot.ci_low),
            "ci_high": finite_or_none(boot.ci_high), "p_value": finite_or_none(boot.p_value), "n_boot": n_boot,
            "n_valid": boot.n_valid, "seed": seed, "message": boot.message}


# ---- the procedures: corrected paired t over the per-fold differences -----------------------------------------
FOLD_MEAN_KEY = {"auroc": "auroc", "auroc_macro_ovr": "auroc", "c_index": "c_index", "r2": "r2"}  # -> metrics.json


def _fold_metric(a: Run, pa: pd.DataFrame, rows: np.ndarray, metric: str) -> float:
    """The compared metric of run ``a`` on the rows ``rows`` of its matched predictions ``pa``."""
    if metric == "r2":
        part = pa.iloc[rows]
        return _r2(part["y_true"].to_numpy(float), part["y_pred"].to_numpy(float))
    if metric == "c_index":
        part = pa.iloc[rows]
        if part["event"].sum() == 0:
            return math.nan
        return concordance(part["time"].to_numpy(float), part["event"].to_numpy(int), part["risk"].to_numpy(float))
    sub = _subrun(a, pa.iloc[rows])
    y, probs = sub.class_index(), sub.prob_matrix()
    if metric == "auroc":
        return auroc(y == 1, probs[:, 1])
    return float(np.mean([auroc(y == c, probs[:, c]) for c in range(probs.shape[1])]))


def _procedure(a: Run, b: Run, pa: pd.DataFrame, pb: pd.DataFrame, metric: str, alpha: float) -> dict[str, Any]:
    """``procedure`` block: the corrected paired t over the per-fold differences, or why there is none."""
    if "fold" not in pa.columns or "fold" not in pb.columns:
        return {"skipped": "a run's predictions.csv has no 'fold' column"}
    fa, fb = pa["fold"].to_numpy(), pb["fold"].to_numpy()
    if (fa != fb).any():
        return {"skipped": f"the runs' folds differ for {int((fa != fb).sum())} of {len(fa)} shared patients: fit "
                           "both with the same --folds, --seed and patients to compare the procedures"}
    folds = np.unique(fa)
    if len(folds) < 2:
        return {"skipped": "fewer than 2 folds"}
    rows = [np.flatnonzero(fa == f) for f in folds]
    va = np.array([_fold_metric(a, pa, r, metric) for r in rows])
    vb = np.array([_fold_metric(b, pb, r, metric) for r in rows])
    t = corrected_t_test(va - vb, [len(r) for r in rows], alpha)
    if t.message:
        return {"skipped": t.message + " (a fold lacks a class or events among the shared patients)"}
    return {"method": "corrected_resampled_t", "difference": t.difference, "ci_low": t.ci_low,
            "ci_high": t.ci_high, "p_value": t.p_value, "se": t.se, "df": t.df, "folds": len(folds),
            "mean_a": float(va.mean()), "mean_b": float(vb.mean()), "per_fold": t.per_fold,
            "what": "mean over folds of the per-fold difference A - B on the shared patients; Nadeau & Bengio "
                    "variance (1/K + n_test/n_train) s^2, K-1 df: covers training and test variability of the "
                    "two procedures"}


def _fold_mean(run: Run, metric: str) -> float | None:
    entry = ((run.metrics or {}).get("metrics") or {}).get(FOLD_MEAN_KEY.get(metric, metric))
    return finite_or_none(entry.get("mean")) if isinstance(entry, dict) else None


def compare(run_a: str | Path, run_b: str | Path, *, n_boot: int = 2000, seed: int = 0,
            alpha: float = 0.05) -> dict[str, Any]:
    """Compare two run dirs on their shared patients; returns a JSON-able dict (difference = A - B).

    Keys: ``task, metric, method, run_a, run_b`` (path, head, modalities, value), ``n_matched, n_only_a,
    n_only_b, difference, ci_low, ci_high, p_value, alpha``, plus ``n_boot/seed`` (bootstrap) or ``se/z``
    (DeLong), ``per_class`` (multiclass), ``n_events`` (survival).
    """
    a, b = load_run(run_a), load_run(run_b)
    _check_compatible(a, b)
    pa, pb, only_a, only_b = _matched(a, b)
    fn = {SURVIVAL: _survival, REGRESSION: _regression}.get(a.task, _classification)
    with warnings.catch_warnings():  # small-class warnings travel in the result's "message" fields instead
        warnings.simplefilter("ignore", UserWarning)
        res = fn(a, b, pa, pb, n_boot, seed, alpha)
    metric = res.pop("metric")
    out: dict[str, Any] = {
        "task": a.task, "metric": metric, "method": res.pop("method"),
        "run_a": {**_side(a, res.pop("value_a")), "fold_mean": _fold_mean(a, metric)},
        "run_b": {**_side(b, res.pop("value_b")), "fold_mean": _fold_mean(b, metric)},
        "n_matched": len(pa), "n_only_a": only_a, "n_only_b": only_b, "alpha": alpha, "scope": "pooled_oof",
    }
    out.update(res)
    out["procedure"] = _procedure(a, b, pa, pb, metric, alpha)
    out["headline"] = "models" if "skipped" in out["procedure"] else "procedure"
    return out


def _pm(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f}"


def format_comparison(result: dict[str, Any]) -> str:
    """A readable plain-text table of :func:`compare`'s result: each run's pooled out-of-fold value and fold
    mean, labelled, then A - B for the procedures (headline, when the folds match) and for these models."""
    conf = round(100 * (1 - result["alpha"]))
    a, b = result["run_a"], result["run_b"]
    metric = result["metric"]
    method = result["method"].replace("_", " ")

    def fold_mean(side: dict[str, Any]) -> str:
        v = side.get("fold_mean")
        return f"{v:.4f}" if v is not None else "n/a"

    lines = [
        f"{result['task']} comparison: {metric}, {result['n_matched']} shared patients"
        + (f" ({result['n_only_a']} only in A, {result['n_only_b']} only in B: left out)"
           if result["n_only_a"] or result["n_only_b"] else ""),
        "",
        f"  {'run':<4} {'head':<16} {'modalities':<32} {'pooled out-of-fold':>18} {'fold mean':>10}",
        f"  {'A':<4} {a['head']:<16} {','.join(a['modalities']) or '-':<32} {a['value']:>18.4f} "
        f"{fold_mean(a):>10}   {a['path']}",
        f"  {'B':<4} {b['head']:<16} {','.join(b['modalities']) or '-':<32} {b['value']:>18.4f} "
        f"{fold_mean(b):>10}   {b['path']}",
        f"  pooled out-of-fold: {metric} of the shared patients' out-of-fold predictions, pooled across folds;",
        "  fold mean: the mean of the per-fold values in the run's metrics.json (all its patients), as `mmcli fit` "
        "prints it",
        "",
    ]
    proc = result.get("procedure") or {}
    models = (f"  A - B, these fitted models ({method} on the pooled out-of-fold predictions; test variability "
              f"only):\n        {_pm(result['difference'])}   {conf}% CI [{_pm(result['ci_low'])}, "
              f"{_pm(result['ci_high'])}]   {_p_text(result)}"
              + ("   (Student's t reference)" if result.get("reference") == "t" else ""))
    if "skipped" in proc:
        lines += [models, f"  A - B, the procedures: not computed ({proc['skipped']})"]
    else:
        lines += [f"  A - B, the procedures (corrected paired t over {proc['folds']} folds, Nadeau-Bengio; covers "
                  f"training and test variability):\n        {_pm(proc['difference'])}   {conf}% CI "
                  f"[{_pm(proc['ci_low'])}, {_pm(proc['ci_high'])}]   p = {proc['p_value']:.4g}", models]
    lines.append("  each interval and its p come from one method (p < alpha exactly when the interval excludes 0)")
    if result.get("message"):
        lines.append(f"  note: {result['message']}")
    if result.get("per_class"):
        lines += ["", "  per class (one-vs-rest AUROC on the pooled out-of-fold predictions, DeLong, unadjusted p):",
                  f"  {'class':<20} {'A':>8} {'B':>8} {'A - B':>8} {'p':>10}"]
        for r in result["per_class"]:
            p = "n/a" if r["p_value"] is None else f"{r['p_value']:.4g}"
            lines.append(f"  {r['class']:<20} {r['auc_a']:>8.4f} {r['auc_b']:>8.4f} {r['difference']:>+8.4f} "
                         f"{p:>10}" + (f"   {r['message']}" if r["message"] else ""))
    if result.get("risk_centring"):
        lines.append("  risks centred per fold before pooling (each fold model's offset is arbitrary)")
    if result.get("n_boot"):
        lines.append(f"  bootstrap: {result['n_valid']}/{result['n_boot']} usable resamples, seed {result['seed']}")
    return "\n".join(lines)


def _p_text(result: dict[str, Any]) -> str:
    """``p = ...``; a bootstrap p of 0 only says p < 2 / (usable resamples); n/a when undefined."""
    p = result["p_value"]
    if p is None:
        return "p = n/a"
    if p == 0 and result.get("n_valid"):
        return f"p < {2 / result['n_valid']:.2g}"
    return f"p = {p:.4g}"
