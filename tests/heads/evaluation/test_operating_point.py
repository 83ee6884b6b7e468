"""Operating points: parsing, the threshold rule, nested choice on training folds, bootstrap metrics."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from helpers.perturb import hold_splits
from helpers.planted_data import make_store
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.evaluation.operating_point import (
    OperatingPoint,
    choose_threshold,
    parse_operating_point,
    threshold_metrics,
)
from mmcli.heads.targets import build_target
from mmcli.heads.training.cv import cross_validate, inner_oof, make_splits, run_params
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store


def test_parse():
    assert parse_operating_point("sens=0.9") == OperatingPoint("sens", 0.9)
    assert parse_operating_point("specificity=0.95") == OperatingPoint("spec", 0.95)
    assert parse_operating_point(None) is None
    for bad in ("sens", "sens=1.2", "ppv=0.9", "spec=x"):
        with pytest.raises(InputError, match="--operating-point"):
            parse_operating_point(bad)


def test_threshold_rule_on_a_small_hand_case():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # sens >= 0.75 needs 3 of 4 positives: the highest such threshold is 0.7 (specificity 1.0)
    assert choose_threshold(y, p, OperatingPoint("sens", 0.75)) == 0.7
    # sens = 1 needs the lowest positive 0.4
    assert choose_threshold(y, p, OperatingPoint("sens", 1.0 - 1e-9)) == 0.4
    # spec >= 0.75: the lowest threshold calling at most 1 of 4 negatives positive: 0.4 (fp = 0.6 only)
    assert choose_threshold(y, p, OperatingPoint("spec", 0.75)) == 0.4
    m = threshold_metrics(y, p, 0.4, n_boot=50)
    assert m["counts"] == {"tp": 4, "fp": 1, "tn": 3, "fn": 0}
    assert m["sensitivity"]["value"] == 1.0 and m["specificity"]["value"] == 0.75
    assert m["ppv"]["value"] == 0.8 and m["npv"]["value"] == 1.0


def test_threshold_from_training_data_reaches_the_target_on_held_out_data():
    rng = np.random.default_rng(0)
    n = 20000
    y = rng.integers(0, 2, n)
    score = rng.normal(1.2 * y, 1.0)
    p = 1 / (1 + np.exp(-score))
    train, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    for op in (OperatingPoint("sens", 0.9), OperatingPoint("spec", 0.8)):
        t = choose_threshold(y[train], p[train], op)
        m = threshold_metrics(y[test], p[test], t, n_boot=100)
        achieved = m["sensitivity" if op.kind == "sens" else "specificity"]
        assert abs(achieved["value"] - op.target) < 0.02
        assert achieved["ci_low"] < achieved["value"] < achieved["ci_high"]


def test_fold_thresholds_are_chosen_on_the_training_fold_only(tmp_path, monkeypatch):
    """Each fold's threshold equals the one recomputed from its training patients alone; and (perturbation,
    issue 24 item 9) flipping the labels of one fold's test patients leaves that fold's threshold unchanged while
    some other fold's, chosen on those patients, moves."""
    p = make_store(tmp_path / "s.zarr", n=36, task="binary", seed=6)
    fs = open_store(p.store, "r")
    tgt = build_target(p.labels, target="label")
    cohort = load_cohort(fs, resolve_sources(fs, ["genes", "mri"]), tgt.patients)
    params = {"n_estimators": 15}
    op = OperatingPoint("sens", 0.9)
    splits = make_splits(tgt, 3, 0)
    hold_splits(monkeypatch, tgt.patients, splits)

    def run(tgt):
        return cross_validate("xgboost", cohort, tgt, folds=3, seed=0, params=params, explain=False,
                              operating_point=op, inner_folds=3)

    results = run(tgt)
    hp = run_params("xgboost", tgt, 0, params)
    for r in results:
        sub = tgt.subset([tgt.patients[i] for i in r.train_idx])
        inner = inner_oof("xgboost", cohort.subset(r.train_idx), sub, hp, 3, 0)
        assert r.threshold == choose_threshold(sub.y, inner[:, 1], op)
    for k, (_, te) in enumerate(splits):
        y2 = tgt.y.copy()
        y2[te] = 1 - y2[te]
        again = run(replace(tgt, y=y2))
        assert again[k].threshold == results[k].threshold, k
        assert any(again[j].threshold != results[j].threshold for j in range(3) if j != k)


def test_operating_point_needs_a_binary_task(tmp_path):
    p = make_store(tmp_path / "s.zarr", n=30, task="multiclass", seed=1)
    fs = open_store(p.store, "r")
    tgt = build_target(p.labels, target="label")
    cohort = load_cohort(fs, resolve_sources(fs, ["genes"]), tgt.patients)
    with pytest.raises(InputError, match="needs a binary target"):
        cross_validate("xgboost", cohort, tgt, folds=3, operating_point=OperatingPoint("sens", 0.9))


def test_operating_point_intervals_follow_the_one_validity_rule():
    """Issue 24 item 6: with 2 positives among 50, ~13% of resamples have no positive, so sensitivity has too few
    valid resamples: null interval, n_valid reported (as metrics.summarise does)."""
    from mmcli.heads.evaluation.bootstrap import MIN_VALID_SHARE

    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.3, 50)
    y = np.r_[np.ones(2, int), np.zeros(48, int)]
    m = threshold_metrics(y, p, 0.1, n_boot=400, seed=0)
    sens = m["sensitivity"]
    assert sens["value"] is not None and 0 < sens["n_valid"] < MIN_VALID_SHARE * 400
    assert (sens["ci_low"], sens["ci_high"]) == (None, None)
    spec = m["specificity"]  # 48 negatives: every resample has some
    assert spec["n_valid"] == 400 and spec["ci_low"] < spec["value"] < spec["ci_high"]
