"""Benchmark: attention-MIL K-fold cross-validation on a synthetic WSI feature store (CPU).

Builds (or reuses) a Zarr store of ``--patients`` patients x ``--tiles`` tiles x ``--dim`` float16 features with
a planted signal (positive patients carry a few shifted key tiles), then measures, in one run:

* reading every bag from the store (bags/s, tiles/s, MB/s) — ``load_cohort``;
* ``--folds``-fold cross-validation of ``attention_mil`` plus the final refit (seconds, per fold);
* the bootstrap metric summary (seconds);
* peak RSS.

Defaults are the issue's size (1000 x 2000 x 1024: a 4 GB store, ~4 GB of RAM for the bags). Shrink with
``--patients/--tiles``; time grows about linearly in patients x min(tiles, --max-instances) for training and in
patients x tiles for reading and inference. Not a test: timings depend on the machine and its load.

    python benchmarks/bench_fit.py --patients 200 --tiles 500
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def build_store(path: Path, patients: int, tiles: int, dim: int, seed: int) -> pd.DataFrame:
    """Write the synthetic store (skipped when it exists with the same shape); returns the labels."""
    from mmcli.pipeline.store import open_store

    rng = np.random.default_rng(seed)
    ids = [f"B{i:05d}" for i in range(patients)]
    labels = pd.DataFrame({"label": np.where(np.arange(patients) % 2 == 0, "neg", "pos")},
                          index=pd.Index(ids, name="patient_id"))
    marker = path / "bench.json"
    shape = {"patients": patients, "tiles": tiles, "dim": dim, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return labels
    if path.exists():
        shutil.rmtree(path)
    fs = open_store(path, "a")
    direction = np.zeros(dim, dtype=np.float32)
    direction[:16] = 1.0
    coords = np.stack([np.arange(tiles) * 224, np.zeros(tiles)], 1).astype(np.int64)
    for i, pid in enumerate(ids):
        f = rng.standard_normal((tiles, dim), dtype=np.float32)
        if labels.iloc[i, 0] == "pos":
            f[rng.choice(tiles, max(1, tiles // 20), replace=False)] += 1.5 * direction
        fs.write_item("wsi", "bench-enc", pid, "slide0", f.astype(np.float16), coords)
    marker.write_text(json.dumps(shape))
    return labels


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="attention_mil epochs (default: the head's)")
    ap.add_argument("--max-instances", type=int, default=None, help="tiles per bag per training step")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the issue's machine has 2 cores)")
    ap.add_argument("--read-threads", type=int, default=4, help="store reader threads")
    ap.add_argument("--store", type=Path, default=None, help="store path (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from mmcli.heads import create_head
    from mmcli.heads.data import load_cohort, resolve_sources
    from mmcli.heads.evaluation.metrics import summarise
    from mmcli.heads.targets import build_target
    from mmcli.heads.training.cv import cross_validate, head_params
    from mmcli.pipeline.store import open_store

    tmp = None
    store = args.store
    if store is None:
        tmp = Path(tempfile.mkdtemp(prefix="mmcli-bench-fit-"))
        store = tmp / "bench.zarr"
    t = time.perf_counter()
    labels = build_store(store, args.patients, args.tiles, args.dim, args.seed)
    t_build = time.perf_counter() - t

    fs = open_store(store, "r")
    t = time.perf_counter()
    cohort = load_cohort(fs, resolve_sources(fs, ["wsi"]), list(labels.index), n_threads=args.read_threads)
    t_read = time.perf_counter() - t
    n_tiles = sum(len(b) for b in cohort.modalities["wsi"].bags)
    nbytes = sum(b.nbytes for b in cohort.modalities["wsi"].bags)

    params = {"n_threads": args.threads}
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.max_instances is not None:
        params["max_instances"] = args.max_instances
    target = build_target(labels, target="label")
    t = time.perf_counter()
    results = cross_validate("attention_mil", cohort, target, folds=args.folds, seed=args.seed, params=params,
                             explain=False)
    t_cv = time.perf_counter() - t
    t = time.perf_counter()
    final = create_head("attention_mil", **head_params("attention_mil", target, args.seed, params)).fit(
        cohort, target.y)
    t_refit = time.perf_counter() - t
    t = time.perf_counter()
    metrics = summarise([r.eval for r in results], n_boot=200, seed=args.seed)
    t_metrics = time.perf_counter() - t

    out = {
        "patients": args.patients, "tiles": args.tiles, "dim": args.dim, "folds": args.folds,
        "head_params": {k: v for k, v in final.get_params().items() if k not in ("task", "n_classes")},
        "store_build_s": round(t_build, 2),
        "read_s": round(t_read, 2), "bags_per_s": round(args.patients / t_read, 1),
        "tiles_per_s": round(n_tiles / t_read), "read_MB_per_s": round(nbytes / 1e6 / t_read, 1),
        "cv_s": round(t_cv, 2), "fold_s": [round(r.seconds, 2) for r in results], "refit_s": round(t_refit, 2),
        "metrics_s": round(t_metrics, 2), "total_fit_s": round(t_read + t_cv + t_refit + t_metrics, 2),
        "auroc": metrics["auroc"]["mean"],
        "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }
    print(f"store {store}: {args.patients} patients x {args.tiles} tiles x {args.dim}-d (build {t_build:.1f}s)")
    print(f"read   {t_read:8.1f}s  {out['bags_per_s']} bags/s, {out['tiles_per_s']} tiles/s, "
          f"{out['read_MB_per_s']} MB/s")
    print(f"cv     {t_cv:8.1f}s  ({args.folds} folds: {out['fold_s']})")
    print(f"refit  {t_refit:8.1f}s")
    print(f"metrics{t_metrics:8.1f}s  (200 bootstrap replicates)")
    print(f"total  {out['total_fit_s']:8.1f}s  AUROC {out['auroc']:.3f}  peak RSS {out['peak_rss_GB']} GB")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
