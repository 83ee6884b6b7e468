"""The clinical evidence blocks of metrics.json, shared by ``fit`` (out-of-fold) and ``evaluate`` (external):
``calibration``, ``operating_point``, ``decision_curve`` and ``subgroups``; and the model's output policy
(:class:`Postprocess`: recalibration + decision threshold) saved beside the model as ``postprocess.json`` and
applied by ``predict`` and ``evaluate``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.heads.evaluation.calibration import Calibrator, calibration_report
from mmcli.heads.evaluation.decision_curve import decision_curve
from mmcli.heads.evaluation.metrics import FoldPredictions, weighted_classification_metrics
from mmcli.heads.evaluation.operating_point import OperatingPoint, threshold_metrics
from mmcli.heads.evaluation.options import EvidenceOptions
from mmcli.heads.evaluation.regression import weighted_regression_metrics
from mmcli.heads.evaluation.subgroups import subgroup_report
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_json

POSTPROCESS = "postprocess.json"


# ---- the model's output policy ----------------------------------------------------------------------------------
class Postprocess:
    """Recalibration and decision threshold applied to a head's probabilities (identity when neither is set)."""

    def __init__(self, calibrator: Calibrator | None = None, threshold: float | None = None,
                 operating_point: OperatingPoint | None = None, classes: Sequence[str] | None = None) -> None:
        self.calibrator = calibrator or Calibrator("none")
        self.threshold = threshold
        self.operating_point = operating_point
        self.classes = list(classes) if classes is not None else None

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        return self.calibrator.transform(probs)

    def decisions(self, probs: np.ndarray) -> list[str] | None:
        """``classes[1]`` where P(positive) >= threshold, else ``classes[0]`` (None without a threshold)."""
        if self.threshold is None:
            return None
        classes = self.classes or ["0", "1"]
        return [classes[1] if v >= self.threshold else classes[0] for v in np.asarray(probs)[:, 1]]

    def save(self, model_dir: Path) -> None:
        write_json(Path(model_dir) / POSTPROCESS, {
            "calibration": self.calibrator.to_json(), "threshold": self.threshold,
            "operating_point": self.operating_point.to_json() if self.operating_point else None,
            "classes": self.classes,
            "decision_rule": "positive (classes[1]) when P(classes[1]) after calibration >= threshold",
        })

    @classmethod
    def load(cls, model_dir: Path) -> Postprocess:
        f = Path(model_dir) / POSTPROCESS
        if not f.is_file():  # a model fitted without --calibrate / --operating-point, or before they existed
            return cls()
        try:
            doc = json.loads(f.read_text())
            op = doc.get("operating_point")
            return cls(Calibrator.from_json(doc.get("calibration") or {}), doc.get("threshold"),
                       OperatingPoint(op["kind"], float(op["target"])) if op else None, doc.get("classes"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{f}: cannot read the model's calibration / threshold ({e}). Fix: restore the file "
                             "written by `mmcli fit`, or refit the model.") from None


# ---- evidence blocks ----------------------------------------------------------------------------------------------
def classification_evidence(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, opts: EvidenceOptions,
                            thresholds: np.ndarray | None, patients: Sequence[str], labels: pd.DataFrame | None,
                            tables: dict[str, Any], n_boot: int, seed: int, raw_probs: np.ndarray | None = None,
                            what: str = "out-of-fold") -> dict[str, Any]:
    """``calibration`` (+ ``operating_point`` with per-patient ``thresholds``), ``decision_curve`` (binary) and
    ``subgroups`` for class codes ``y`` and the probabilities the model outputs."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    out: dict[str, Any] = {"calibration": calibration_report(y, probs, classes, method=opts.calibrate,
                                                             n_boot=n_boot, seed=seed)}
    if raw_probs is not None and opts.calibrate != "none":
        from sklearn.metrics import brier_score_loss

        ks = [1] if probs.shape[1] == 2 else range(probs.shape[1])
        out["calibration"]["brier_before_recalibration"] = float(np.mean(
            [brier_score_loss((y == k).astype(int), raw_probs[:, k]) for k in ks]))
    if thresholds is not None:
        out["operating_point"] = {"metrics": threshold_metrics(y, probs[:, 1], thresholds, n_boot=n_boot, seed=seed),
                                  "positive_class": str(classes[1]), "rule": "positive when P >= threshold"}
    if probs.shape[1] == 2:
        out["decision_curve"] = decision_curve(y, probs[:, 1], opts.thresholds(),
                                               what=f"P({classes[1]}), {what}", n_boot=n_boot, seed=seed)
    else:
        out["decision_curve"] = {"skipped": "decision curves are for binary outcomes (or survival at --horizon)"}
    specs = opts.subgroup_specs()
    if specs:
        def metric_fn(rows: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
            m = weighted_classification_metrics(y[rows], probs[rows], W)
            if thresholds is not None:
                call = probs[rows, 1] >= np.asarray(thresholds, dtype=float)[rows]
                pos = y[rows] == 1
                m["sensitivity"] = _share(W, call & pos, pos)
                m["specificity"] = _share(W, ~call & ~pos, ~pos)
            return m

        out["subgroups"] = subgroup_report(specs, patients, labels, tables, metric_fn, min_size=opts.min_subgroup,
                                           n_boot=n_boot, seed=seed, strata=y)
    return out


def survival_evidence(time: np.ndarray, event: np.ndarray, risk: np.ndarray, event_prob: np.ndarray | None, *,
                      opts: EvidenceOptions, patients: Sequence[str], labels: pd.DataFrame | None,
                      tables: dict[str, Any], n_boot: int, seed: int, what: str = "out-of-fold") -> dict[str, Any]:
    """``decision_curve`` at ``--horizon`` (event probability by then) and ``subgroups`` (Harrell's c-index)."""
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=int)
    risk = np.asarray(risk, dtype=np.float64)
    out: dict[str, Any] = {}
    if opts.horizon is None or event_prob is None:
        out["decision_curve"] = {"skipped": "survival decision curves need --horizon T (in the labels' time unit)"}
    else:
        out["decision_curve"] = decision_curve(event, event_prob, opts.thresholds(), time=time, horizon=opts.horizon,
                                               what=f"P(event by {opts.horizon:g}) = 1 - S({opts.horizon:g} | x), "
                                                    f"{what}", n_boot=n_boot, seed=seed)
    specs = opts.subgroup_specs()
    if specs:
        def metric_fn(rows: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
            fold = FoldPredictions(time=time[rows], event=event[rows], risk=risk[rows])  # Harrell's c, weighted
            return {"c_index": fold.replicate_metrics(W)["c_index"]}

        out["subgroups"] = subgroup_report(specs, patients, labels, tables, metric_fn, min_size=opts.min_subgroup,
                                           n_boot=n_boot, seed=seed, strata=event)
    return out


def _share(W: np.ndarray, hit: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Weighted share of ``hit`` among ``among`` per replicate of multiplicities ``W`` (B, n); NaN where none."""
    den = W @ among.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (W @ hit.astype(np.float64)) / np.where(den > 0, den, 1.0), np.nan)


def store_tables(fs: Any) -> dict[str, Any]:
    """``{table name: loader}`` of a store's tables (read only when a subgroup column is looked up)."""
    return {name: (lambda name=name: fs.read_table(name)) for name in fs.tables()}


def regression_evidence(y: np.ndarray, value: np.ndarray, *, opts: EvidenceOptions, patients: Sequence[str],
                        labels: pd.DataFrame | None, tables: dict[str, Any], n_boot: int, seed: int
                        ) -> dict[str, Any]:
    """``subgroups`` (r2, mae per group) for a regression; calibration, operating points and decision curves are
    for probabilities and say so."""
    y, value = np.asarray(y, dtype=np.float64), np.asarray(value, dtype=np.float64)
    out: dict[str, Any] = {"decision_curve": {"skipped": "decision curves are for probabilities (classification) "
                                                         "or survival at --horizon; this is a regression"}}
    specs = opts.subgroup_specs()
    if specs:
        def metric_fn(rows: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
            m = weighted_regression_metrics(y[rows], value[rows], W)
            return {"r2": m["r2"], "mae": m["mae"]}

        out["subgroups"] = subgroup_report(specs, patients, labels, tables, metric_fn, min_size=opts.min_subgroup,
                                           n_boot=n_boot, seed=seed)
    return out
