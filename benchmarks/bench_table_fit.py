"""A table fit's cost against the same work in a plain script (issue 22): `mmcli fit --head xgboost` on scikit-learn's
breast-cancer table (569 patients x 30 columns, bundled with scikit-learn) against xgboost + scikit-learn alone.

The plain script does what the fit's numbers need: read the table and the labels, the same 5 patient-level folds
(StratifiedGroupKFold, the same seed), an XGBClassifier with mmcli's xgboost defaults per fold, the out-of-fold
AUROC, 50 stratified bootstrap resamples of it, and a refit on all patients. `mmcli fit` does that plus its
defaults (the fold metrics and their intervals, calibration, decision curve, SHAP, the run folder). Each runs
as its own process under ``/usr/bin/time`` (wall time and peak RSS), alternating, ``--rounds`` times; the
ratios are of the medians.

    python benchmarks/bench_table_fit.py                 # 3 rounds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

PLAIN = r'''
import sys, time, numpy as np, pandas as pd, xgboost as xgb
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.metrics import roc_auc_score
table, labels, seed, n_boot = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
X = pd.read_csv(table).set_index("patient_id").sort_index()
y = pd.read_csv(labels).set_index("patient_id").loc[X.index, "label"].to_numpy()
params = dict(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8, colsample_bytree=0.5,
              min_child_weight=1.0, reg_lambda=1.0, n_jobs=1, random_state=seed, tree_method="hist",
              eval_metric="logloss")
w = np.where(y == 1, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
oof = np.zeros(len(y))
for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(X, y, X.index):
    m = xgb.XGBClassifier(**params).fit(X.iloc[tr], y[tr], sample_weight=w[tr])
    oof[te] = m.predict_proba(X.iloc[te])[:, 1]
auc = roc_auc_score(y, oof)
rng = np.random.default_rng(seed)
pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
boots = [roc_auc_score(y[i], oof[i]) for i in (np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
                                              for _ in range(n_boot))]
xgb.XGBClassifier(**params).fit(X, y, sample_weight=w)
print(auc, np.percentile(boots, [2.5, 97.5]))
'''


def timed(cmd: list[str], folder: Path, name: str) -> tuple[float, int]:
    rss = folder / f"{name}.rss"
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return wall, int(rss.read_text().split()[-1]) * 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from sklearn.datasets import load_breast_cancer

    work = Path(tempfile.mkdtemp(prefix="mmcli-tablefit-"))
    data = load_breast_cancer(as_frame=True)
    ids = [f"P{i:04d}" for i in range(len(data.frame))]
    data.data.assign(patient_id=ids).to_csv(work / "table.csv", index=False)
    pd.DataFrame({"patient_id": ids, "label": data.target}).to_csv(work / "labels.csv", index=False)
    subprocess.run([sys.executable, "-m", "mmcli.cli", "extract", "--modality", "tabular", "--table",
                    str(work / "table.csv"), "--name", "clinical", "--store", str(work / "s.zarr")], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    (work / "plain.py").write_text(PLAIN)
    plain = [sys.executable, str(work / "plain.py"), str(work / "table.csv"), str(work / "labels.csv"),
             str(args.seed), str(args.n_boot)]
    fit = [sys.executable, "-m", "mmcli.cli", "fit", "--head", "xgboost", "--store", str(work / "s.zarr"),
           "--labels", str(work / "labels.csv"), "--target", "label", "--folds", "5", "--n-boot", str(args.n_boot),
           "--seed", str(args.seed), "--out", str(work / "run"), "--overwrite", "--no-progress"]
    runs: dict[str, list[tuple[float, int]]] = {"plain": [], "fit": []}
    for _ in range(args.rounds):
        runs["plain"].append(timed(plain, work, "plain"))
        runs["fit"].append(timed(fit, work, "fit"))
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    out = {"rounds": args.rounds, "n_boot": args.n_boot, "cpu": os.cpu_count(),
           "plain_seconds": round(med["plain"][0], 2), "fit_seconds": round(med["fit"][0], 2),
           "time_ratio": round(med["fit"][0] / med["plain"][0], 3),
           "plain_peak_rss_mb": med["plain"][1] >> 20, "fit_peak_rss_mb": med["fit"][1] >> 20,
           "memory_ratio": round(med["fit"][1] / med["plain"][1], 3),
           "fit_auroc_fold_mean": round(metrics["metrics"]["auroc"]["mean"], 4),
           "rounds_seconds": {k: [round(t, 2) for t, _ in v] for k, v in runs.items()}}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
