"""Regression defaults against standard baselines on public clinical tables, side by side on the same folds
(issue 26).

Tables (bundled with the libraries, no download): scikit-learn's diabetes (442 patients x 10 columns, target:
disease progression after one year) and scikit-survival's FLCHAIN (7,874 patients; creatinine, mg/dl, from age,
sex, kappa and lambda free light chains, MGUS; rows with a missing creatinine dropped).

For each table: ``mmcli fit --task regression`` with ``xgboost`` and ``fusion_mlp`` at their defaults (5-fold
patient-level CV), then on the same folds (the run's ``folds.json``): OLS, ridge (RidgeCV), scikit-learn's
gradient boosting (defaults) and xgboost's library defaults (``XGBRegressor()``), each the mean over folds of
the fold's R^2. Also each mmcli head on a permuted target (its R^2 should stay near 0).

    python benchmarks/bench_regression.py            # both tables
    python benchmarks/bench_regression.py --tables diabetes
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


def tables(names: list[str]) -> dict[str, tuple[pd.DataFrame, np.ndarray, str]]:
    out = {}
    if "diabetes" in names:
        from sklearn.datasets import load_diabetes

        d = load_diabetes(as_frame=True)
        out["diabetes"] = (d.data, d.target.to_numpy(float), "progression (score)")
    if "flchain" in names:
        from sksurv.datasets import load_flchain

        x, _ = load_flchain()
        x = x.dropna(subset=["creatinine"])
        y = x.pop("creatinine").to_numpy(float)
        x = x[["age", "kappa", "lambda", "flc.grp", "sex", "mgus"]].copy()
        x["sex"] = (x["sex"].astype(str) == "M").astype(float)
        x["mgus"] = (x["mgus"].astype(str) == "yes").astype(float)
        x["flc.grp"] = pd.to_numeric(x["flc.grp"], errors="coerce")
        out["flchain"] = (x.astype(float), y, "creatinine (mg/dl)")
    return out


def baselines(x: np.ndarray, y: np.ndarray, folds: np.ndarray, seed: int) -> dict[str, float]:
    """Fold-mean R^2 of the baselines on the given folds."""
    import xgboost as xgb
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    models = {
        "ols": lambda: make_pipeline(StandardScaler(), LinearRegression()),
        "ridge": lambda: make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 25))),
        "sklearn_gbm": lambda: GradientBoostingRegressor(random_state=seed),
        "xgboost_library_defaults": lambda: xgb.XGBRegressor(random_state=seed, n_jobs=1),
    }
    out = {}
    for name, make in models.items():
        scores = []
        for k in np.unique(folds):
            te, tr = folds == k, folds != k
            m = make().fit(x[tr], y[tr])
            scores.append(r2_score(y[te], m.predict(x[te])))
        out[name] = float(np.mean(scores))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="diabetes,flchain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from mmcli.features.tabular import ingest_table
    from mmcli.stages.fit import fit

    work = Path(tempfile.mkdtemp(prefix="mmcli-regression-"))
    results: dict = {}
    for name, (x, y, unit) in tables(args.tables.split(",")).items():
        ids = [f"P{i:05d}" for i in range(len(y))]
        d = work / name
        d.mkdir()
        x.assign(patient_id=ids).to_csv(d / "table.csv", index=False)
        rng = np.random.default_rng(args.seed)
        pd.DataFrame({"patient_id": ids, "y": y, "permuted": rng.permutation(y)}).to_csv(d / "labels.csv",
                                                                                        index=False)
        ingest_table(d / "table.csv", "clinical", d / "s.zarr")
        row: dict = {"n": len(y), "features": x.shape[1], "target": unit}
        folds = None
        for head in ("xgboost", "fusion_mlp"):
            for target in ("y", "permuted"):
                doc = fit(head, d / "s.zarr", d / "labels.csv", d / f"{head}_{target}", target=target,
                          task="regression", folds=5, seed=args.seed, n_boot=args.n_boot)
                r2 = doc["metrics"]["r2"]
                key = f"mmcli_{head}" + ("" if target == "y" else "_permuted")
                row[key] = round(r2["mean"], 4)
                if target == "y":
                    row[key + "_ci_t"] = [round(r2["ci_t_low"], 4), round(r2["ci_t_high"], 4)]
                    fj = json.loads((d / f"{head}_{target}" / "folds.json").read_text())
                    f = np.array([fj[p] for p in ids])
                    assert folds is None or (folds == f).all()  # one split for every fit and baseline
                    folds = f
        assert folds is not None
        row.update({k: round(v, 4) for k, v in baselines(x.to_numpy(float), y, folds, args.seed).items()})
        row["xgboost_minus_ols"] = round(row["mmcli_xgboost"] - row["ols"], 4)
        row["fusion_mlp_minus_ols"] = round(row["mmcli_fusion_mlp"] - row["ols"], 4)
        results[name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
