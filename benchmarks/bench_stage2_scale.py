"""Stage 2 at cohort scale (issue 23): `mmcli fit --head attention_mil` against the same arithmetic in a bare torch
loop, peak memory against cohort size under a memory budget, and `ablate` on dask against in-process.

Builds its own CLAM-layout cohort (``h5_files/<slide>.h5``: ``features`` (N, D) float32 and ``coords``): N tiles
per slide of Gaussian noise, in positive slides a few "key" tiles shifted on the first dimensions (the MIL
assumption), imports it with ``mmcli import --format clam`` and then measures, in one run:

* **time**: ``mmcli fit --head attention_mil --folds F --param epochs=E --n-boot B`` (all defaults otherwise,
  the default memory budget) on the large cohort, against a bare loop: the h5 files read into memory, the same
  folds (StratifiedGroupKFold, the same seed), the same gated ABMIL arithmetic (in-fold instance
  standardisation from <= 256 tiles per training bag, hidden 64, attention 32, dropout 0.25, AdamW 1e-3 /
  1e-4, 32 bags a step with at most 512 sampled tiles, balanced cross-entropy, one torch thread), full bags at
  inference (one at a time), a refit on all bags; the AUROC of both from the out-of-fold predictions;
* **memory**: peak RSS of ``mmcli fit ... --memory-budget BUDGET`` on the small and on the large cohort;
* **dask**: ``mmcli ablate --heads fusion_mlp --fusions concat,gated,attention --modalities wsi,genes`` (5 fits:
  each modality alone and three fusions; ``--ablate-folds`` folds, ``--ablate-epochs`` epochs) in-process against
  ``--scheduler local --workers 2`` on the small cohort (plus a genes table), wall time of each, and whether the
  two tables are equal.

Peak RSS comes from ``/usr/bin/time -f %M`` around each command (the process and nothing else).

    python benchmarks/bench_stage2_scale.py                        # 60 and 240 bags x 3000 tiles x 1024-d
    python benchmarks/bench_stage2_scale.py --bags-large 60 --tiles 1000 --skip memory   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MMCLI = [sys.executable, "-m", "mmcli.cli"]


def build_cohort(folder: Path, n_bags: int, tiles: int, dim: int, seed: int, key_frac: float = 0.05,
                 shift: float = 1.0, key_dims: int = 16) -> None:
    """CLAM ``h5_files/``, ``manifest.csv`` (first ``n_bags`` slides), ``labels.csv`` and ``genes.csv``."""
    rng = np.random.default_rng(seed)
    h5 = folder / "h5_files"
    h5.mkdir(parents=True, exist_ok=True)
    labels = (np.arange(n_bags) % 2).astype(int)
    rng.shuffle(labels)
    pids = [f"P{i:04d}" for i in range(n_bags)]
    for i, y in enumerate(labels):
        f = h5 / f"S{i:04d}.h5"
        if f.exists():
            continue
        x = rng.standard_normal((tiles, dim), dtype=np.float32)
        if y:
            key = rng.choice(tiles, max(1, int(key_frac * tiles)), replace=False)
            x[np.ix_(key, np.arange(key_dims))] += shift
        coords = np.stack(np.divmod(np.arange(tiles), 64), 1)[:, ::-1].astype(np.int64) * 256
        with h5py.File(f, "w") as fh:
            fh.create_dataset("features", data=x)
            d = fh.create_dataset("coords", data=coords)
            d.attrs.update({"patch_size": 256, "patch_level": 0})
    pd.DataFrame({"patient_id": pids, "modality": "wsi", "path": [f"slides/S{i:04d}.svs" for i in range(n_bags)],
                  "item_id": [f"S{i:04d}" for i in range(n_bags)]}).to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame({"patient_id": pids, "label": labels}).to_csv(folder / "labels.csv", index=False)
    genes = rng.standard_normal((n_bags, 20)) + 0.3 * labels[:, None]
    pd.DataFrame(genes, columns=[f"g{j}" for j in range(20)]).assign(patient_id=pids).to_csv(
        folder / "genes.csv", index=False)


def timed(cmd: list[str], log: Path) -> tuple[float, int, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS bytes, result) of ``cmd`` under ``/usr/bin/time``."""
    rss = log.with_suffix(".rss")
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return wall, int(rss.read_text().split()[-1]) * 1024, r


# ---- the bare loop --------------------------------------------------------------------------------------------
BARE = r'''
import sys, time, json, numpy as np, torch, h5py, pandas as pd
from torch import nn
import torch.nn.functional as F
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.metrics import roc_auc_score
folder, folds, epochs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
t0 = time.perf_counter()
man = pd.read_csv(f"{folder}/manifest.csv"); lab = pd.read_csv(f"{folder}/labels.csv").set_index("patient_id")
man = man.sort_values("patient_id")
bags = [h5py.File(f"{folder}/h5_files/{i}.h5", "r")["features"][()] for i in man.item_id]
y = lab.loc[man.patient_id, "label"].to_numpy()
D = bags[0].shape[1]

class ABMIL(nn.Module):
    def __init__(self, d, h=64, a=32, k=2, p=0.25):
        super().__init__()
        self.embed, self.drop = nn.Linear(d, h), nn.Dropout(p)
        self.v, self.u, self.w = nn.Linear(h, a), nn.Linear(h, a), nn.Linear(a, 1)
        self.out = nn.Linear(h, k)
    def forward(self, x, mask, mean, scale):
        z = self.drop(F.relu(self.embed((x - mean) / scale)))
        s = self.w(torch.tanh(self.v(z)) * torch.sigmoid(self.u(z))).squeeze(-1).masked_fill(~mask, -1e9)
        a = torch.softmax(s, 1)
        return self.out((a.unsqueeze(-1) * z).sum(1))

def scaler(idx, rng):
    s = np.zeros(D); ss = np.zeros(D); n = 0
    for i in idx:
        b = bags[i]
        if len(b) > 256: b = b[np.sort(rng.choice(len(b), 256, replace=False))]
        b = b.astype(np.float64); s += b.sum(0); ss += (b * b).sum(0); n += len(b)
    m = s / n; sd = np.sqrt(np.maximum(ss / n - m * m, 0)); sd[sd == 0] = 1
    return torch.tensor(m, dtype=torch.float32), torch.tensor(sd, dtype=torch.float32)

def train(idx):
    torch.manual_seed(seed); rng = np.random.default_rng(seed)
    mean, scale = scaler(idx, np.random.default_rng(seed))
    net = ABMIL(D); opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    cw = torch.tensor(len(idx) / (2 * np.bincount(y[idx], minlength=2)), dtype=torch.float32)
    for _ in range(epochs):
        net.train(); perm = rng.permutation(idx)
        for s in range(0, len(perm), 32):
            b = perm[s:s + 32]
            if len(b) < 2: continue
            xs = [bags[i][np.sort(rng.choice(len(bags[i]), 512, replace=False))] if len(bags[i]) > 512
                  else bags[i] for i in b]
            n = max(len(x) for x in xs)
            x = np.zeros((len(b), n, D), np.float32); m = np.zeros((len(b), n), bool)
            for k, xi in enumerate(xs): x[k, :len(xi)] = xi; m[k, :len(xi)] = True
            out = net(torch.from_numpy(x), torch.from_numpy(m), mean, scale)
            loss = F.cross_entropy(out, torch.tensor(y[b]), weight=cw)
            opt.zero_grad(); loss.backward(); opt.step()
    return net, mean, scale

def score(net, mean, scale, idx):
    net.eval(); out = []
    with torch.no_grad():
        for i in idx:
            x = torch.from_numpy(bags[i].astype(np.float32))[None]
            mask = torch.ones(1, len(bags[i]), dtype=torch.bool)
            out.append(torch.softmax(net(x, mask, mean, scale), 1)[0, 1].item())
    return np.array(out)

oof = np.zeros(len(y)); aucs = []
split = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, man.patient_id)
for tr, te in split:
    net, mean, scale = train(tr); oof[te] = score(net, mean, scale, te); aucs.append(roc_auc_score(y[te], oof[te]))
train(np.arange(len(y)))
print(json.dumps({"auroc_pooled": roc_auc_score(y, oof), "auroc_fold_mean": float(np.mean(aucs)),
                  "seconds": time.perf_counter() - t0}))
'''


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags-small", type=int, default=60)
    ap.add_argument("--bags-large", type=int, default=240)
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--budget", default="1GB", help="--memory-budget of the memory runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating bare / fit rounds of the time comparison "
                    "(medians reported)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the cohorts and runs (kept)")
    ap.add_argument("--ablate-epochs", type=int, default=20, help="epochs of each ablation fit (dask part)")
    ap.add_argument("--ablate-folds", type=int, default=5, help="folds of each ablation fit (dask part)")
    ap.add_argument("--skip", action="append", default=[], choices=["time", "memory", "dask"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mmcli-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"bags_small": args.bags_small, "bags_large": args.bags_large, "tiles": args.tiles, "dim": args.dim,
                 "folds": args.folds, "epochs": args.epochs, "n_boot": args.n_boot, "budget": args.budget,
                 "cpu": os.cpu_count(), "work": str(work)}
    stores = {}
    need = {"small": not {"memory", "dask"} <= set(args.skip), "large": not {"time", "memory"} <= set(args.skip)}
    for name, n in (("small", args.bags_small), ("large", args.bags_large)):
        if not need[name]:  # a cohort no requested part reads is not built
            continue
        folder = work / name
        build_cohort(folder, n, args.tiles, args.dim, args.seed)
        store = folder / "features.zarr"
        if not store.exists():
            subprocess.run([*MMCLI, "import", "--format", "clam", "--from", str(folder), "--manifest",
                            str(folder / "manifest.csv"), "--store", str(store), "--no-progress"], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
            subprocess.run([*MMCLI, "extract", "--modality", "tabular", "--table", str(folder / "genes.csv"),
                            "--name", "genes", "--store", str(store)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        stores[name] = (folder, store)
        out[f"feature_bytes_{name}"] = n * args.tiles * args.dim * 4

    def fit_cmd(name: str, run: str, *extra: str) -> list[str]:
        folder, store = stores[name]
        return [*MMCLI, "fit", "--head", "attention_mil", "--store", str(store), "--labels",
                str(folder / "labels.csv"), "--target", "label", "--modalities", "wsi", "--folds", str(args.folds),
                "--param", f"epochs={args.epochs}", "--n-boot", str(args.n_boot), "--seed", str(args.seed),
                "--out", str(work / "runs" / run), "--overwrite", "--no-progress", *extra]

    if "time" not in args.skip:
        folder = stores["large"][0]
        script = work / "bare_loop.py"
        script.write_text(BARE)
        bare_runs, fit_runs = [], []
        for _ in range(args.rounds):  # alternating, so both see the same machine load on average
            bare_runs.append(timed([sys.executable, str(script), str(folder), str(args.folds), str(args.epochs),
                                    str(args.seed)], work / "bare.log"))
            fit_runs.append(timed(fit_cmd("large", "default"), work / "fit_default.log"))
        bare = json.loads(bare_runs[-1][2].stdout.strip().splitlines()[-1])
        t_bare = float(np.median([t for t, _, _ in bare_runs]))
        t_fit = float(np.median([t for t, _, _ in fit_runs]))
        rss_bare, rss_fit = max(m for _, m, _ in bare_runs), max(m for _, m, _ in fit_runs)
        pred = pd.read_csv(work / "runs" / "default" / "predictions.csv")
        from sklearn.metrics import roc_auc_score

        metrics = json.loads((work / "runs" / "default" / "metrics.json").read_text())
        config = json.loads((work / "runs" / "default" / "config.json").read_text())
        out["time"] = {
            "bare_seconds": round(t_bare, 1), "fit_seconds": round(t_fit, 1), "ratio": round(t_fit / t_bare, 3),
            "bare_auroc_pooled": round(bare["auroc_pooled"], 4),
            "bare_auroc_fold_mean": round(bare["auroc_fold_mean"], 4),
            "fit_auroc_pooled": round(roc_auc_score(pred["y_true"].astype(str) == "1", pred["prob_1"]), 4),
            "fit_auroc_fold_mean": round(metrics["metrics"]["auroc"]["mean"], 4),
            "rounds_seconds": {"bare": [round(t, 1) for t, _, _ in bare_runs],
                               "fit": [round(t, 1) for t, _, _ in fit_runs]},
            "fit_timings_s": config.get("timings_s"), "bare_peak_rss_mb": rss_bare >> 20,
            "fit_peak_rss_mb": rss_fit >> 20}
        print(json.dumps(out["time"], indent=1), flush=True)
    if "memory" not in args.skip:
        peaks = {}
        for name in ("small", "large"):
            _, rss, _ = timed(fit_cmd(name, f"budget_{name}", "--memory-budget", args.budget),
                              work / f"fit_budget_{name}.log")
            peaks[name] = rss
        out["memory"] = {"peak_rss_mb_small": peaks["small"] >> 20, "peak_rss_mb_large": peaks["large"] >> 20,
                         "ratio_large_to_small": round(peaks["large"] / peaks["small"], 3)}
        print(json.dumps(out["memory"], indent=1), flush=True)
    if "dask" not in args.skip:
        folder, store = stores["small"]
        base = [*MMCLI, "ablate", "--store", str(store), "--labels", str(folder / "labels.csv"), "--target", "label",
                "--modalities", "wsi,genes", "--heads", "fusion_mlp", "--fusions", "concat,gated,attention",
                "--param", f"epochs={args.ablate_epochs}", "--folds", str(args.ablate_folds),
                "--n-boot", str(args.n_boot),
                "--seed", str(args.seed), "--force", "--no-compare"]
        t_here, _, _ = timed([*base, "--out", str(work / "ablate_here")], work / "ablate_here.log")
        t_dask, _, _ = timed([*base, "--out", str(work / "ablate_dask"), "--scheduler", "local", "--workers", "2"],
                             work / "ablate_dask.log")
        same = (pd.read_csv(work / "ablate_here" / "ablation.csv")[["subset", "mean", "ci_low", "ci_high"]]
                .equals(pd.read_csv(work / "ablate_dask" / "ablation.csv")[["subset", "mean", "ci_low", "ci_high"]]))
        out["dask"] = {"fits": 5, "epochs": args.ablate_epochs, "folds": args.ablate_folds,
                       "ablate_in_process_s": round(t_here, 1), "ablate_2_workers_s": round(t_dask, 1),
                       "ratio": round(t_dask / t_here, 3), "same_table": bool(same)}
        print(json.dumps(out["dask"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
