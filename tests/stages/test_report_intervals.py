"""The report shows the headline interval first, labelled for what it covers (issue 24 item 3), says when an
interval is null under the bootstrap's validity rule (item 6), and gives the decision curve's claim with its
uncertainty (item 8)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.fake_runs import classification_run
from mmcli.heads.evaluation.decision_curve import decision_curve
from mmcli.heads.evaluation.metrics import FoldPredictions, summarise
from mmcli.stages.report import report


def _with_real_metrics(run: Path) -> tuple[dict, dict]:
    """Replace the hand-written metrics of a fake run by what fit writes: summarise over its folds and a decision
    curve with resamples."""
    pred = pd.read_csv(run / "predictions.csv")
    y = (pred["y_true"] == "pos").to_numpy(int)
    p = pred["prob_pos"].to_numpy(float)
    folds = [FoldPredictions(y=y[pred["fold"] == f], probs=np.c_[1 - p, p][pred["fold"] == f])
             for f in sorted(pred["fold"].unique())]
    doc = json.loads((run / "metrics.json").read_text())
    doc["metrics"] = summarise(folds, n_boot=200, seed=0)
    doc["decision_curve"] = decision_curve(y, p, np.arange(0.05, 0.96, 0.05), n_boot=200, seed=0, what="P(pos)")
    (run / "metrics.json").write_text(json.dumps(doc))
    return doc["metrics"], doc["decision_curve"]


def test_metrics_table_leads_with_the_headline_interval_and_says_what_each_covers(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run", signal=1.5)
    metrics, dc = _with_real_metrics(run)
    text = html.unescape(report(run).read_text())
    head = text.index("95% CI: corrected t over folds")
    assert head < text.index("95% CI: bootstrap, models fixed") and "mean of 5 folds" in text
    a = metrics["auroc"]
    row = text[text.index("<td>auroc</td>"):]
    row = row[:row.index("</tr>")]
    assert row.index(f"[{a['ci_t_low']:.3f}, {a['ci_t_high']:.3f}]") < row.index(f"[{a['ci_low']:.3f}, "
                                                                                  f"{a['ci_high']:.3f}]")
    assert "covers training and test variability" in text and "test variability only" in text
    ranges = dc["model_beats_both_ranges"]
    assert ranges, "a model with signal 1.5 beats both somewhere"
    where = ", ".join(f"{r['from']:g}–{r['to']:g}" for r in ranges)
    assert f"pointwise 95% CI of the net-benefit difference above 0, at: <b>{where}</b>" in text
    assert "model − best of the two [95% CI]" in text


def test_null_intervals_are_explained_not_shown_as_numbers(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run")
    doc = json.loads((run / "metrics.json").read_text())
    doc["calibration"] = {"method": "none", "what": "out-of-fold", "classes": {"pos": {
        "intercept": {"value": 0.1, "ci_low": None, "ci_high": None, "n_valid": 170},
        "slope": {"value": 0.9, "ci_low": 0.7, "ci_high": 1.1, "n_valid": 200},
        "brier": 0.2, "mean_predicted": 0.5, "observed_rate": 0.5, "n": 120, "reliability": {}}}}
    (run / "metrics.json").write_text(json.dumps(doc))
    text = html.unescape(report(run).read_text())
    assert "0.100 [no CI: 170 valid resamples, under 95%]" in text and "0.900 [0.700, 1.100]" in text
