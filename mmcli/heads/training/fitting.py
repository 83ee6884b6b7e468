"""The fit procedure behind ``mmcli fit`` and ``mmcli ablate``: cross-validate a head by patient, summarise the
out-of-fold predictions, refit on all patients and write the run folder.

Run folder (``FitOptions.out``, written through :class:`~mmcli.pipeline.rundir.RunWriter`: locked, staged,
swapped in whole)::

    config.json          head, params, task, target / time+event, classes, modalities, encoder_ids, folds, seed,
                         store, labels, features_sha256, excluded patients, encoder_provenance (encoder, pretrained,
                         licence per modality), options (the resolved FitOptions),
                         timings, mmcli version, created
    metrics.json         {"head","task","modalities","folds","n_patients","metrics":{name:{mean,ci_low,ci_high,
                         per_fold}},"encoder_ids","seed","created"} + the evidence blocks
                         (see :mod:`mmcli.heads.evaluation.metrics`)
    predictions.csv      out-of-fold: patient_id,fold,y_true,y_pred,prob_<class>...  |  patient_id,fold,y_true,y_pred
                         (regression, in the target's unit)  |  patient_id,fold,time,event,
                         risk (centred per fold); batch_corrected with batch correction; decision with an
                         operating point
    folds.json           {patient_id: fold}
    cv_audit.json        per fold: the patients each preprocessing step was fit on, and their overlap with the
                         fold's test patients (0); likewise the fold's calibrator / threshold (``calibrator_fit_on``);
                         with --init: the pretraining's patients and their overlap with the fold's test patients
                         (``pretraining``; metrics.json ``pretraining`` sums it up in a note)
    model/               final model refit on all patients: config.json, weights, preprocess.{json,safetensors},
                         postprocess.json (with --calibrate / --operating-point: calibrator and threshold fitted on
                         the out-of-fold probabilities of all patients; applied by predict)
    modality_weights.json  fusion_mlp: {modality: weight}, averaged over folds
    shap.csv             xgboost: patient_id + one column per feature, out-of-fold SHAP contributions
    attributions.csv     fusion_mlp: out-of-fold integrated gradients, patient_id,fold,modality,feature,
                         attribution,output,baseline_output (tables per column, embeddings summed per modality)
    attributions_windows.csv  fusion_mlp with windowed notes: out-of-fold IG per window (offsets into the note
                         file, never its text; per patient they sum to the modality's row)
    attention.csv        bag heads and fusion_mlp (pool=attention): out-of-fold tile attention
                         patient_id,item_id,index,attention  (several bag modalities: attention.<modality>.csv)
"""
from __future__ import annotations

import math
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli import __version__
from mmcli.heads.base import Head
from mmcli.heads.data import Cohort, Source, covariates_for, load_cohort, patients_in, resolve_sources
from mmcli.heads.evaluation.calibration import Calibrator
from mmcli.heads.evaluation.evidence import (
    Postprocess,
    classification_evidence,
    regression_evidence,
    store_tables,
    survival_evidence,
)
from mmcli.heads.evaluation.metrics import center_risks_by_fold, summarise
from mmcli.heads.evaluation.operating_point import choose_threshold
from mmcli.heads.fitted import FittedModel
from mmcli.heads.preprocess.leakage import check_covariates
from mmcli.heads.registry import head_class
from mmcli.heads.targets import Target, build_target, read_labels
from mmcli.heads.training.cv import FoldResult, check_folds, check_postprocess, cross_validate, run_params
from mmcli.heads.training.options import FitOptions
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.rundir import REGRESSION, SURVIVAL, RunWriter, attention_frame, prediction_frame
from mmcli.pipeline.scale import resolve_budget
from mmcli.pipeline.store import open_store

Say = Callable[[str], None]


@dataclass
class FitInputs:
    """What a fit reads, checked before the run folder is touched."""

    opts: FitOptions
    cls: type[Head]
    fs: Any
    sources: list[Source]
    table: pd.DataFrame
    target: Target
    excluded: dict[str, list[str]]


def fit_run(opts: FitOptions, say: Say | None = None, progress: bool = False) -> dict[str, Any]:
    """Cross-validate ``opts.head`` by patient, write the run folder ``opts.out``; return metrics.json's content.

    Every input is checked before the run folder is locked (a bad column, too few patients per fold, a head
    that cannot do the task: InputError naming the fix). ``opts.out`` is locked while the fit runs and only
    changes at the very end: an error, a full disk or SIGINT / SIGTERM leave it as it was. ``progress``: bars
    over the folds and epochs (the CLI's, on stderr)."""
    say = say or (lambda _msg: None)
    t_start = _time.perf_counter()
    inputs = read_inputs(opts, say)
    with RunWriter(opts.out, overwrite=opts.overwrite) as writer:
        return _fit_into(writer, inputs, say, t_start, progress)


def read_inputs(opts: FitOptions, say: Say) -> FitInputs:
    """Open the store, resolve the modalities, build and check the target, match labels and store."""
    cls = head_class(opts.head)
    fs = open_store(opts.store, "r")
    names = (cls.default_modalities(fs.modalities(), fs.tables(), fs.path) if opts.modalities is None
             else list(opts.modalities))
    sources = resolve_sources(fs, names, opts.encoders or None)
    table = read_labels(opts.labels)
    tgt = build_target(table, target=opts.target, time=opts.time, event=opts.event,
                       drop_missing=opts.drop_unmatched, task=opts.task)
    _check_classes_finite(table, tgt)
    check_postprocess(tgt, opts.evidence.calibrate, opts.evidence.op())
    if tgt.task not in cls.tasks:
        raise InputError(f"head {opts.head!r} supports {list(cls.tasks)}; the labels give a {tgt.task} task. "
                         "Fix: choose another --head or other label columns.")
    columns = opts.covariate_columns()
    if columns:  # refuse a missing batch column, or one derived from the outcome, before the run folder is touched
        check_covariates(covariates_for(columns, table, fs), tgt, getattr(opts.head_params, "batch_column", None),
                         getattr(opts.head_params, "batch_keep", None) or [])
    _check_subgroup_columns(opts, table, fs)
    tgt, excluded = _align(fs, sources, tgt, say, opts.strict_match)
    return FitInputs(opts, cls, fs, sources, table, tgt, excluded)


def _check_subgroup_columns(opts: FitOptions, table: pd.DataFrame, fs: Any) -> None:
    """Every ``--subgroups`` column must be in the labels or a store table: an InputError now, before the first
    fold, not after the cross-validation (issue 29: ``--subgroups age`` with no table holding ``age``)."""
    from mmcli.heads.evaluation.subgroups import column_values

    specs = opts.evidence.subgroup_specs()
    if specs:
        tables = store_tables(fs)
        for spec in specs:
            column_values(spec.column, [], table, tables)


def _fit_into(writer: RunWriter, inp: FitInputs, say: Say, t_start: float, progress: bool = False
              ) -> dict[str, Any]:
    """Cross-validate, refit and write the run through ``writer`` (locked, staged)."""
    opts, cls, tgt = inp.opts, inp.cls, inp.target
    clock = _time.perf_counter()
    say(f"{len(tgt.patients)} patients, modalities {[s.name for s in inp.sources]}, task {tgt.task}")
    budget = resolve_budget(opts.memory_budget)
    cohort = load_cohort(inp.fs, inp.sources, tgt.patients, memory_budget=budget)
    tgt, cohort, no_data = _require_data(cls, cohort, tgt)
    cohort.covariates = covariates_for(opts.covariate_columns(), inp.table, inp.fs)
    excluded = dict(inp.excluded)
    if no_data:
        excluded["missing_required_modality"] = no_data
        say(f"left out {len(no_data)} patients without the modality {opts.head} needs: {no_data[:5]}...")
    check_folds(tgt, opts.folds, after=" left after leaving out unmatched patients" if excluded else "")
    t_load = _time.perf_counter() - clock
    say(f"loaded features in {t_load:.1f}s ({len(cohort) / max(t_load, 1e-9):.1f} patients/s)")

    clock = _time.perf_counter()
    ev = opts.evidence
    results = cross_validate(opts.head, cohort, tgt, opts.folds, opts.seed, opts.head_params,
                             explain=opts.explain, log=say, calibrate=ev.calibrate, operating_point=ev.op(),
                             inner_folds=ev.inner_folds, scheduler=opts.scheduler, workers=opts.workers,
                             progress=progress, fold_init=_fold_init(opts))
    t_cv = _time.perf_counter() - clock
    clock = _time.perf_counter()
    metrics = summarise([r.eval for r in results], n_boot=opts.n_boot, seed=opts.seed)
    post, evidence_doc = _evidence(results, tgt, cohort, inp, opts)
    t_metrics = _time.perf_counter() - clock

    clock = _time.perf_counter()
    final = cls(run_params(opts.head, tgt, opts.seed, opts.head_params)).fit(cohort, tgt.y)
    if getattr(final, "privacy_", None):  # DP-SGD: calibrator / threshold are outside epsilon; say so
        from mmcli.heads.nn.privacy import with_postprocess

        final.privacy_ = with_postprocess(final.privacy_, ev.calibrate, ev.op() is not None)
    t_refit = _time.perf_counter() - clock

    writer.begin()
    encoder_ids = {s.name: (s.encoder_id if s.encoder_id else "tabular") for s in inp.sources}
    created = _time.strftime("%Y-%m-%dT%H:%M:%S%z")
    modality_names = [s.name for s in inp.sources]
    run = {
        "head": opts.head, "params": final.get_params(), "task": tgt.task,
        "target": tgt.target, "time": tgt.time, "event": tgt.event, "classes": tgt.classes,
        "modalities": modality_names, "encoder_ids": encoder_ids, "folds": opts.folds, "seed": opts.seed,
        "store": str(Path(opts.store).resolve()), "labels": _labels_ref(opts.labels),
        "features_sha256": cohort.features_sha256, "n_patients": len(tgt.patients),
        "excluded_patients": {**tgt.dropped, **excluded},
        "risk_convention": "risk = log hazard ratio; higher = shorter survival" if tgt.task == SURVIVAL else None,
        "encoder_provenance": encoder_provenance(opts.store, encoder_ids), "n_boot": opts.n_boot,
        "mmcli_version": __version__, "created": created,
        "evidence": ev.to_json(), "options": opts.to_json(),
    }
    if tgt.task == SURVIVAL:  # the one evaluation grid of the folds, for evaluate to score new cohorts on
        run["eval_times"] = (metrics.get("ibs") or {}).get("eval_times")
    fitted = FittedModel(final, post, tgt.classes)
    writer.write_model(fitted.save, run)
    metrics_doc: dict[str, Any] = {
        "head": opts.head, "task": tgt.task, "modalities": modality_names, "folds": opts.folds,
        "n_patients": len(tgt.patients), "metrics": metrics, "encoder_ids": encoder_ids, "seed": opts.seed,
        "created": created, **evidence_doc}
    if getattr(final, "privacy_", None):  # DP-SGD: the accountant's spent budget, final model and per fold
        metrics_doc["privacy"] = {**final.privacy_, "per_fold": [_spent(r.head) for r in results]}
    audit = _batch_audit(_audit(results, tgt), results, tgt, cohort, say)
    _pretraining_audit(audit, metrics_doc, results, tgt, opts, say)
    predictions = _predictions_frame(results, tgt)
    if ev.op() is not None:
        predictions["decision"] = _decisions(results, tgt, predictions)
    uncorrected = _uncorrected(audit)
    if uncorrected is not None:
        predictions["batch_corrected"] = ~predictions["patient_id"].isin(uncorrected)
        metrics_doc["batch_correction"] = {
            "n_corrected": int(predictions["batch_corrected"].sum()), "n_uncorrected": len(uncorrected),
            "uncorrected_patients": sorted(uncorrected),
            "note": "test patients whose batch was missing or absent from their training fold are scored "
                    "without batch correction (ComBat has no estimate for an unseen batch)"}
    writer.write_predictions(predictions)
    writer.write_folds({tgt.patients[i]: r.fold for r in results for i in r.test_idx})
    writer.write_audit(audit)
    if opts.explain != "none":
        _write_explanations(writer, results, cohort, tgt, _window_explanations(results, cohort, inp))
    run["timings_s"] = {"load": round(t_load, 3), "cv": round(t_cv, 3), "metrics": round(t_metrics, 3),
                        "refit": round(t_refit, 3), "total": round(_time.perf_counter() - t_start, 3)}
    writer.finish(run, metrics_doc)
    say(f"cross-validation {t_cv:.1f}s, refit {t_refit:.1f}s; wrote {writer.path}")
    return metrics_doc


# ---- inputs -------------------------------------------------------------------------------------------------
PROVENANCE_KEYS = ("encoder", "pretrained", "weights_source", "licence", "licence_terms", "gated", "source_repo")


def encoder_provenance(store: str | Path, encoder_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per modality, what the store records of its encoder (name, pretrained, licence and terms, gating), so a
    model card or ``serve``'s ``/model`` can state them without the training store. ``{}`` per modality where
    the store has none (tables, or metadata lost)."""
    from mmcli.pipeline.store import open_store

    out: dict[str, dict[str, Any]] = {}
    try:
        fs = open_store(Path(store), "r")
    except Exception:  # noqa: BLE001 - provenance is informational; fit already read the features
        return out
    for modality, eid in encoder_ids.items():
        attrs = {} if eid == "tabular" else fs.encoder_attrs(modality, eid)
        out[modality] = {k: attrs[k] for k in PROVENANCE_KEYS if k in attrs}
    return out


def _labels_ref(labels: Any) -> str:
    return str(Path(labels).resolve()) if isinstance(labels, (str, Path)) else "<DataFrame>"


def _align(fs: Any, sources: Sequence[Source], tgt: Target, say: Say, strict: bool = False
           ) -> tuple[Target, dict[str, list[str]]]:
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
def _evidence(results: list[FoldResult], tgt: Target, cohort: Cohort, inp: FitInputs, opts: FitOptions
              ) -> tuple[Postprocess, dict[str, Any]]:
    """metrics.json's evidence blocks from the out-of-fold predictions, and the final model's output policy:
    its calibrator fitted, and its threshold chosen, on the out-of-fold probabilities of all patients (the same
    cross-validated-predictions logic as inside each fold)."""
    ev, n_boot, seed = opts.evidence, opts.n_boot, opts.seed
    order = np.concatenate([r.test_idx for r in results])
    patients = [tgt.patients[i] for i in order]
    y = tgt.y[order]
    tables = store_tables(inp.fs)
    if tgt.task == REGRESSION:
        value = np.concatenate([np.asarray(r.pred, dtype=np.float64) for r in results])
        return Postprocess(), regression_evidence(y, value, opts=ev, patients=patients, labels=inp.table,
                                                  tables=tables, n_boot=n_boot, seed=seed)
    if tgt.task == SURVIVAL:
        # risks centred per fold, as in predictions.csv: each fold model's risks carry an arbitrary offset
        risk = np.concatenate([r.pred - np.mean(r.pred) for r in results])
        event_prob = None
        if ev.horizon is not None:
            h = np.array([ev.horizon], dtype=float)
            event_prob = np.concatenate([1.0 - r.head.predict_survival(cohort.subset(r.test_idx), h, risk=r.pred)[:, 0]
                                         for r in results])
        return Postprocess(), survival_evidence(y["time"], y["event"], risk, event_prob, opts=ev, patients=patients,
                                                labels=inp.table, tables=tables, n_boot=n_boot, seed=seed)
    assert tgt.classes is not None
    op = ev.op()
    probs = np.vstack([r.pred for r in results])
    raw = np.vstack([r.pred if r.raw_pred is None else r.raw_pred for r in results])
    thresholds = (np.concatenate([np.full(len(r.test_idx), r.threshold, dtype=float) for r in results])
                  if op is not None else None)
    doc = classification_evidence(y, probs, tgt.classes, opts=ev, thresholds=thresholds, patients=patients,
                                  labels=inp.table, tables=tables, n_boot=n_boot, seed=seed, raw_probs=raw)
    post = Postprocess(classes=tgt.classes)
    if ev.calibrate != "none" or op is not None:
        cal = Calibrator(ev.calibrate).fit(raw, y, patients)
        final = choose_threshold(y, cal.transform(raw)[:, 1], op) if op is not None else None
        post = Postprocess(cal, final, op, tgt.classes)
        doc["calibration"]["final_model"] = "calibrator fitted on the out-of-fold probabilities of all patients"
        if op is not None:
            doc["operating_point"].update(
                target=op.to_json(), threshold_per_fold=[r.threshold for r in results], final_threshold=final,
                chosen_on="each fold: cross-validated probabilities of its training patients (nested); final "
                          "model: the out-of-fold probabilities of all patients")
    return post, doc


def _decisions(results: list[FoldResult], tgt: Target, predictions: pd.DataFrame) -> list[str]:
    """Each out-of-fold patient's decision at its fold's threshold (``classes[1]`` when P >= threshold)."""
    assert tgt.classes is not None
    thr = {tgt.patients[i]: r.threshold for r in results for i in r.test_idx}
    p = predictions[f"prob_{tgt.classes[1]}"].to_numpy(float)
    return [tgt.classes[1] if v >= thr[pid] else tgt.classes[0] for pid, v in zip(predictions["patient_id"], p)]


# ---- outputs (written through mmcli.pipeline.rundir.RunWriter) ------------------------------------------
def _predictions_frame(results: list[FoldResult], tgt: Target) -> pd.DataFrame:
    """Out-of-fold predictions.csv rows, in the labels' patient order. Survival risks are centred per fold
    (each fold model's risks carry an arbitrary offset: the Cox loss is shift-invariant), so pooled statistics
    (the report's c-index and risk groups, ``compare``) are not mixed with those offsets."""
    frames = []
    for r in results:
        pids = [tgt.patients[i] for i in r.test_idx]
        df = prediction_frame(pids, r.pred, tgt.task, tgt.classes)
        df.insert(1, "fold", r.fold)
        if tgt.task == SURVIVAL:
            y = tgt.y[r.test_idx]
            df.insert(2, "time", y["time"])
            df.insert(3, "event", y["event"].astype(int))
        elif tgt.task == REGRESSION:
            df.insert(2, "y_true", np.asarray(tgt.y[r.test_idx], dtype=np.float64))
        else:
            assert tgt.classes is not None
            df.insert(2, "y_true", [tgt.classes[c] for c in tgt.y[r.test_idx]])
        frames.append(df)
    order = {p: i for i, p in enumerate(tgt.patients)}
    out = pd.concat(frames, ignore_index=True)
    if tgt.task == SURVIVAL:
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


def _fold_init(opts: FitOptions) -> Any:
    """``--init-in-fold``: the per-fold pretraining hook of cross-validation (None without it)."""
    if not opts.init_in_fold:
        return None
    from mmcli.heads.training.pretrain import FoldPretraining

    return FoldPretraining(str(Path(opts.store).resolve()), str(opts.head_params.init))


def _pretraining_audit(audit: dict[str, Any], metrics_doc: dict[str, Any], results: list[FoldResult], tgt: Target,
                       opts: FitOptions, say: Say) -> None:
    """With ``--init DIR``: per fold, the pretraining's patients and their overlap with the fold's test patients
    (cv_audit.json ``pretraining``), and the note of metrics.json ``pretraining``."""
    init = getattr(opts.head_params, "init", None)
    if not init:
        return
    from mmcli.heads.training.pretrain import overlap_audit

    tests = [[tgt.patients[i] for i in r.test_idx] for r in results]
    folds, note = overlap_audit(str(init), tests, [r.pretraining for r in results] if opts.init_in_fold else None)
    for entry, fold in zip(audit["folds"], folds):
        entry["pretraining"] = fold
    metrics_doc["pretraining"] = note
    say(f"note: pretraining ({init}): {note['note']}")


def _batch_audit(audit: dict[str, Any], results: list[FoldResult], tgt: Target, cohort: Cohort, say: Say
                 ) -> dict[str, Any]:
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


def _spent(head: Head) -> dict[str, Any] | None:
    """A fold model's privacy record without the scope text (the final model's record states it once)."""
    rec = getattr(head, "privacy_", None)
    return None if rec is None else {k: v for k, v in rec.items() if k not in ("covers", "not_covered")}


def _uncorrected(audit: dict[str, Any]) -> list[str] | None:
    """The out-of-fold patients left without batch correction (None: no batch correction in this run)."""
    entries = [f["batch_correction"] for f in audit["folds"] if "batch_correction" in f]
    if not entries:
        return None
    return [p for e in entries for p in e["uncorrected_test_patients"]]


def _window_explanations(results: list[FoldResult], cohort: Cohort, inp: FitInputs) -> pd.DataFrame | None:
    """Out-of-fold IG per note window (``attributions_windows.csv``) for the folds whose head has vector IG and
    a store modality whose items carry ``row_weights``; each such fold's ``attributions`` are replaced by the
    windowed run's (the same integration path, so the same totals). Torch is imported only when both exist."""
    if not any(r.attributions is not None and r.head.input_kind != "bag" for r in results):
        return None
    from mmcli.heads.windows import read_windows

    windows = {s.name: w for s in inp.sources if s.encoder_id is not None
               for w in [read_windows(inp.fs, s.name, s.encoder_id, cohort.patients)] if w}
    if not windows:
        return None
    from mmcli.heads.nn.attribution import window_integrated_gradients

    frames = []
    for r in results:
        if r.attributions is None or r.head.input_kind == "bag":  # no IG, or IG over a bag
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
    tiles = [r.tile_attributions.assign(fold=r.fold) for r in results if r.tile_attributions is not None]
    if tiles:  # --explain full: per-tile integrated gradients of a bag head
        t = pd.concat(tiles, ignore_index=True)
        writer.write_tile_attributions(t[["patient_id", "fold", *[c for c in t.columns
                                                                  if c not in ("patient_id", "fold")]]])
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
