"""Subgroups: parsing, binning, too-small groups reported, gaps, stratified resampling and the validity rule."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmcli.heads.evaluation.bootstrap import MIN_VALID_SHARE
from mmcli.heads.evaluation.metrics import classification_metrics, weighted_classification_metrics
from mmcli.heads.evaluation.subgroups import (
    SubgroupSpec,
    assign_groups,
    parse_subgroups,
    subgroup_metrics,
    subgroup_report,
)
from mmcli.pipeline.errors import InputError


def test_parse():
    assert parse_subgroups("age:edges=40,60,site") == [SubgroupSpec("age", (40.0, 60.0)), SubgroupSpec("site")]
    assert parse_subgroups(None) == []
    for bad in ("age:bins=3", "age,age", "age:edges=60,40", ":x"):
        with pytest.raises(InputError, match="--subgroups"):
            parse_subgroups(bad)


def test_binning_numeric_categorical_and_missing():
    ages = pd.Series([30, 45, 50, 61, 70, np.nan, 55, 41])
    groups, how = assign_groups(ages, SubgroupSpec("age", (40.0, 60.0)))
    assert list(groups) == ["< 40", "[40, 60)", "[40, 60)", ">= 60", ">= 60", "missing", "[40, 60)", "[40, 60)"]
    assert how["edges"] == [40.0, 60.0] and how["kind"] == "numeric"
    g, how = assign_groups(pd.Series(np.arange(100.0)), SubgroupSpec("x"))
    assert how["binning"].startswith("quartiles") and len(set(g)) == 4
    g, how = assign_groups(pd.Series([0.0, 1.0, 1.0, np.nan]), SubgroupSpec("er"))
    assert how["kind"] == "categorical" and list(g) == ["0", "1", "1", "missing"]


def test_small_groups_are_reported_not_hidden_and_gaps_are_group_minus_overall():
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    probs = np.c_[1 - p1, p1]
    site = np.array(["A"] * 70 + ["B"] * 45 + ["C"] * 5)
    labels = pd.DataFrame({"site": site}, index=[f"P{i}" for i in range(n)])
    rep = subgroup_report([SubgroupSpec("site")], list(labels.index), labels, {},
                          lambda r, W: weighted_classification_metrics(y[r], probs[r], W), min_size=10, n_boot=60,
                          strata=y)
    col = rep["columns"]["site"]
    assert col["source"] == "labels"
    by = {g["group"]: g for g in col["groups"]}
    assert by["C"] == {"group": "C", "n": 5, "too_small": True, "note": "fewer than 10 patients: no metrics"}
    for name in ("A", "B"):
        rows = np.flatnonzero(site == name)
        want = classification_metrics(y[rows], probs[rows])
        for m, v in by[name]["metrics"].items():
            assert v["value"] == pytest.approx(want[m])
            assert v["gap"] == pytest.approx(want[m] - col["overall"][m])
            assert v["n_valid"] == 60 and v["ci_low"] < v["ci_high"]


def test_column_from_a_store_table_and_unknown_column():
    table = pd.DataFrame({"age": [30, 50, 70]}, index=pd.Index(["a", "b", "c"], name="patient_id"))
    rep = subgroup_report([SubgroupSpec("age", (40.0,))], ["a", "b", "c"], pd.DataFrame(index=["a", "b", "c"]),
                          {"clinical": lambda: table}, lambda r, W: {"n": W.sum(1)}, min_size=1, n_boot=5)
    assert rep["columns"]["age"]["source"] == "store table 'clinical'"
    with pytest.raises(InputError, match="no column 'bmi'"):
        subgroup_report([SubgroupSpec("bmi")], ["a"], None, {}, lambda r, W: {}, n_boot=1)


def _rare_positive_group(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cohort whose group "B" (40 patients) holds 3 positives: plain resampling leaves it without a positive
    in about 5% of the replicates (Poisson(3) = 0), the degenerate case of issue 24 item 6."""
    rng = np.random.default_rng(seed)
    group = np.array(["A"] * 160 + ["B"] * 40, dtype=object)
    y = np.r_[rng.permutation(np.r_[np.ones(80, int), np.zeros(80, int)]), np.r_[np.ones(3, int), np.zeros(37, int)]]
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, len(y)), 0.01, 0.99)
    return group, y, np.c_[1 - p1, p1]


def test_subgroup_interval_follows_the_validity_rule_and_stratifying_makes_it_evaluable():
    group, y, probs = _rare_positive_group()

    def fn(r: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
        return weighted_classification_metrics(y[r], probs[r], W)

    plain = subgroup_metrics(group, fn, n_boot=400, seed=1)
    b = {g["group"]: g for g in plain["groups"]}["B"]["metrics"]["auroc"]
    assert b["value"] is not None and 0 < b["n_valid"] < MIN_VALID_SHARE * 400
    assert (b["ci_low"], b["ci_high"]) == (None, None)  # null, as metrics.summarise would make it
    assert b["gap_n_valid"] == b["n_valid"] and b["gap_ci_low"] is None
    strat = subgroup_metrics(group, fn, n_boot=400, seed=1, strata=y)
    b = {g["group"]: g for g in strat["groups"]}["B"]["metrics"]["auroc"]
    assert b["n_valid"] == 400 and b["ci_low"] < b["value"] < b["ci_high"]


def test_stratified_resampling_keeps_every_group_class_cell_size():
    group, y, probs = _rare_positive_group(1)
    seen: list[np.ndarray] = []

    def fn(r: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(np.stack([W @ (y[r] == 1), W @ (y[r] == 0)], axis=1))
        return {"n": W.sum(1)}

    subgroup_metrics(group, fn, n_boot=50, seed=0, strata=y)
    boot = [s for s in seen if len(s) == 50]  # the resampled calls: overall, A, B
    want = [(83, 117), (80, 80), (3, 37)]
    assert sorted(tuple(s[0]) for s in boot) == sorted(want)
    for s in boot:
        assert (s == s[0]).all()  # the same counts in every replicate
