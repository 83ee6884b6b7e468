"""Regression targets (issue 26): a continuous value predicted in its own unit, its metrics equal to the
libraries', intervals that fail when wrong, a permuted target near zero, and a numeric target with many values
refused without --task."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mmcli.features.tabular import ingest_table
from mmcli.heads.evaluation.regression import regression_metrics, weighted_regression_metrics
from mmcli.heads.targets import build_target
from mmcli.pipeline.errors import InputError
from mmcli.stages.fit import fit
from mmcli.stages.predict import predict


@pytest.fixture(scope="module")
def table_store(tmp_path_factory):
    """120 patients, 8 columns; y = 2 x0 - x1 + 0.5 x2 + noise (sd 1), in 'mg/dl' around 100."""
    d = tmp_path_factory.mktemp("regression")
    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, 8))
    y = 100 + 10 * (2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2]) + 10 * rng.normal(size=n)
    ids = [f"P{i:03d}" for i in range(n)]
    pd.DataFrame(x, columns=[f"g{j}" for j in range(8)]).assign(patient_id=ids).to_csv(d / "genes.csv", index=False)
    ingest_table(d / "genes.csv", "genes", d / "s.zarr")
    labels = d / "labels.csv"
    pd.DataFrame({"patient_id": ids, "level": y, "shuffled": rng.permutation(y)}).to_csv(labels, index=False)
    return d, labels


def test_numeric_target_with_many_values_needs_task_regression(table_store):
    _, labels = table_store
    table = pd.read_csv(labels).set_index("patient_id")
    table.attrs["source"] = str(labels)
    with pytest.raises(InputError, match="--task regression"):
        build_target(table, target="level")
    t = build_target(table, target="level", task="regression")
    assert t.task == "regression" and t.y.dtype == np.float64 and t.classes is None
    assert len(np.unique(t.strata())) == 5  # quintiles: every fold sees the whole range


@pytest.mark.parametrize("head,params", [("xgboost", {"n_estimators": 60}), ("fusion_mlp", {"epochs": 60})])
def test_regression_fit_predicts_the_value_with_intervals(table_store, tmp_path, head, params):
    d, labels = table_store
    doc = fit(head, d / "s.zarr", labels, tmp_path / "run", target="level", task="regression", folds=5, n_boot=200,
              params=params)
    assert doc["task"] == "regression" and set(doc["metrics"]) == {"r2", "mae", "rmse", "pearson", "spearman"}
    for name, m in doc["metrics"].items():
        assert m["ci_low"] is not None and m["ci_t_low"] is not None, name
        assert m["ci_t_low"] <= m["mean"] <= m["ci_t_high"]
    assert doc["metrics"]["r2"]["mean"] > 0.4  # the planted linear signal (noise leaves at most ~0.86)
    assert 4 < doc["metrics"]["mae"]["mean"] < 15  # in the target's unit (mg/dl)
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert {"y_true", "y_pred", "fold"} <= set(pred.columns)
    per_fold = [regression_metrics(g.y_true, g.y_pred)["r2"] for _, g in pred.groupby("fold")]
    assert np.mean(per_fold) == pytest.approx(doc["metrics"]["r2"]["mean"], abs=1e-6)  # CSV: 8 digits
    out = predict(tmp_path / "run", d / "s.zarr", tmp_path / "p.csv")
    assert np.corrcoef(out["y_pred"], pd.read_csv(labels)["level"])[0, 1] > 0.7
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["target_scaler"]["scale"] > 5


def test_a_permuted_target_stays_near_zero(table_store, tmp_path):
    d, labels = table_store
    doc = fit("xgboost", d / "s.zarr", labels, tmp_path / "run", target="shuffled", task="regression", folds=5,
              n_boot=50, params={"n_estimators": 60})
    assert doc["metrics"]["r2"]["mean"] <= 0.05


def test_weighted_metrics_equal_the_libraries_on_resamples():
    rng = np.random.default_rng(3)
    y = np.round(rng.normal(size=40), 1)  # ties in y
    pred = y + rng.normal(scale=0.7, size=40)
    for _ in range(5):
        idx = rng.integers(0, 40, 40)
        W = np.bincount(idx, minlength=40)[None, :]
        got = {k: float(v[0]) for k, v in weighted_regression_metrics(y, pred, W).items()}
        want = regression_metrics(y[idx], pred[idx])
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


def test_attention_mil_regresses_on_bags():
    from mmcli.heads import create_head
    from mmcli.heads.data import Cohort, ModalityData, ModalitySpec

    rng = np.random.default_rng(1)
    n = 60
    value = rng.uniform(0, 10, n)
    bags = []
    for v in value:
        bag = rng.normal(size=(12, 4)).astype(np.float32)
        bag[:3, 0] += v / 3  # a few tiles carry the level
        bags.append(bag)
    cohort = Cohort([f"P{i}" for i in range(n)], {"wsi": ModalityData(
        ModalitySpec("wsi", "bag", "store", "e", 4), np.ones(n, bool), bags=bags, items=[[("s", 12)]] * n)})
    head = create_head("attention_mil", task="regression", n_classes=0, epochs=120, hidden=16, lr=3e-3)
    head.fit(cohort, value)
    got = head.predict(cohort)
    assert got.shape == (n,) and np.corrcoef(got, value)[0, 1] > 0.7
    assert abs(got.mean() - value.mean()) < 1.0  # in the target's unit, not standardised


def test_report_of_a_regression_run_leads_with_r2(table_store, tmp_path):
    from mmcli.stages.report import report

    d, labels = table_store
    doc = fit("xgboost", d / "s.zarr", labels, tmp_path / "run", target="level", task="regression", folds=3,
              n_boot=50, params={"n_estimators": 40})
    page = report(tmp_path / "run").read_text()
    head = page[page.index("class='headline'"):page.index("</div>", page.index("class='reading'"))]
    assert "R\u00b2" in head and f"{doc['metrics']['r2']['mean']:.3f}" in head
    assert "variance of level" in head and "above 0" in head  # the planted signal: interval above predicting the mean
    assert "predicted against observed" in page and "residuals against predicted" in page
    assert "No calibration" not in page and "No decision curve" not in page  # probability evidence does not apply
