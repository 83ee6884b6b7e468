"""Subgroups: parsing, binning, too-small groups reported, gaps, and the fast metrics equal scikit-learn's."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmcli.heads.evaluation.metrics import classification_metrics
from mmcli.heads.evaluation.subgroups import (
    SubgroupSpec,
    assign_groups,
    fast_classification_metrics,
    parse_subgroups,
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


@pytest.mark.parametrize("k", [2, 3])
def test_fast_metrics_equal_scikit_learn(k):
    rng = np.random.default_rng(k)
    for n in (6, 25, 200):
        y = rng.integers(0, k, n)
        p = rng.dirichlet(np.ones(k), n).round(1) + 1e-9
        p /= p.sum(axis=1, keepdims=True)
        fast, ref = fast_classification_metrics(y, p), classification_metrics(y, p)
        for m in ref:
            assert fast[m] == pytest.approx(ref[m], abs=1e-12, nan_ok=True), m


def test_small_groups_are_reported_not_hidden_and_gaps_are_group_minus_overall():
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    probs = np.c_[1 - p1, p1]
    site = np.array(["A"] * 70 + ["B"] * 45 + ["C"] * 5)
    labels = pd.DataFrame({"site": site}, index=[f"P{i}" for i in range(n)])
    rep = subgroup_report([SubgroupSpec("site")], list(labels.index), labels, {},
                          lambda r: fast_classification_metrics(y[r], probs[r]), min_size=10, n_boot=60)
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
            assert v["ci_low"] <= v["value"] <= v["ci_high"]


def test_column_from_a_store_table_and_unknown_column():
    table = pd.DataFrame({"age": [30, 50, 70]}, index=pd.Index(["a", "b", "c"], name="patient_id"))
    rep = subgroup_report([SubgroupSpec("age", (40.0,))], ["a", "b", "c"], pd.DataFrame(index=["a", "b", "c"]),
                          {"clinical": lambda: table}, lambda r: {"n": float(len(r))}, min_size=1, n_boot=5)
    assert rep["columns"]["age"]["source"] == "store table 'clinical'"
    with pytest.raises(InputError, match="no column 'bmi'"):
        subgroup_report([SubgroupSpec("bmi")], ["a"], None, {}, lambda r: {}, n_boot=1)
