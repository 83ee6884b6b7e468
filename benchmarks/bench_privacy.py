"""Benchmark: utility of DP-SGD ``fusion_mlp`` against the privacy budget epsilon, on a planted-signal store.

Builds a store of ``--patients`` patients with three modalities carrying a planted class signal of strength
``--shift`` (``wsi``: bags of ``--tiles`` 16-dim tiles, positives have a few shifted key tiles; ``mri``: an
8-dim vector, ~25% of patients miss it; ``genes``: a 12-column table with NaNs), then runs ``mmcli fit``'s
stage (``--folds``-fold patient-level CV, bootstrap CIs) once per epsilon in ``--epsilons`` (``inf`` = no DP)
with the same hyperparameters otherwise, and prints a markdown table: epsilon, the accountant's spent epsilon
(final model; max over folds), the noise multiplier, AUROC with its 95% bootstrap CI, balanced accuracy, and
seconds. ``--out`` also gets the table as JSON.

    python benchmarks/bench_privacy.py --patients 400 --epsilons inf,8,4,1,0.5

Not a test: the numbers move with the seed, the cohort and the hyperparameters (DP-SGD is sensitive to the
learning rate, the clipping norm and the batch size; none was tuned per epsilon here).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def build_store(path: Path, patients: int, tiles: int, shift: float, seed: int) -> pd.DataFrame:
    """Write the planted store; returns the labels (``patient_id`` index, column ``label``)."""
    from mmcli.pipeline.store import open_store

    rng = np.random.default_rng(seed)
    ids = [f"D{i:05d}" for i in range(patients)]
    y = rng.permutation(np.arange(patients) % 2)
    direction = np.zeros(16, dtype=np.float32)
    direction[:4] = 1.0
    fs = open_store(path, "a")
    genes = rng.normal(size=(patients, 12))
    genes[:, :2] += shift * y[:, None]
    genes[rng.random(genes.shape) < 0.08] = np.nan
    for i, pid in enumerate(ids):
        f = rng.normal(size=(tiles, 16)).astype(np.float32)
        if y[i]:
            f[rng.choice(tiles, max(1, tiles // 8), replace=False)] += 2 * shift * direction
        coords = np.stack([np.arange(tiles) * 224, np.zeros(tiles)], 1).astype(np.int64)
        fs.write_item("wsi", "enc-wsi", pid, "slide0", f.astype(np.float16), coords)
        if rng.random() >= 0.25:
            v = rng.normal(size=(1, 8)).astype(np.float32)
            v[0, :2] += shift * y[i]
            fs.write_item("mri", "enc-mri", pid, "T1", v)
    fs.write_table("genes", pd.DataFrame(genes, index=pd.Index(ids, name="patient_id"),
                                         columns=[f"g{j}" for j in range(12)]))
    return pd.DataFrame({"label": np.where(y == 1, "pos", "neg")}, index=pd.Index(ids, name="patient_id"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--shift", type=float, default=0.6, help="planted signal strength")
    ap.add_argument("--epsilons", default="inf,8,4,1,0.5")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    a = ap.parse_args(argv)
    from mmcli.stages.fit import fit

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_privacy_"))
    work.mkdir(parents=True, exist_ok=True)
    labels = build_store(work / "store.zarr", a.patients, a.tiles, a.shift, a.seed)
    labels.reset_index().to_csv(work / "labels.csv", index=False)
    rows = []
    for text in a.epsilons.split(","):
        eps = float(text)
        params = {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "class_weight": "none"}
        if math.isfinite(eps):
            params |= {"dp_epsilon": eps, "dp_delta": a.delta, "dp_max_grad_norm": a.max_grad_norm}
        t0 = time.perf_counter()
        doc = fit("fusion_mlp", work / "store.zarr", work / "labels.csv", work / f"run_eps{text}", target="label",
                  folds=a.folds, seed=a.seed, params=params, n_boot=a.n_boot, explain=False)
        auc, bacc = doc["metrics"]["auroc"], doc["metrics"].get("balanced_accuracy", {})
        priv = doc.get("privacy") or {}
        rows.append({
            "target_epsilon": eps if math.isfinite(eps) else None,
            "spent_epsilon_final": priv.get("epsilon"),
            "spent_epsilon_max_fold": max((f["epsilon"] for f in priv.get("per_fold", [])), default=None),
            "noise_multiplier": priv.get("noise_multiplier"),
            "auroc": auc["mean"], "auroc_ci": [auc["ci_low"], auc["ci_high"]],
            "balanced_accuracy": bacc.get("mean"), "seconds": round(time.perf_counter() - t0, 1)})
        r = rows[-1]
        print(f"eps={text}: auroc {r['auroc']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}] "
              f"({r['seconds']}s)", file=sys.stderr, flush=True)

    def f(v: float | None, nd: int = 3) -> str:
        return "—" if v is None else f"{v:.{nd}f}"

    print(f"fusion_mlp, {a.patients} planted patients (shift {a.shift}), {a.folds}-fold CV, delta={a.delta}, "
          f"C={a.max_grad_norm}, {a.epochs} epochs, batch {a.batch_size}, lr {a.lr}, seed {a.seed}\n")
    print("| target ε | spent ε (final) | spent ε (max fold) | noise σ | AUROC [95% CI] | bal. acc. | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'∞ (no DP)' if r['target_epsilon'] is None else r['target_epsilon']} | "
              f"{f(r['spent_epsilon_final'])} | {f(r['spent_epsilon_max_fold'])} | {f(r['noise_multiplier'], 2)} | "
              f"{r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}] | {f(r['balanced_accuracy'])} | "
              f"{r['seconds']} |")
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
