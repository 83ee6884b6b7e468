"""Patient-level stratified K-fold cross-validation of a head: out-of-fold predictions and explanations.

Splits: scikit-learn ``StratifiedGroupKFold`` with the patient id as group (a patient's rows never span
folds), stratified by class (classification) or by the event indicator (survival), shuffled with the seed.
Each fold builds a fresh head and calls ``fit`` on the training patients only, so every scaler, imputer and
PCA is fit inside the training fold; each fitted head records the patients its preprocessing saw
(:attr:`FoldResult.preprocessing_patients`), which the audit compares with the fold's test patients.

Recalibration and operating points (``calibrate``, ``operating_point``) are nested the same way: inside each
training fold an inner stratified K-fold (:func:`inner_oof`, ``inner_folds``, fewer when a class is smaller)
gives cross-validated probabilities of the training patients; the fold's :class:`~mmcli.heads.evaluation.calibration.
Calibrator` is fitted on them and its threshold chosen on them (after calibration), then both are applied to
the predictions of the fold's head (fitted on the whole training fold) for the test patients. This is
scikit-learn's ``CalibratedClassifierCV(ensemble=False)`` logic; the test patients never reach either.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mmcli.heads.base import Head, HeadParams
from mmcli.heads.data import Cohort
from mmcli.heads.evaluation.calibration import Calibrator
from mmcli.heads.evaluation.metrics import FoldPredictions, survival_grid
from mmcli.heads.evaluation.operating_point import OperatingPoint, choose_threshold
from mmcli.heads.registry import head_class
from mmcli.heads.targets import Target
from mmcli.heads.training.progress import fold_progress
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.faults import fault


def check_folds(target: Target, folds: int, *, after: str = "") -> None:
    """Refuse a target that ``folds``-fold patient-level CV cannot split: every class (survival: the events, and
    the censored patients if any) needs ``folds`` patients so each test fold holds one, and every training
    fold needs 2 patients. ``after`` qualifies the patient count in messages (e.g. " left after ...")."""
    if folds < 2:
        raise InputError(f"--folds must be >= 2, got {folds}.")
    n = len(target.patients)
    if target.task == "regression":
        if n < 2 * folds:
            raise InputError(f"{target.source}: {n} patient(s){after}; {folds}-fold CV needs at least "
                             f"{2 * folds} so that every training fold has 2. Fix: lower --folds or add patients.")
        return
    if target.task == "survival":
        if n < 2 * folds:
            raise InputError(f"{target.source}: {n} patient(s){after}; {folds}-fold CV needs at least "
                             f"{2 * folds} so that every training fold has 2. Fix: lower --folds or add patients.")
        n_events = int(target.y["event"].sum())
        if n_events < folds:
            raise InputError(f"{target.source}: {n_events} observed event(s) in column {target.event!r} among the "
                             f"{n} patients{after}; {folds}-fold CV needs at least {folds}. "
                             "Fix: lower --folds or add patients with events.")
        if 0 < n - n_events < folds:  # folds are stratified by the event indicator
            raise InputError(f"{target.source}: event group sizes {{'censored': {n - n_events}}} are smaller than "
                             f"--folds {folds}, so some test folds would miss them. Fix: lower --folds or add "
                             "patients.")
        return
    assert target.classes is not None
    counts = np.bincount(np.asarray(target.y, dtype=int), minlength=len(target.classes))
    small = {c: int(k) for c, k in zip(target.classes, counts) if k < folds}
    if small:
        raise InputError(f"{target.source}: class sizes {small} in column {target.target!r} among the {n} "
                         f"patients{after} are smaller than --folds {folds}. Fix: lower --folds, add "
                         "patients, or merge rare classes.")


def make_splits(target: Target, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, test_idx) per fold, indices into ``target.patients`` (checked by :func:`check_folds`)."""
    from sklearn.model_selection import StratifiedGroupKFold

    check_folds(target, folds)
    sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    groups = np.asarray(target.patients)
    return [(np.asarray(tr), np.asarray(te)) for tr, te in sgkf.split(np.zeros(len(groups)), target.strata(),
                                                                        groups)]


@dataclass
class FoldResult:
    """One fold: indices, the fitted head, test predictions, metric inputs and explanations."""

    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    head: Head
    pred: np.ndarray  # probabilities (n_test, K) or risk (n_test,)
    eval: FoldPredictions
    attention: dict[str, list[np.ndarray | None]] | None = None
    modality_weights: dict[str, float] | None = None
    contributions: pd.DataFrame | None = None
    attributions: pd.DataFrame | None = None  # integrated gradients (torch heads), long format
    seconds: float = 0.0
    preprocessing_patients: dict[str, list[str]] = field(default_factory=dict)
    tile_attributions: pd.DataFrame | None = None  # --explain full: per-instance IG of a bag head
    raw_pred: np.ndarray | None = None  # the head's probabilities before recalibration (None: not recalibrated)
    calibrator: Calibrator | None = None  # fitted on the training fold's inner out-of-fold probabilities
    threshold: float | None = None  # operating-point threshold chosen on the same (after calibration)
    pretraining: dict[str, Any] | None = None  # the fold's own pretraining (fold_init), for the audit


def run_params(head: str, target: Target, seed: int, params: HeadParams | Mapping[str, Any] | None) -> HeadParams:
    """The head's parameters for this run: the user's (a validated model is carried as it is; a mapping, from
    an API call, is validated here once) with the task, classes and seed of the run."""
    if not isinstance(params, HeadParams):
        params = head_class(head).user_params(dict(params or {}))
    return params.for_run(task=target.task, n_classes=target.n_classes, seed=seed)


def inner_oof(head: str, cohort: Cohort, target: Target, hp: HeadParams, folds: int, seed: int) -> np.ndarray:
    """Cross-validated class probabilities (n, K) of ``cohort``'s patients from a stratified patient-level K-fold
    among them alone (K = ``folds``, or the smallest class size when smaller; at least 2)."""
    assert target.classes is not None
    counts = np.bincount(np.asarray(target.y, dtype=int), minlength=target.n_classes)
    k = int(min(folds, counts.min()))
    if k < 2:
        small = {c: int(n) for c, n in zip(target.classes, counts) if n < 2}
        raise InputError(f"{target.source}: a training fold holds class sizes {small}; recalibration and "
                         "operating points need 2 patients per class there for their inner cross-validation. "
                         "Fix: lower --folds, add patients, or drop --calibrate / --operating-point.")
    probs = np.zeros((len(target.patients), target.n_classes))
    for tr, te in make_splits(target, k, seed):
        probs[te] = head_class(head)(hp).fit(cohort.subset(tr), target.y[tr]).predict(cohort.subset(te))
    return probs


def check_postprocess(target: Target, calibrate: str, operating_point: OperatingPoint | None) -> None:
    """Refuse recalibration for survival and operating points outside binary tasks, naming the flag."""
    if calibrate != "none" and target.task != "classification":
        raise InputError(f"--calibrate {calibrate}: recalibration is for classification probabilities; this is a "
                         f"{target.task} task. Fix: drop --calibrate.")
    if operating_point is not None and not target.binary:
        what = target.task if target.task != "classification" else f"{target.n_classes}-class"
        raise InputError(f"--operating-point {operating_point}: needs a binary target; this is a {what} task. "
                         "Fix: drop --operating-point or use a binary --target.")


def cross_validate(
    head: str, cohort: Cohort, target: Target, folds: int = 5, seed: int = 0,
    params: HeadParams | Mapping[str, Any] | None = None,
    explain: bool | str = True, log: Callable[[str], None] | None = None, *, calibrate: str = "none",
    operating_point: OperatingPoint | None = None, inner_folds: int = 5, scheduler: str | None = None,
    workers: int | None = None, progress: bool = False, fold_init: Any = None,
) -> list[FoldResult]:
    """Fit a fresh ``head`` per fold on the training patients; predict the test patients.

    With ``calibrate`` (``platt`` | ``isotonic``) or ``operating_point``, each fold also fits a calibrator and
    chooses a threshold on its training patients only (see module docstring); ``pred`` is then the recalibrated
    probabilities (``raw_pred`` the head's own). ``explain``: ``none`` | ``default`` (attention from the
    prediction pass, modality weights, SHAP, integrated gradients of heads without bag inputs) | ``full`` (also
    integrated gradients through bags: per tile for bag heads; costly); ``True`` / ``False`` = default / none.
    ``scheduler``: None runs the folds here, one after another; ``"local"`` or a dask scheduler address runs
    them as dask tasks (a worker lost mid-fold is retried; the same seed gives the same numbers).
    ``fold_init``: a per-fold hook, ``fold_init(k, test_patient_ids, params)`` a context manager giving the fold's
    head parameters and a record for the audit (in-fold pretraining:
    :class:`~mmcli.heads.training.pretrain.FoldPretraining`); None: every fold gets ``params``."""
    if list(cohort.patients) != list(target.patients):
        raise ValueError("cohort and target must list the same patients in the same order")
    level = explain_level(explain)
    hp = run_params(head, target, seed, params)
    check_postprocess(target, calibrate, operating_point)
    splits = make_splits(target, folds, seed)
    grid = None
    if target.task == "survival":  # one evaluation grid shared by every fold
        grid = survival_grid(target.y["time"], target.y["event"], [te for _, te in splits])
    job = FoldJob(head, hp, target, grid, level, calibrate, operating_point, inner_folds, seed, fold_init)
    if scheduler is not None:
        return _on_dask(job, cohort, splits, scheduler, workers, log)
    results = []
    with fold_progress(len(splits), progress) as bar:
        for k, (tr, te) in enumerate(splits):
            with bar.fold(k) as on_epoch:
                res = job.run(cohort, k, tr, te, on_epoch)
            if log:
                log(f"fold {k + 1}/{folds}: {len(tr)} train / {len(te)} test patients, {res.seconds:.1f}s")
            results.append(res)
    return results


def explain_level(explain: bool | str) -> str:
    if isinstance(explain, bool):
        return "default" if explain else "none"
    if explain not in ("none", "default", "full"):
        raise ValueError(f"explain must be none | default | full, got {explain!r}")
    return explain


@dataclass
class FoldJob:
    """What every fold of one cross-validation does (picklable: a dask task carries it)."""

    head: str
    params: HeadParams
    target: Target
    grid: np.ndarray | None
    explain: str
    calibrate: str
    operating_point: OperatingPoint | None
    inner_folds: int
    seed: int
    fold_init: Any = None  # per-fold hook (see cross_validate)

    def run(self, cohort: Cohort, k: int, tr: np.ndarray, te: np.ndarray,
            on_epoch: Callable[[int, int], None] | None = None) -> FoldResult:
        """Fit fold ``k`` on ``tr``, predict ``te`` (with the explanations of :attr:`explain`)."""
        if self.fold_init is None:
            return self._run(cohort, k, tr, te, on_epoch, self.params)
        with self.fold_init(k, [self.target.patients[i] for i in te], self.params) as (params, record):
            res = self._run(cohort, k, tr, te, on_epoch, params)
        res.pretraining = record
        return res

    def _run(self, cohort: Cohort, k: int, tr: np.ndarray, te: np.ndarray,
             on_epoch: Callable[[int, int], None] | None, params: HeadParams) -> FoldResult:
        import time as _time

        fault("cv.fold")
        t0 = _time.perf_counter()
        target = self.target
        h = head_class(self.head)(params)
        h.on_epoch = on_epoch
        h.fit(cohort.subset(tr), target.y[tr])
        X_te = cohort.subset(te)
        attention = None
        if self.explain == "none":
            pred = h.predict(X_te)
        else:
            pred, attention = h.predict_explained(X_te)
        if not np.isfinite(pred).all():
            bad = [target.patients[te[i]] for i in np.flatnonzero(~np.isfinite(pred).reshape(len(te), -1).all(1))]
            raise InputError(f"fold {k + 1}: the {self.head} head gave non-finite predictions for {len(bad)} test "
                             f"patient(s) ({', '.join(bad[:5])}): their features hold values too large to "
                             "standardise (beyond the float32 range). Fix: check those patients' tables "
                             "(`mmcli store info`), re-ingest them, or leave them out.")
        raw_pred, calibrator, threshold = None, None, None
        if self.calibrate != "none" or self.operating_point is not None:
            tgt_tr = target.subset([target.patients[i] for i in tr])
            inner = inner_oof(self.head, cohort.subset(tr), tgt_tr, params, self.inner_folds, self.seed)
            calibrator = Calibrator(self.calibrate).fit(inner, tgt_tr.y, tgt_tr.patients)
            if self.operating_point is not None:
                threshold = choose_threshold(tgt_tr.y, calibrator.transform(inner)[:, 1], self.operating_point)
            raw_pred, pred = pred, calibrator.transform(pred)
        if target.task == "survival":
            y_tr, y_te = target.y[tr], target.y[te]
            ev = FoldPredictions(time=y_te["time"], event=y_te["event"], risk=pred,
                                 surv=h.predict_survival(X_te, self.grid, risk=pred), times=self.grid,
                                 train_time=y_tr["time"], train_event=y_tr["event"])
        elif target.task == "regression":
            ev = FoldPredictions(y=np.asarray(target.y[te], dtype=np.float64), value=np.asarray(pred, np.float64))
        else:
            ev = FoldPredictions(y=np.asarray(target.y[te]), probs=pred)
        fitted = {n: list(p.fitted_patients) for n, p in h.preprocessors_.items()}
        fitted.update({f"{n}/combat": list(p.harmoniser.fitted_patients) for n, p in h.preprocessors_.items()
                       if getattr(p, "harmoniser", None) is not None})  # batch correction: what it saw
        h.on_epoch = None
        res = FoldResult(k, tr, te, h, pred, ev, preprocessing_patients=fitted,
                         raw_pred=raw_pred, calibrator=calibrator, threshold=threshold)
        if self.explain != "none":
            res.attention = attention
            res.modality_weights = h.modality_weights(X_te)
            res.contributions = h.contributions(X_te)
            has_bags = any(s.kind == "bag" for s in h.spec_)
            if self.explain == "full" or not has_bags:
                res.attributions = h.attributions(X_te)
            if self.explain == "full":
                res.tile_attributions = h.tile_attributions(X_te)
        res.seconds = _time.perf_counter() - t0
        return res


def _fold_task(job: FoldJob, cohort: Cohort, k: int, tr: np.ndarray, te: np.ndarray) -> FoldResult:
    """A dask task: one fold, on the cohort as the worker reads it (bags from the store, under the budget)."""
    return job.run(cohort, k, tr, te)


def _on_dask(job: FoldJob, cohort: Cohort, splits: list[tuple[np.ndarray, np.ndarray]], scheduler: str,
             workers: int | None, log: Callable[[str], None] | None) -> list[FoldResult]:
    """Each fold as a dask task (retried twice when its worker dies); results in fold order."""
    from distributed import as_completed

    from mmcli.pipeline.scale import connect

    client, cluster = connect(scheduler, workers)
    try:
        # the cohort travels with each task (bags as store references, read in the worker): a scattered copy
        # would be lost with the worker that held it, and the fold could not be rerun elsewhere
        futures = {client.submit(_fold_task, job, cohort, k, tr, te, retries=2, pure=False,
                                 key=f"mmcli-fold-{k}-{uuid.uuid4().hex[:8]}"): k
                   for k, (tr, te) in enumerate(splits)}
        results: dict[int, FoldResult] = {}
        for fut in as_completed(futures):
            res = fut.result()
            results[futures[fut]] = res
            if log:
                log(f"fold {res.fold + 1}/{len(splits)}: {len(res.train_idx)} train / {len(res.test_idx)} test "
                    f"patients, {res.seconds:.1f}s (dask)")
        return [results[k] for k in range(len(splits))]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
