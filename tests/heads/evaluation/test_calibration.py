"""Calibration: intercept / slope against known answers and scikit-learn; calibrators fitted in-fold only (a fold's
calibrator does not change when only its test patients do)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from helpers.perturb import hold_splits
from helpers.planted_data import make_store
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.evaluation.calibration import (
    Calibrator,
    binary_calibration,
    calibration_report,
    expit,
    intercept_slope,
    logit,
)
from mmcli.heads.targets import build_target
from mmcli.heads.training.cv import cross_validate, make_splits
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store


def _simulate(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = expit(rng.normal(0, 1.5, n))
    return (rng.uniform(size=n) < p).astype(int), p


def test_perfect_calibration_gives_slope_one_intercept_zero():
    y, p = _simulate(20000)
    res = binary_calibration(y, p, n_boot=200, seed=1)
    assert abs(res["slope"]["value"] - 1) < 0.05 and abs(res["intercept"]["value"]) < 0.05
    assert res["slope"]["ci_low"] <= 1 <= res["slope"]["ci_high"]
    assert res["intercept"]["ci_low"] <= 0 <= res["intercept"]["ci_high"]
    assert res["slope"]["n_valid"] == 200


def test_overconfident_and_shifted_predictions_are_caught():
    y, p = _simulate(20000)
    too_extreme = expit(2 * logit(p))  # true slope 1/2
    _, b = intercept_slope(y, too_extreme)
    assert abs(b - 0.5) < 0.03
    under = expit(logit(p) - 1.0)  # predicts too low: intercept ~ +1 (slope fixed at 1)
    a, b = intercept_slope(y, under)
    assert 0.85 < a < 1.15 and abs(b - 1) < 0.05


def test_slope_matches_scikit_learn_unpenalised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    y, p = _simulate(400, seed=3)
    q = expit(1.7 * logit(p) + 0.3)
    _, b = intercept_slope(y, q)
    ref = LogisticRegression(C=np.inf, max_iter=5000, tol=1e-10).fit(logit(q)[:, None], y).coef_[0, 0]
    assert b == pytest.approx(ref, rel=1e-4)


def test_one_class_and_multiclass_report():
    a, b = intercept_slope(np.ones(10, dtype=int), np.full(10, 0.7))
    assert np.isnan(a) and np.isnan(b)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 300)
    y = np.array([rng.choice(3, p=row) for row in probs])
    rep = calibration_report(y, probs, ["a", "b", "c"], n_boot=50)
    assert set(rep["classes"]) == {"a", "b", "c"}  # one-vs-rest per class
    for c in rep["classes"].values():
        assert c["reliability"]["n"] and sum(c["reliability"]["n"]) == 300


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibrator_fixes_miscalibration_and_round_trips_json(method):
    y, p = _simulate(4000, seed=5)
    bad = expit(2.5 * logit(p) - 1.0)
    probs = np.c_[1 - bad, bad]
    cal = Calibrator(method).fit(probs[:2000], y[:2000], [f"P{i}" for i in range(2000)])
    fixed = cal.transform(probs[2000:])
    _, b_before = intercept_slope(y[2000:], bad[2000:])
    a_after, b_after = intercept_slope(y[2000:], fixed[:, 1])
    # isotonic's flat end steps (p = 0 or 1 on the held-out half) pull its slope down a little more than Platt's
    tol = 0.15 if method == "platt" else 0.25
    assert abs(b_before - 0.4) < 0.1 and abs(b_after - 1) < tol and abs(a_after) < 0.15
    np.testing.assert_allclose(fixed.sum(axis=1), 1.0)
    again = Calibrator.from_json(cal.to_json()).transform(probs[2000:])
    np.testing.assert_allclose(again, fixed)
    assert len(cal.fitted_patients) == 2000


def test_multiclass_calibrator_rows_sum_to_one_and_bad_method_is_input_error():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), 200)
    y = rng.integers(0, 3, 200)
    out = Calibrator("isotonic").fit(probs, y).transform(probs)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    with pytest.raises(InputError, match="--calibrate 'sigmoid'"):
        Calibrator("sigmoid")


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibrator_of_a_fold_is_unchanged_when_only_its_test_patients_change(tmp_path, monkeypatch, method):
    """Perturbation (issue 24 item 9): flip the labels and replace the features of one fold's test patients; that
    fold's calibrator (its saved maps) must be identical, while the other folds' calibrators, fitted on those
    patients' inner out-of-fold probabilities, change."""
    p = make_store(tmp_path / "s.zarr", n=36, task="binary", seed=4)
    fs = open_store(p.store, "r")
    tgt = build_target(p.labels, target="label")
    cohort = load_cohort(fs, resolve_sources(fs, ["genes", "mri"]), tgt.patients)
    splits = make_splits(tgt, 3, 0)
    hold_splits(monkeypatch, tgt.patients, splits)

    def run(cohort, tgt):
        return cross_validate("xgboost", cohort, tgt, folds=3, seed=0, params={"n_estimators": 15},
                              explain=False, calibrate=method, inner_folds=3)

    base = run(cohort, tgt)
    for r in base:
        np.testing.assert_allclose(r.pred, r.calibrator.transform(r.raw_pred))
        assert not np.allclose(r.pred, r.raw_pred)
    for k, (_, te) in enumerate(splits):
        rng = np.random.default_rng(k)
        y2 = tgt.y.copy()
        y2[te] = 1 - y2[te]
        cohort2 = cohort.subset(np.arange(len(cohort)))
        for m in cohort2.modalities.values():
            m.vectors = m.vectors.copy()
            m.vectors[te] = rng.normal(0, 3, m.vectors[te].shape)
        again = run(cohort2, replace(tgt, y=y2))
        assert again[k].calibrator.to_json() == base[k].calibrator.to_json(), k
        assert any(again[j].calibrator.to_json() != base[j].calibrator.to_json() for j in range(3) if j != k)


def test_calibration_intervals_follow_the_one_validity_rule():
    """Issue 24 item 6: 2 positives among 50 leave ~13% of plain resamples with one class; the slope and
    intercept intervals are then null (as metrics.summarise nulls its own), with n_valid reported."""
    from mmcli.heads.evaluation.bootstrap import MIN_VALID_SHARE

    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.3, 50)
    res = binary_calibration(np.r_[np.ones(2, int), np.zeros(48, int)], p, n_boot=400, seed=0)
    for key in ("slope", "intercept"):
        assert res[key]["value"] is not None and 0 < res[key]["n_valid"] < MIN_VALID_SHARE * 400, key
        assert (res[key]["ci_low"], res[key]["ci_high"]) == (None, None), key
    ok = binary_calibration(np.r_[np.ones(15, int), np.zeros(35, int)], p, n_boot=400, seed=0)
    assert all(ok[k]["n_valid"] == 400 and ok[k]["ci_low"] < ok[k]["ci_high"] for k in ("slope", "intercept"))
