"""The headline interval: which one, how it is labelled, and the lean imports of the evidence modules."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mmcli.heads.evaluation.headline import headline_interval, headline_key, metric_lines
from mmcli.heads.evaluation.metrics import FoldPredictions, summarise


def _folds(k: int) -> list[FoldPredictions]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(k):
        y = rng.integers(0, 2, 40)
        p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 40), 0.01, 0.99)
        out.append(FoldPredictions(y=y, probs=np.c_[1 - p, p]))
    return out


def test_cross_validation_lines_lead_with_the_corrected_t_and_label_both():
    s = summarise(_folds(5), n_boot=50)
    lines = metric_lines(s)
    assert "mean of 5 folds" in lines[0] and lines[0].index("corrected t") < lines[0].index("bootstrap")
    auroc = next(line for line in lines if line.strip().startswith("auroc"))
    a = s["auroc"]
    t_pair = f"[{a['ci_t_low']:.3f}, {a['ci_t_high']:.3f}]"
    b_pair = f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
    assert f"{a['mean']:.3f}" in auroc and auroc.index(t_pair) < auroc.index(b_pair)
    assert "training and test variability" in lines[-2] and "under-covers" in lines[-1]


def test_one_evaluation_set_shows_the_bootstrap_as_what_it_is():
    s = summarise(_folds(1), n_boot=50)
    lines = metric_lines(s)
    assert "value" in lines[0] and "bootstrap over patients" in lines[0] and "corrected t" not in "".join(lines)
    assert "this model" in lines[-1]
    lo, hi, key = headline_interval(s["auroc"])
    assert key == "ci" and (lo, hi) == (s["auroc"]["ci_low"], s["auroc"]["ci_high"])


def test_runs_written_before_the_headline_key_get_the_same_rule():
    old_cv = {"mean": 0.8, "ci_low": 0.75, "ci_high": 0.85, "ci_t_low": 0.7, "ci_t_high": 0.9,
              "per_fold": [0.8, 0.78, 0.82]}
    assert headline_interval(old_cv) == (0.7, 0.9, "ci_t")
    older = {"mean": 0.8, "ci_low": 0.75, "ci_high": 0.85, "per_fold": [0.8, 0.78]}  # before the t-interval
    assert headline_key(older) == "ci"
    assert metric_lines({"auroc": {"mean": None, "ci_low": None, "ci_high": None, "per_fold": [None]}})[1].split()[1:] \
        == ["n/a", "[n/a,", "n/a]"]


def test_evidence_does_not_import_plotting_or_survival_libraries():
    """Issue 22: a table fit should not pay for dcurves / lifelines / statsmodels / matplotlib (imported only in
    the function that computes the evidence needing them)."""
    code = ("import sys; import mmcli.heads.evaluation.evidence, mmcli.heads.evaluation.stats, "
            "mmcli.heads.evaluation.headline; "
            "print(sorted(m for m in ('dcurves', 'lifelines', 'statsmodels', 'matplotlib', 'torch', 'sksurv', "
            "'fairlearn') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]", out.stdout
