"""The intervals of a real run's metrics.json recomputed independently (issue 24 item 9): the helper that
replaces ``ci_low <= ci_high`` checks in the fit / evaluate tests passes on what fit writes and fails for an
interval half as wide. Also what ``mmcli fit`` prints (issue 24 item 3, issue 29 item 13)."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from helpers.intervals import assert_run_intervals
from helpers.planted_data import make_store
from mmcli.cli import app as cli_app
from mmcli.stages.fit import fit


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit_intervals")
    out = {}
    for task, n in (("binary", 60), ("multiclass", 60)):
        p = make_store(d / f"{task}.zarr", n=n, task=task, seed=5, modalities=("genes",))
        p.labels.reset_index().to_csv(d / f"{task}.csv", index=False)
        fit("xgboost", p.store, d / f"{task}.csv", d / task, target="label", folds=3, seed=2, n_boot=40,
            params={"n_estimators": 5})
        out[task] = (p, d / f"{task}.csv", d / task)
    return out


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_fit_intervals_recompute_independently(runs, task):
    assert_run_intervals(runs[task][2], n_boot=40, seed=2)


def test_the_helper_fails_for_an_interval_half_as_wide(runs, tmp_path):
    for key in ("ci", "ci_t"):
        bad = tmp_path / key
        shutil.copytree(runs["binary"][2], bad)
        doc = json.loads((bad / "metrics.json").read_text())
        m = doc["metrics"]["auroc"]
        lo, hi = m[f"{key}_low"], m[f"{key}_high"]
        mid, quarter = (lo + hi) / 2, (hi - lo) / 4
        m[f"{key}_low"], m[f"{key}_high"] = mid - quarter, mid + quarter
        (bad / "metrics.json").write_text(json.dumps(doc))
        with pytest.raises(AssertionError):
            assert_run_intervals(bad, n_boot=40, seed=2)


def test_fit_prints_the_fold_mean_and_both_intervals_labelled(runs, tmp_path):
    p, labels, _ = runs["binary"]
    res = CliRunner().invoke(cli_app, ["fit", "--head", "xgboost", "--store", str(p.store), "--labels", str(labels),
                                       "--target", "label", "--out", str(tmp_path / "run"), "--folds", "3",
                                       "--n-boot", "20", "--param", "n_estimators=5"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["auroc"]
    lines = res.output.splitlines()
    header = next(line for line in lines if "mean of 3 folds" in line)
    assert header.index("95% CI: corrected t over folds") < header.index("95% CI: bootstrap, models fixed")
    row = next(line for line in lines if line.strip().startswith("auroc"))
    assert f"{m['mean']:.3f}" in row and row.index(f"[{m['ci_t_low']:.3f}, {m['ci_t_high']:.3f}]") < row.index(
        f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
    assert any("covers training and test variability" in line for line in lines)
    assert any("decision curve: beats treat-all and treat-none" in line for line in lines)


def test_evaluate_intervals_recompute_independently(runs, tmp_path):
    from mmcli.stages.evaluate import evaluate

    p, labels, run = runs["binary"]
    evaluate(run, p.store, labels, tmp_path / "ev", n_boot=30, seed=4, n_permutations=9, allow_overlap=True)
    assert_run_intervals(tmp_path / "ev", n_boot=30, seed=4)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]["auroc"]
    assert m["headline"] == "ci" and m["ci_t_low"] is None
