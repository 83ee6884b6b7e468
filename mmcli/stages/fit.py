"""``mmcli fit``: cross-validate a head on cached features, write the run directory, refit the final model.

Run directory (``out``)::

    config.json          head, params, task, target / time+event, classes, modalities, encoder_ids, folds, seed,
                         store, labels, features_sha256, excluded patients, timings, mmcli version, created
    metrics.json         {"head","task","modalities","folds","n_patients","metrics":{name:{mean,ci_low,ci_high,
                         per_fold}},"encoder_ids","seed","created"}  (see mmcli.heads.evaluation.metrics)
    predictions.csv      out-of-fold: patient_id,fold,y_true,y_pred,prob_<class>...  |  patient_id,fold,time,event,risk
    folds.json           {patient_id: fold}
    cv_audit.json        per fold: the patients each preprocessing step was fit on, and their overlap with the
                         fold's test patients (0); likewise the fold's calibrator / threshold (``calibrator_fit_on``)
    model/               final model refit on all patients: config.json, weights, preprocess.{json,safetensors},
                         postprocess.json (with --calibrate / --operating-point: calibrator and threshold fitted on
                         the out-of-fold probabilities of all patients; applied by predict)
    modality_weights.json  fusion_mlp: {modality: weight}, averaged over folds
    shap.csv             xgboost: patient_id + one column per feature, out-of-fold SHAP contributions
    attributions.csv     fusion_mlp, attention_mil: out-of-fold integrated gradients, patient_id,fold,modality,
                         feature,attribution,output,baseline_output (tables per column, embeddings and bags summed
                         per modality)
    attributions_windows.csv  fusion_mlp with windowed notes (text items of per-window rows): out-of-fold IG per
                         window, patient_id,fold,modality,item_id,window,char_start,char_end,tokens,attribution
                         (offsets into the note file, never its text; per patient they sum to the modality's row)
    attention.csv        attention_mil and fusion_mlp (pool=attention), out-of-fold tile attention:
                         patient_id,item_id,index,attention  (several bag modalities: attention.<modality>.csv)
"""
from __future__ import annotations

import json
import math
import time as _time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli import __version__
from mmcli.heads.base import Head
from mmcli.heads.data import Cohort, Source, load_cohort, patients_in, resolve_sources
from mmcli.heads.evaluation.calibration import Calibrator
from mmcli.heads.evaluation.evidence import (
    EvidenceOptions,
    Postprocess,
    classification_evidence,
    store_tables,
    survival_evidence,
)
from mmcli.heads.evaluation.metrics import center_risks_by_fold, summarise
from mmcli.heads.evaluation.operating_point import choose_threshold
from mmcli.heads.registry import create_head, head_class
from mmcli.heads.targets import Target, build_target, read_labels
from mmcli.heads.training.cv import FoldResult, check_folds, check_postprocess, cross_validate, head_params
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.rundir import RunWriter
from mmcli.pipeline.signals import stop_on_signals
from mmcli.pipeline.store import open_store


def fit(
    head: str,
    store: str | Path,
    labels: str | Path | pd.DataFrame,
    out: str | Path,
    *,
    target: str | None = None,
    time: str | None = None,
    event: str | None = None,
    modalities: Sequence[str] | None = None,
    encoders: dict[str, str] | None = None,
    folds: int = 5,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    n_boot: int = 1000,
    drop_unmatched: bool = False,
    strict_match: bool = False,
    explain: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    impute: str | None = None,
    batch_correct: str | None = None,
    batch_column: str | None = None,
    batch_keep: Sequence[str] | None = None,
    evidence: EvidenceOptions | None = None,
) -> dict[str, Any]:
    """Cross-validate ``head`` by patient, write the run directory ``out`` and return metrics.json's content.

    Args:
        head: registered head name (``attention_mil``, ``fusion_mlp``, ``xgboost``, ``cox``).
        store: feature store path. labels: labels CSV (or a DataFrame with ``patient_id``).
        target: classification column; or ``time`` (> 0, any unit) + ``event`` (1 = observed, 0 = censored).
        modalities: store modalities and/or table names; default: what the head uses by default
            (:meth:`~mmcli.heads.base.Head.default_modalities`: all of them, or the bag modality ``wsi``).
        encoders: ``{modality: encoder_id}`` where a modality has features of several encoders.
        folds, seed: K of the stratified patient-level K-fold, and the seed of splits and models.
        params: head parameters (e.g. ``{"fusion": "bilinear", "epochs": 20}``), validated by the head's
            parameter model before anything is read.
        n_boot: bootstrap replicates of the confidence intervals.
        drop_unmatched: leave out (and record) rows with a missing label value instead of refusing them.
            Labelled patients absent from the store and store patients without labels are always left out
            with a note (counts and a few ids; all of them in config.json ``excluded_patients``); no overlap
            at all, or too few patients left for ``folds``, is an error.
        strict_match: refuse (instead of leaving out) patients that are only in the labels or only in the store.
        explain: also write attention / SHAP / modality weights where the head has them.
        impute, batch_correct, batch_column, batch_keep: the head parameters of the same names (in-fold
            imputation with indicators; ComBat batch correction on the labels' ``batch_column``, protecting
            ``batch_keep``), merged into ``params``.
        evidence: recalibration, operating point, decision-curve thresholds / horizon and subgroups
            (:class:`~mmcli.heads.evaluation.evidence.EvidenceOptions`); metrics.json gets ``calibration``,
            ``operating_point``, ``decision_curve`` and ``subgroups`` blocks.
        overwrite: replace an existing run in ``out`` (whole: nothing of it is left). Without it an existing,
            non-empty ``out`` is refused before any work. Either way ``out`` is locked while the fit runs (a
            second writer is refused) and only changes at the very end (:class:`~mmcli.pipeline.rundir.RunWriter`):
            an error, a full disk or SIGINT / SIGTERM (:class:`~mmcli.pipeline.signals.Interrupted`) leave it
            as it was.
    """
    params = _prep_params(params, impute=impute, batch_correct=batch_correct, batch_column=batch_column,
                          batch_keep=batch_keep)
    with stop_on_signals():
        return _fit(head, store, labels, out, target=target, time=time, event=event, modalities=modalities,
                    encoders=encoders, folds=folds, seed=seed, params=params, n_boot=n_boot,
                    drop_unmatched=drop_unmatched, strict_match=strict_match, explain=explain, overwrite=overwrite,
                    log=log, evidence=evidence)


def _fit(head: str, store: str | Path, labels: str | Path | pd.DataFrame, out: str | Path, *, target: str | None,
         time: str | None, event: str | None, modalities: Sequence[str] | None, encoders: dict[str, str] | None,
         folds: int, seed: int, params: dict[str, Any] | None, n_boot: int, drop_unmatched: bool,
         strict_match: bool, explain: bool, overwrite: bool, log: Callable[[str], None] | None,
         evidence: EvidenceOptions | None) -> dict[str, Any]:
    say = log or (lambda _msg: None)
    t_start = _clock()
    cls = head_class(head)
    cls.check_params(params or {})
    ev_opts = (evidence or EvidenceOptions()).check()
    out = Path(out)
    store_path = Path(store)
    fs = open_store(store_path, "r")
    names = cls.default_modalities(fs.modalities(), fs.tables(), fs.path) if modalities is None else list(modalities)
    sources = resolve_sources(fs, names, encoders)
    table = read_labels(labels)
    tgt = build_target(table, target=target, time=time, event=event, drop_missing=drop_unmatched)
    _check_classes_finite(table, tgt)
    check_postprocess(tgt, ev_opts.calibrate, ev_opts.op())
    if tgt.task not in cls.tasks:
        raise InputError(f"head {head!r} supports {list(cls.tasks)}; the labels give a {tgt.task} task. "
                         "Fix: choose another --head or other label columns.")
    tgt, excluded = _align(fs, sources, tgt, say, strict_match)
    with RunWriter(out, overwrite=overwrite) as writer:  # lock --out, refuse an existing run: before the work
        return _fit_into(writer, head, cls, fs, store_path, labels, table, sources, tgt, excluded, ev_opts,
                         folds=folds, seed=seed, params=params, n_boot=n_boot, explain=explain, say=say,
                         t_start=t_start)


def _fit_into(writer: RunWriter, head: str, cls: type[Head], fs: Any, store_path: Path,
              labels: str | Path | pd.DataFrame, table: pd.DataFrame, sources: Sequence[Source], tgt: Target,
              excluded: dict, ev_opts: EvidenceOptions, *,
              folds: int, seed: int, params: dict[str, Any] | None, n_boot: int, explain: bool,
              say: Callable[[str], None], t_start: float) -> dict[str, Any]:
    """Cross-validate, refit and write the run through ``writer`` (locked, staged)."""
    time_now = t_start
    out = writer.path
    say(f"{len(tgt.patients)} patients, modalities {[s.name for s in sources]}, task {tgt.task}")
    cohort = load_cohort(fs, sources, tgt.patients)
    tgt, cohort, no_data = _require_data(cls, cohort, tgt)
    cohort.covariates = batch_covariates(table, fs, params)
    if no_data:
        excluded["missing_required_modality"] = no_data
        say(f"left out {len(no_data)} patients without the modality {head} needs: {no_data[:5]}...")
    check_folds(tgt, folds, after=" left after leaving out unmatched patients" if excluded else "")
    t_load = _clock() - time_now
    say(f"loaded features in {t_load:.1f}s ({len(cohort) / max(t_load, 1e-9):.1f} patients/s)")

    time_now = _clock()
    results = cross_validate(head, cohort, tgt, folds, seed, params, explain=explain, log=say,
                             calibrate=ev_opts.calibrate, operating_point=ev_opts.op(),
                             inner_folds=ev_opts.inner_folds)
    t_cv = _clock() - time_now
    time_now = _clock()
    metrics = summarise([r.eval for r in results], n_boot=n_boot, seed=seed)
    post, evidence_doc = _evidence(results, tgt, cohort, ev_opts, table, fs, n_boot, seed)
    t_metrics = _clock() - time_now

    time_now = _clock()
    final = create_head(head, **head_params(head, tgt, seed, params)).fit(cohort, tgt.y)
    t_refit = _clock() - time_now

    writer.begin()
    encoder_ids = {s.name: (s.encoder_id if s.encoder_id else "tabular") for s in sources}
    created = _time.strftime("%Y-%m-%dT%H:%M:%S%z")
    modality_names = [s.name for s in sources]
    run = {
        "head": head, "params": final.get_params(), "task": tgt.kind, "problem": tgt.task,
        "target": tgt.target, "time": tgt.time, "event": tgt.event, "classes": tgt.classes,
        "modalities": modality_names, "encoder_ids": encoder_ids, "folds": folds, "seed": seed,
        "store": str(store_path.resolve()), "labels": _labels_ref(labels), "features_sha256": cohort.features_sha256,
        "n_patients": len(tgt.patients), "excluded_patients": {**tgt.dropped, **excluded},
        "risk_convention": "risk = log hazard ratio; higher = shorter survival" if tgt.task == "survival" else None,
        "n_boot": n_boot, "mmcli_version": __version__, "created": created, "evidence": ev_opts.to_json(),
    }
    writer.write_model(_saver(final, post), run)
    metrics_doc = {"head": head, "task": tgt.kind, "modalities": modality_names, "folds": folds,
                   "n_patients": len(tgt.patients), "metrics": metrics, "encoder_ids": encoder_ids, "seed": seed,
                   "created": created, **evidence_doc}
    if getattr(final, "privacy_", None):  # DP-SGD: the accountant's spent budget, final model and per fold
        metrics_doc["privacy"] = {**final.privacy_, "per_fold": [getattr(r.head, "privacy_", None) for r in results]}
    predictions = _predictions_frame(results, tgt)
    if ev_opts.op() is not None:
        predictions["decision"] = _decisions(results, tgt, predictions)
    writer.write_predictions(predictions)
    writer.write_folds({tgt.patients[i]: r.fold for r in results for i in r.test_idx})
    writer.write_audit(_batch_audit(_audit(results, tgt), results, tgt, cohort, say))
    if explain:
        _write_explanations(writer, results, cohort, tgt, _window_explanations(results, cohort, fs, sources))
    run["timings_s"] = {"load": round(t_load, 3), "cv": round(t_cv, 3), "metrics": round(t_metrics, 3),
                        "refit": round(t_refit, 3), "total": round(_clock() - t_start, 3)}
    writer.finish(run, metrics_doc)
    say(f"cross-validation {t_cv:.1f}s, refit {t_refit:.1f}s; wrote {out}")
    return metrics_doc


# ---- inputs -------------------------------------------------------------------------------------------------
def _prep_params(params: dict[str, Any] | None, **given: Any) -> dict[str, Any] | None:
    """``params`` with the preprocessing options that were given (``--impute``, ``--batch-correct`` ...)."""
    if not given.get("batch_correct") and (given.get("batch_column") or given.get("batch_keep")):
        raise InputError("--batch-column / --batch-keep do nothing without --batch-correct. Fix: add "
                         "--batch-correct combat.")
    extra = {k: (list(v) if k == "batch_keep" else v) for k, v in given.items() if v}
    return {**(params or {}), **extra} if extra else params


def batch_covariates(table: pd.DataFrame, fs: Any, params: dict[str, Any] | None) -> pd.DataFrame | None:
    """The batch column and protected covariates of batch correction, indexed by patient_id, from the labels
    table or else from a store table that has the column; None when batch correction is off."""
    params = params or {}
    if params.get("batch_correct", "none") == "none" or not params.get("batch_column"):
        return None
    cols = [params["batch_column"], *(params.get("batch_keep") or [])]
    frames = []
    for col in cols:
        if col in table.columns:
            frames.append(table[col])
            continue
        for name in fs.tables():
            t = fs.read_table(name)
            if col in t.columns:
                frames.append(t[col].rename(col).set_axis(t.index.astype(str)))
                break
        else:
            where = table.attrs.get("source", "the labels")
            raise InputError(f"--batch-column/--batch-keep {col!r}: no such column in {where} "
                             f"({list(table.columns)}) nor in the store's tables {fs.tables()}. Fix: name a column "
                             "of the labels file (predict: pass --covariates FILE holding it).")
    return pd.concat(frames, axis=1)


def _batch_audit(audit: dict[str, Any], results: list[FoldResult], tgt: Target, cohort: Cohort,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """Per fold with batch correction: the batches the harmoniser was fit on, and the test patients it left
    uncorrected (batch missing or not seen in the training fold: ComBat has no estimate for it); noted in the log."""
    if cohort.covariates is None:
        return audit
    for entry, r in zip(audit["folds"], results):
        harm = [p.harmoniser for p in r.head.preprocessors_.values() if getattr(p, "harmoniser", None) is not None]
        if not harm:
            continue
        h = harm[0]
        test = [tgt.patients[i] for i in r.test_idx]
        batch = cohort.covariates.reindex(test)[h.batch_column]
        left = [p for p, b in zip(test, batch) if pd.isna(b) or str(b) not in h.batches_]
        entry["batch_correction"] = {"method": "combat", "column": h.batch_column, "keep": h.keep,
                                     "training_batches": h.batches_, "uncorrected_test_patients": left}
        if left:
            say(f"note: fold {r.fold + 1}: {len(left)} test patient(s) left without batch correction (batch "
                f"missing or not in the training fold): {_some(left)}")
    return audit


def _clock() -> float:
    return _time.perf_counter()


def _labels_ref(labels: Any) -> str:
    return str(Path(labels).resolve()) if isinstance(labels, (str, Path)) else "<DataFrame>"


def _align(fs: Any, sources: Sequence[Source], tgt: Target, say: Callable[[str], None], strict: bool = False
           ) -> tuple[Target, dict]:
    """Keep the patients that have both a label and any chosen modality; note (and return) the others, or
    refuse them when ``strict``."""
    in_store = patients_in(fs, sources)
    labelled = set(tgt.patients)
    unknown = sorted(labelled - in_store)
    unlabelled = sorted(in_store - labelled - set(tgt.dropped.get("missing_label", [])))
    names = [s.name for s in sources]
    keep = [p for p in sorted(labelled) if p in in_store]
    if not keep:
        raise InputError(f"{tgt.source}: none of its {len(labelled)} labelled patient(s) (e.g. {sorted(labelled)[:3]}) "
                         f"has features of {names} in {fs.path} (its patients: e.g. {sorted(in_store)[:3]}). "
                         "Fix: check that both use the same patient ids, or extract the features first.")
    if strict and (unknown or unlabelled):
        raise InputError(f"{tgt.source}: {len(unknown)} labelled patient(s) without features of {names} in "
                         f"{fs.path} ({_some(unknown)}) and {len(unlabelled)} patient(s) of the store without a "
                         f"label ({_some(unlabelled)}). Fix: make labels and store cover the same patients.")
    excluded: dict[str, list[str]] = {}
    if unknown:
        excluded["not_in_store"] = unknown
        say(f"note: left out {len(unknown)} labelled patient(s) of {tgt.source} without features of {names} in "
            f"{fs.path}: {_some(unknown)}")
    if unlabelled:
        excluded["no_label"] = unlabelled
        say(f"note: left out {len(unlabelled)} patient(s) of {fs.path} without a row in {tgt.source}: "
            f"{_some(unlabelled)}")
    return tgt.subset(keep), excluded


def _some(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _check_classes_finite(table: pd.DataFrame, tgt: Target) -> None:
    """A numeric class label must be finite: ``inf`` in a 0/1 column is a broken value, not a class."""
    if tgt.classes is None:
        return
    bad = [c for c in tgt.classes if _nonfinite_number(c)]
    if bad:
        lines = table.attrs.get("lines", {})
        rows = [p for p, c in zip(tgt.patients, np.asarray(tgt.classes)[tgt.y]) if c in bad]
        where = ", ".join(f"line {lines[p]} ({p})" if p in lines else p for p in rows[:8])
        raise InputError(f"{tgt.source}: column {tgt.target!r} holds non-finite value(s) {bad} at {where}. "
                         "Fix: give each patient a real class, or leave the cell empty and pass --drop-unmatched.")


def _nonfinite_number(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _require_data(cls: type[Head], cohort: Cohort, tgt: Target) -> tuple[Target, Cohort, list[str]]:
    """Leave out the patients the head cannot use (:meth:`~mmcli.heads.base.Head.usable_patients`)."""
    ok = cls.usable_patients(cohort.presence())
    if ok.all():
        return tgt, cohort, []
    idx = np.flatnonzero(ok)
    dropped = [cohort.patients[i] for i in np.flatnonzero(~ok)]
    return tgt.subset([cohort.patients[i] for i in idx]), cohort.subset(idx), dropped


# ---- evidence: calibration, operating point, decision curve, subgroups -------------------------------------
def _evidence(results: list[FoldResult], tgt: Target, cohort: Cohort, opts: EvidenceOptions, labels: pd.DataFrame,
              fs: Any, n_boot: int, seed: int) -> tuple[Postprocess, dict[str, Any]]:
    """metrics.json's evidence blocks from the out-of-fold predictions, and the final model's output policy:
    its calibrator fitted, and its threshold chosen, on the out-of-fold probabilities of all patients (the same
    cross-validated-predictions logic as inside each fold)."""
    order = np.concatenate([r.test_idx for r in results])
    patients = [tgt.patients[i] for i in order]
    y = tgt.y[order]
    if tgt.task == "survival":
        risk = np.concatenate([r.pred for r in results])
        event_prob = None
        if opts.horizon is not None:
            h = np.array([opts.horizon], dtype=float)
            event_prob = np.concatenate([1.0 - r.head.predict_survival(cohort.subset(r.test_idx), h, risk=r.pred)[:, 0]
                                         for r in results])
        return Postprocess(), survival_evidence(y["time"], y["event"], risk, event_prob, opts=opts,
                                                patients=patients, labels=labels, tables=store_tables(fs),
                                                n_boot=n_boot, seed=seed)
    assert tgt.classes is not None
    op = opts.op()
    probs = np.vstack([r.pred for r in results])
    raw = np.vstack([r.pred if r.raw_pred is None else r.raw_pred for r in results])
    thresholds = (np.concatenate([np.full(len(r.test_idx), r.threshold, dtype=float) for r in results])
                  if op is not None else None)
    doc = classification_evidence(y, probs, tgt.classes, opts=opts, thresholds=thresholds, patients=patients,
                                  labels=labels, tables=store_tables(fs), n_boot=n_boot, seed=seed, raw_probs=raw)
    post = Postprocess(classes=tgt.classes)
    if opts.calibrate != "none" or op is not None:
        cal = Calibrator(opts.calibrate).fit(raw, y, patients)
        final = choose_threshold(y, cal.transform(raw)[:, 1], op) if op is not None else None
        post = Postprocess(cal, final, op, tgt.classes)
        doc["calibration"]["final_model"] = "calibrator fitted on the out-of-fold probabilities of all patients"
        if op is not None:
            doc["operating_point"].update(
                target=op.to_json(), threshold_per_fold=[r.threshold for r in results], final_threshold=final,
                chosen_on="each fold: cross-validated probabilities of its training patients (nested); final "
                          "model: the out-of-fold probabilities of all patients")
    return post, doc


def _saver(final: Head, post: Postprocess) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        final.save(folder)
        if post.calibrator.active or post.threshold is not None:
            post.save(folder)
    return save


def _decisions(results: list[FoldResult], tgt: Target, predictions: pd.DataFrame) -> list[str]:
    """Each out-of-fold patient's decision at its fold's threshold (``classes[1]`` when P >= threshold)."""
    assert tgt.classes is not None
    thr = {tgt.patients[i]: r.threshold for r in results for i in r.test_idx}
    p = predictions[f"prob_{tgt.classes[1]}"].to_numpy(float)
    return [tgt.classes[1] if v >= thr[pid] else tgt.classes[0] for pid, v in zip(predictions["patient_id"], p)]


# ---- outputs (written through mmcli.pipeline.rundir.RunWriter) ------------------------------------------
def prediction_frame(patients: Sequence[str], pred: np.ndarray, tgt_task: str, classes: Sequence[str] | None
                     ) -> pd.DataFrame:
    """``patient_id`` + ``y_pred, prob_<class>...`` (classification) or ``risk`` (survival)."""
    df = pd.DataFrame({"patient_id": list(patients)})
    if tgt_task == "survival":
        df["risk"] = pred
        return df
    assert classes is not None
    df["y_pred"] = [classes[i] for i in np.asarray(pred).argmax(axis=1)]
    for k, c in enumerate(classes):
        df[f"prob_{c}"] = pred[:, k]
    return df


def _predictions_frame(results: list[FoldResult], tgt: Target) -> pd.DataFrame:
    """Out-of-fold predictions.csv rows, in the labels' patient order. Survival risks are centred per fold
    (each fold model's risks carry an arbitrary offset: the Cox loss is shift-invariant), so pooled statistics
    (the report's c-index and risk groups, ``compare``) are not mixed with those offsets."""
    frames = []
    for r in results:
        pids = [tgt.patients[i] for i in r.test_idx]
        df = prediction_frame(pids, r.pred, tgt.task, tgt.classes)
        df.insert(1, "fold", r.fold)
        if tgt.task == "survival":
            y = tgt.y[r.test_idx]
            df.insert(2, "time", y["time"])
            df.insert(3, "event", y["event"].astype(int))
        else:
            assert tgt.classes is not None
            df.insert(2, "y_true", [tgt.classes[c] for c in tgt.y[r.test_idx]])
        frames.append(df)
    order = {p: i for i, p in enumerate(tgt.patients)}
    out = pd.concat(frames, ignore_index=True)
    if tgt.task == "survival":
        out = center_risks_by_fold(out)
    return out.iloc[np.argsort(out["patient_id"].map(order).to_numpy(), kind="stable")]


def _audit(results: list[FoldResult], tgt: Target) -> dict[str, Any]:
    folds = []
    for r in results:
        test = {tgt.patients[i] for i in r.test_idx}
        folds.append({
            "fold": r.fold, "n_train": len(r.train_idx), "n_test": len(r.test_idx),
            "preprocessing_fit_on": r.preprocessing_patients,
            "overlap_with_test": {n: len(test & set(p)) for n, p in r.preprocessing_patients.items()},
        })
        if r.calibrator is not None:  # recorded by the calibrator itself when it was fitted
            folds[-1]["calibrator_fit_on"] = r.calibrator.fitted_patients
            folds[-1]["calibrator_overlap_with_test"] = len(test & set(r.calibrator.fitted_patients))
    return {"folds": folds}


def attention_frame(patients: Sequence[str], cohort_items: Sequence[list[tuple[str, int]]],
                    attention: Sequence[np.ndarray | None]) -> pd.DataFrame:
    """Rows ``patient_id,item_id,index,attention``: ``index`` is the row within that item's features."""
    pid_col, item_col, idx_col, att_col = [], [], [], []
    for pid, items, att in zip(patients, cohort_items, attention):
        if att is None:
            continue
        for iid, n in items:
            pid_col.append(np.full(n, pid, dtype=object))
            item_col.append(np.full(n, iid, dtype=object))
            idx_col.append(np.arange(n))
        att_col.append(np.asarray(att, dtype=np.float64))
    if not att_col:
        return pd.DataFrame(columns=["patient_id", "item_id", "index", "attention"])
    return pd.DataFrame({"patient_id": np.concatenate(pid_col), "item_id": np.concatenate(item_col),
                         "index": np.concatenate(idx_col), "attention": np.concatenate(att_col)})


def _window_explanations(results: list[FoldResult], cohort: Cohort, fs: Any, sources: Sequence[Source]
                         ) -> pd.DataFrame | None:
    """Out-of-fold IG per note window (``attributions_windows.csv``) for the folds whose head has vector IG and
    a store modality whose items carry ``row_weights``; each such fold's ``attributions`` are replaced by the
    windowed run's (the same integration path, so the same totals)."""
    from mmcli.heads.nn.attribution import read_windows, window_integrated_gradients

    windows = {s.name: w for s in sources if s.encoder_id is not None
               for w in [read_windows(fs, s.name, s.encoder_id, cohort.patients)] if w}
    frames = []
    for r in results if windows else []:
        if r.attributions is None or r.head.input_kind == "bag":  # no IG, or IG over a bag (attention_mil)
            continue
        r.attributions, win = window_integrated_gradients(r.head, cohort.subset(r.test_idx), windows)
        frames.append(win.assign(fold=r.fold))
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    win = pd.concat(frames, ignore_index=True)
    return win[["patient_id", "fold", *[c for c in win.columns if c not in ("patient_id", "fold")]]]


def _write_explanations(writer: RunWriter, results: list[FoldResult], cohort: Cohort, tgt: Target,
                        windows: pd.DataFrame | None = None) -> None:
    weights = [r.modality_weights for r in results if r.modality_weights]
    if weights:
        writer.write_modality_weights({m: float(np.mean([w[m] for w in weights])) for m in weights[0]})
    contrib = [r.contributions for r in results if r.contributions is not None]
    if contrib:
        shap = pd.concat(contrib)
        writer.write_shap(shap.loc[[p for p in tgt.patients if p in shap.index]].reset_index())
    igs = [r.attributions.assign(fold=r.fold) for r in results if r.attributions is not None]
    if igs:  # out-of-fold integrated gradients (torch heads)
        ig = pd.concat(igs, ignore_index=True)
        writer.write_attributions(ig[["patient_id", "fold",
                                      *[c for c in ig.columns if c not in ("patient_id", "fold")]]])
    if windows is not None:
        writer.write_window_attributions(windows)
    frames: dict[str, list[pd.DataFrame]] = {}
    for r in results:
        for name, att in (r.attention or {}).items():
            items = cohort.modalities[name].items
            assert items is not None
            frames.setdefault(name, []).append(attention_frame(
                [tgt.patients[i] for i in r.test_idx], [items[i] for i in r.test_idx], att))
    if frames:
        writer.write_attention({name: pd.concat(fr, ignore_index=True) for name, fr in frames.items()})


# ---- CLI helpers ---------------------------------------------------------------------------------------------
def parse_params(pairs: Sequence[str], head: str | Sequence[str] | None = None) -> dict[str, Any]:
    """``["epochs=20", "fusion=bilinear", "class_weight=null"]`` -> dict; values parsed as JSON, else text.

    With ``head`` (one name or several), the values are validated against each head's parameter model now:
    an unknown key or a bad value is an InputError naming the key and what it accepts.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param epochs=20.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    for name in [head] if isinstance(head, str) else list(head or ()):
        head_class(name).check_params(out)
    return out


def parse_encoders(pairs: Sequence[str]) -> dict[str, str]:
    """``["wsi=resnet50_trunc-abc123"]`` -> ``{"wsi": "resnet50_trunc-abc123"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise InputError(f"--encoder {pair!r}: expected MODALITY=ENCODER_ID, e.g. --encoder wsi=ENCODER_ID.")
        out[key.strip()] = value.strip()
    return out
