"""Benchmark: in-fold ComBat on a synthetic cohort with a planted site effect (AUROC with / without, 95% CIs).

The cohort: ``--patients`` patients in 3 sites, a proteomics-like table of ``--features`` features where the
first 5 carry the label (+``--signal`` SD in cases) and every feature carries a site offset (``--shift`` SD)
and a site-specific scale. ``--confound c`` gives site C a case rate of 0.5 + c (A, B: 0.5 - c/2): with c > 0
the site itself predicts the label, which ComBat (not told the label, as it cannot be at test time) removes
along with the site effect, so expect a lower AUROC there; with c = 0 (default) the site effect is noise.
The same 5-fold split is fit with ``xgboost`` and ``fusion_mlp`` without and with ``--batch-correct combat
--batch-column site --batch-keep age`` (fit inside each training fold; the test patients' site comes from the
labels). Reported: out-of-fold AUROC of each, and the paired bootstrap difference (combat - uncorrected) with
its 95% CI and p.

    python benchmarks/bench_batch_correction.py --patients 300
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd


def planted(n: int, d: int, signal: float, shift: float, confound: float, seed: int
            ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    site = np.array(["A", "B", "C"])[rng.integers(0, 3, n)]
    y = (rng.random(n) < np.where(site == "C", 0.5 + confound, 0.5 - confound / 2)).astype(int)
    age = rng.normal(60, 10, n)
    offsets = {s: rng.normal(0, shift, d) for s in "ABC"}
    scales = {"A": 1.0, "B": 2.0, "C": 0.7}
    X = rng.normal(size=(n, d)) * np.array([scales[s] for s in site])[:, None]
    X += np.stack([offsets[s] for s in site]) + 0.03 * (age[:, None] - 60)
    X[:, :5] += signal * y[:, None]
    cov = pd.DataFrame({"site": site, "age": age}, index=pd.Index([f"P{i:04d}" for i in range(n)], name="patient_id"))
    return X, y, cov


def main() -> None:
    from cohorts import binary_target, table_cohort  # tests/heads helpers

    from mmcli.heads.evaluation.stats import auroc, auroc_bootstrap
    from mmcli.heads.training.cv import cross_validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--features", type=int, default=30)
    ap.add_argument("--signal", type=float, default=0.6)
    ap.add_argument("--shift", type=float, default=1.5)
    ap.add_argument("--confound", type=float, default=0.0, help="extra case rate of site C (0 = sites balanced)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--heads", default="xgboost,fusion_mlp")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    X, y, cov = planted(a.patients, a.features, a.signal, a.shift, a.confound, a.seed)
    pids = list(cov.index)
    cohort, target = table_cohort(X, pids, covariates=cov), binary_target(y, pids)
    out = {}
    for head in a.heads.split(","):
        base = {"n_estimators": 150} if head == "xgboost" else {"epochs": 40}
        probs = {}
        for label, extra in (("uncorrected", {}), ("combat", {"batch_correct": "combat", "batch_column": "site",
                                                              "batch_keep": ["age"]})):
            res = cross_validate(head, cohort, target, folds=a.folds, seed=a.seed, params={**base, **extra},
                                 explain=False)
            p = np.zeros(len(y))
            for r in res:
                p[r.test_idx] = r.pred[:, 1]
            probs[label] = p
        b = auroc_bootstrap(y, probs["combat"], probs["uncorrected"], n_boot=a.n_boot, seed=a.seed)
        out[head] = {"auroc_uncorrected": auroc(y, probs["uncorrected"]), "auroc_combat": auroc(y, probs["combat"]),
                     "difference": b.difference, "ci_low": b.ci_low, "ci_high": b.ci_high, "p": b.p_value}
        print(f"{head:10s} AUROC uncorrected {out[head]['auroc_uncorrected']:.3f}  combat "
              f"{out[head]['auroc_combat']:.3f}  diff {b.difference:+.3f} [{b.ci_low:+.3f}, {b.ci_high:+.3f}] "
              f"p={b.p_value:.3f}")
    print(json.dumps({"args": vars(a), "results": out}, indent=2))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "heads"))
    main()
