"""``mmcli evaluate``: external validation of a fitted model on another cohort (store + labels).

Scores the new cohort with the run's refit model (and its saved calibration / threshold, as ``predict`` does)
and writes into ``out`` the same files as a fit run::

    config.json        kind "external_validation", the model, store, labels, patients left out and why
    metrics.json       metrics (one "fold" = the whole new cohort; 95% bootstrap CIs over its patients),
                       calibration (classification: intercept = calibration-in-the-large, slope), operating_point
                       (at the model's stored threshold), decision_curve, subgroups, drift, missing
    predictions.csv    patient_id, y_true | time,event, the model's outputs, decision, missing_modalities
    report.html        the report with the evaluation sections

``drift``: per modality of the model, a classifier two-sample test between the training store's patients (the
run's patients, read from the store recorded in the run or ``train_store``) and the new store's patients
(:mod:`mmcli.heads.evaluation.drift`). ``missing``: labelled patients absent from the new store, store patients without
a label, patients the model cannot score, and per modality how many patients lack it.
"""
from __future__ import annotations

import time as _time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli import __version__
from mmcli.heads.data import Cohort, load_cohort, patients_in
from mmcli.heads.evaluation.drift import modality_drift
from mmcli.heads.evaluation.evidence import (
    EvidenceOptions,
    classification_evidence,
    regression_evidence,
    store_tables,
    survival_evidence,
)
from mmcli.heads.evaluation.metrics import FoldPredictions, summarise
from mmcli.heads.fitted import FittedModel
from mmcli.heads.targets import Target, build_target, read_labels
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.rundir import RunFolderError, RunWriter, load_run
from mmcli.pipeline.scale import resolve_budget
from mmcli.pipeline.store import open_store


def evaluate(
    model: str | Path, store: str | Path, labels: str | Path | pd.DataFrame, out: str | Path, *,
    target: str | None = None, time: str | None = None, event: str | None = None,
    train_store: str | Path | None = None, evidence: EvidenceOptions | None = None, n_boot: int = 1000,
    seed: int = 0, n_permutations: int = 200, drop_unmatched: bool = False,
    allow_overlap: bool = False, memory_budget: str | int | None = None, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the model of run ``model`` on the patients of ``store`` labelled in ``labels``; write ``out``.

    ``target`` / ``time`` / ``event`` default to the run's columns. ``evidence``: decision-curve thresholds,
    ``horizon`` and subgroups (``calibrate`` / ``operating_point`` come from the model, not from here). A
    batch-corrected model reads each patient's batch (and protected covariates) from ``labels`` (or a store
    table). Patients the model was trained on are refused (an external validation needs new patients) unless
    ``allow_overlap``, which evaluates them anyway and records the overlap. Returns metrics.json's content."""
    say = log or (lambda _msg: None)
    opts = (evidence or EvidenceOptions()).check()
    if opts.calibrate != "none" or opts.operating_point is not None:
        raise InputError("evaluate applies the model's own calibration and threshold (from `mmcli fit`); "
                         "--calibrate / --operating-point are fit options. Fix: drop them here.")
    fitted = FittedModel.load(model)
    mdir = fitted.path
    assert mdir is not None
    run_cfg = fitted.run
    train_run = _training_run(mdir)
    survival = fitted.head.is_survival
    if target is None and time is None and event is None:
        target, time, event = run_cfg.get("target"), run_cfg.get("time"), run_cfg.get("event")
    if survival and target is not None:
        raise InputError("this is a survival model: pass --time COL --event COL, not --target.")
    if not survival and target is None:
        raise InputError("this is a classification model: pass --target COL (the run's was not recorded).")

    fs = open_store(Path(store), "r")
    sources = fitted.sources(fs)
    table = read_labels(labels)
    tgt = build_target(table, target=target, time=time, event=event, drop_missing=drop_unmatched,
                       task=fitted.task)
    classes = list(fitted.classes or [])
    if fitted.task == "classification":
        tgt = _recode(tgt, classes)
    in_store = patients_in(fs, sources)
    keep = [p for p in tgt.patients if p in in_store]
    missing: dict[str, Any] = {
        "not_in_store": sorted(set(tgt.patients) - in_store),
        "no_label": sorted(in_store - set(tgt.patients) - set(tgt.dropped.get("missing_label", []))),
        "missing_label": tgt.dropped.get("missing_label", []),
    }
    if not keep:
        raise InputError(f"{tgt.source}: none of its labelled patients has the model's modalities in {fs.path}. "
                         "Fix: check that labels and store use the same patient ids.")
    overlap = _training_overlap(fitted, train_run, keep, allow_overlap, say)
    cohort, cannot = fitted.cohort(fs, keep, covariates=table, sources=sources,
                                   memory_budget=resolve_budget(memory_budget))
    missing["cannot_score"] = cannot
    presence = load_cohort(fs, sources, keep, scan=False).presence() if cannot else cohort.presence()
    missing["modality_missing"] = {n: int((~presence[:, k]).sum()) for k, n in enumerate(cohort.names)}
    tgt = tgt.subset(cohort.patients)
    if len(tgt.patients) < 2:
        raise InputError(f"{fs.path}: only {len(tgt.patients)} patient(s) can be scored. Fix: add patients.")
    say(f"scoring {len(tgt.patients)} patients of {fs.path} with {fitted.name} ({mdir})")

    raw, pred = fitted.predict(cohort)
    metrics, ev_doc = _metrics(fitted, cohort, tgt, raw, pred, classes, opts, table, fs, train_run, n_boot, seed)
    drift = _drift(fitted, cohort, train_run, train_store, n_permutations, seed, say)

    df = fitted.predict_frame(cohort, pred)
    if survival:
        df.insert(1, "time", tgt.y["time"])
        df.insert(2, "event", tgt.y["event"].astype(int))
    elif fitted.task == "regression":
        df.insert(1, "y_true", np.asarray(tgt.y, dtype=np.float64))
    else:
        df.insert(1, "y_true", [classes[c] for c in tgt.y])
    names = cohort.names

    created = _time.strftime("%Y-%m-%dT%H:%M:%S%z")
    task = fitted.task
    run = {
        "kind": "external_validation", "head": fitted.name, "params": fitted.config.get("params"), "task": task,
        "target": tgt.target, "time": tgt.time, "event": tgt.event,
        "classes": classes or None, "modalities": names, "encoder_ids": run_cfg.get("encoder_ids"),
        "model": str(mdir.resolve()), "training_run": str(train_run.path.resolve()) if train_run else None,
        "store": str(Path(store).resolve()), "labels": str(Path(labels).resolve())
        if isinstance(labels, (str, Path)) else "<DataFrame>", "features_sha256": cohort.features_sha256,
        "n_patients": len(tgt.patients), "excluded_patients": {k: v for k, v in missing.items()
                                                               if isinstance(v, list) and v},
        "n_boot": n_boot, "seed": seed, "evidence": opts.to_json(), "mmcli_version": __version__,
        "created": created,
    }
    doc = {"head": fitted.name, "task": task, "kind": "external_validation", "modalities": names,
           "folds": 1, "n_patients": len(tgt.patients), "metrics": metrics,
           "metrics_note": "one evaluation set: mean = the metric on all evaluated patients; CI = 95% percentile "
                           "bootstrap over them (the model held fixed)",
           "encoder_ids": run_cfg.get("encoder_ids"), "seed": seed, "created": created, **ev_doc, "drift": drift,
           "missing": {k: (v if isinstance(v, dict) else {"n": len(v), "patients": v}) for k, v in missing.items()},
           "training_overlap": overlap}
    if "batch_corrected" in df:
        doc["batch_correction"] = {"n_corrected": int(df["batch_corrected"].sum()),
                                   "n_uncorrected": int((~df["batch_corrected"]).sum()),
                                   "note": "patients whose batch is missing or was not in the training cohort are "
                                           "scored without batch correction"}
    writer = RunWriter(Path(out)).begin()
    writer.write_predictions(df)
    writer.finish(run, doc)
    return doc


def _training_overlap(fitted: FittedModel, train_run: Any, patients: list[str], allow: bool,
                      say: Callable[[str], None]) -> dict[str, Any]:
    """The evaluated patients that the model was trained on (by id: the training run's patients, else the
    hashed ids the model folder records); refused unless ``allow`` (then recorded and warned about)."""
    if train_run is not None and train_run.predictions is not None:
        trained = set(train_run.predictions["patient_id"].astype(str))
        how = "the training run's patients"
    else:
        hashed = set(fitted.config.get("fitted_patients_sha256") or [])
        if not hashed:
            return {"checked": False, "note": "the model folder records no training patients; overlap unknown"}
        trained = {p for p in patients if _id_hash(p) in hashed}
        how = "the model's hashed training patient ids"
    both = sorted(set(patients) & trained)
    doc = {"checked": True, "against": how, "n": len(both), "patients": both}
    if both and not allow:
        raise InputError(f"{len(both)} of the {len(patients)} patients to evaluate were in the model's training "
                         f"cohort ({', '.join(both[:5])}{' ...' if len(both) > 5 else ''}): their scores are apparent "
                         "performance, not external validation. Fix: leave them out of --labels, or pass "
                         "--allow-overlap to evaluate them anyway (recorded as training_overlap).")
    if both:
        say(f"warning: {len(both)} evaluated patient(s) were in the training cohort; the metrics are not an "
            "external validation (training_overlap in metrics.json)")
        doc["note"] = "these patients were in the training cohort: their predictions are in-sample"
    return doc


def _id_hash(pid: str) -> str:
    import hashlib

    return hashlib.sha256(pid.encode()).hexdigest()


def _training_run(mdir: Path) -> Any:
    """The fit run that holds this model folder (None when the model folder stands alone)."""
    try:
        return load_run(mdir.parent) if (mdir.parent / "config.json").is_file() else None
    except RunFolderError:
        return None


def _recode(tgt: Target, classes: list[str]) -> Target:
    """Class codes of the new labels in the model's class order; a class the model does not know is an error."""
    if not classes:
        return tgt
    assert tgt.classes is not None
    unknown = sorted(set(tgt.classes) - set(classes))
    if unknown:
        raise InputError(f"{tgt.source}: column {tgt.target!r} has classes {unknown} the model was not fitted on "
                         f"(its classes: {classes}). Fix: map them to the model's classes or drop those rows.")
    pos = {c: i for i, c in enumerate(classes)}
    y = np.array([pos[tgt.classes[c]] for c in tgt.y], dtype=int)
    return Target("classification", tgt.patients, y, classes, tgt.target, None, None, tgt.source, tgt.dropped)


def external_grid(fit_grid: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """The fit run's evaluation grid clipped to the external cohort's follow-up: the times with an external
    event at or before them (a case) and an external patient followed beyond them (a control)."""
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event).astype(bool)
    if not e.any():
        return np.zeros(0)
    g = np.asarray(fit_grid, dtype=np.float64)
    return g[(g >= t[e].min()) & (g < t.max())]


def _metrics(fitted: FittedModel, cohort: Cohort, tgt: Target, raw: np.ndarray, pred: np.ndarray,
             classes: list[str], opts: EvidenceOptions, table: pd.DataFrame, fs: Any, train_run: Any, n_boot: int,
             seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    tables = store_tables(fs)
    head, post = fitted.head, fitted.post
    if tgt.task == "survival":
        y = tgt.y
        train_time = train_event = None
        if train_run is not None and train_run.predictions is not None and "time" in train_run.predictions:
            train_time = train_run.predictions["time"].to_numpy(float)
            train_event = train_run.predictions["event"].to_numpy(int)
        fit_grid = _fit_grid(fitted, train_run)
        times = external_grid(fit_grid, y["time"], y["event"]) if fit_grid is not None else None
        surv = head.predict_survival(cohort, times, risk=pred) if times is not None and len(times) else None
        fold = FoldPredictions(time=y["time"], event=y["event"], risk=pred, surv=surv, times=times,
                               train_time=train_time, train_event=train_event)
        event_prob = None
        if opts.horizon is not None:
            event_prob = 1.0 - head.predict_survival(cohort, np.array([opts.horizon]), risk=pred)[:, 0]
        ev = survival_evidence(y["time"], y["event"], pred, event_prob, opts=opts, patients=tgt.patients,
                               labels=table, tables=tables, n_boot=n_boot, seed=seed, what="external cohort")
        ev["eval_times_source"] = (
            "no recorded grid of the fit run: ibs and td_auc are not computed" if fit_grid is None else
            f"the fit run's evaluation grid ({len(fit_grid)} times), clipped to the external follow-up: "
            f"{0 if times is None else len(times)} times kept")
        return summarise([fold], n_boot=n_boot, seed=seed), ev
    if tgt.task == "regression":
        fold = FoldPredictions(y=np.asarray(tgt.y, dtype=np.float64), value=np.asarray(pred, dtype=np.float64))
        ev = regression_evidence(tgt.y, pred, opts=opts, patients=tgt.patients, labels=table, tables=tables,
                                 n_boot=n_boot, seed=seed)
        return summarise([fold], n_boot=n_boot, seed=seed), ev
    fold = FoldPredictions(y=np.asarray(tgt.y, dtype=int), probs=pred)
    thresholds = None if post.threshold is None else np.full(len(tgt.y), post.threshold, dtype=float)
    ev = classification_evidence(tgt.y, pred, classes, opts=opts.model_copy(update={"calibrate":
                                                                                    post.calibrator.method}),
                                 thresholds=thresholds, patients=tgt.patients, labels=table, tables=tables,
                                 n_boot=n_boot, seed=seed, raw_probs=raw, what="external cohort")
    if "operating_point" in ev:
        ev["operating_point"].update(
            threshold=post.threshold, target=post.operating_point.to_json() if post.operating_point else None,
            chosen_on="the training cohort (stored with the model by `mmcli fit`)")
    return summarise([fold], n_boot=n_boot, seed=seed), ev


def _fit_grid(fitted: FittedModel, train_run: Any) -> np.ndarray | None:
    """The survival evaluation grid the model's fit used: recorded with the model, else in the run's
    metrics.json (runs fitted before the model recorded it)."""
    grid = fitted.run.get("eval_times")
    if grid is None and train_run is not None:
        grid = ((train_run.metrics or {}).get("metrics", {}).get("ibs") or {}).get("eval_times")
    return None if grid is None else np.asarray(grid, dtype=np.float64)


def _drift(fitted: FittedModel, cohort: Cohort, train_run: Any, train_store: str | Path | None, n_permutations: int,
           seed: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Per model modality: training cohort vs this cohort (see :mod:`mmcli.heads.evaluation.drift`)."""
    path = Path(train_store) if train_store is not None else (Path(train_run.store) if train_run and train_run.store
                                                              else None)
    if path is None or not path.exists():
        return {"skipped": f"the training store {str(path) if path else '(not recorded)'} is not available. "
                           "Fix: pass --train-store with the store the model was fitted on."}
    train_patients = (list(train_run.predictions["patient_id"].astype(str))
                      if train_run is not None and train_run.predictions is not None else None)
    tfs = open_store(path, "r")
    train = fitted.head.align(load_cohort(tfs, fitted.sources(tfs), train_patients))
    out: dict[str, Any] = {
        "method": "classifier two-sample test: median imputation + scaling + logistic regression telling training "
                  "from new patients on the modality's patient-level features (bags mean-pooled); stratified "
                  "5-fold cross-validated AUROC (0.5 = no shift) with a permutation p-value "
                  "(sklearn permutation_test_score); smd = |mean_new - mean_train| / sd_train per feature",
        "training_store": str(path.resolve()), "n_train_patients": len(train), "modalities": {},
    }
    for k, name in enumerate(cohort.names):
        spec = cohort.modalities[name].spec
        names = list(spec.columns) if spec.columns is not None else None
        say(f"drift: {name}")
        out["modalities"][name] = modality_drift(train.modalities[name].pooled(), cohort.modalities[name].pooled(),
                                                 names=names, n_permutations=n_permutations, seed=seed + k)
    return out
