"""Benchmark: the MIL heads on the ABMIL MNIST-bags protocol built from real handwritten digits, and their CPU
cost per training epoch relative to ``attention_mil``.

**MNIST-bags** (Ilse, Tomczak & Welling 2018, "Attention-based deep multiple instance learning", ICML; their
``dataloader.py``, AMLab-Amsterdam/AttentionDeepMIL eb0434ba2795): a bag holds ``int(N(10, 2))`` (at least 1)
digit images and is positive when it holds a '9'; the 9s are the key instances. No package on the registry
ships MNIST itself (they download it at run time), so the digits here are scikit-learn's bundled
``load_digits``: 1797 real handwritten digits (UCI optdigits, 8x8 pixels, 0..16), each instance's feature vector
its 64 pixel values. Ilse et al. draw a bag's digits with replacement from the MNIST train (or test) split; here
each digit goes into at most one bag (a seeded permutation cut into bags), so under patient-level
cross-validation no test bag shares an image with a training bag. The bags are written into a feature store as
a bag modality (``digits``, with tile coordinates) and cross-validated with mmcli's own
:func:`~mmcli.heads.training.cv.cross_validate` (stratified patient-level K-fold, every fold's instance scaler
fit on its training bags). Per head it reports the out-of-fold AUROC (fold mean and SD, and pooled) and, over
the positive bags called positive (P >= 0.5), how often the highest-attention instance is a '9'. Every head
trains for ``--epochs`` (100; their default of 30 underfits ~120 training bags) with its other defaults, over
``--seeds`` (other bags, folds and initial weights each); the done-when is judged on the mean over the seeds.

**Epoch cost**: the time of one training epoch of each head on a demo-sized cohort (120 patients, 20-60 tiles of
1024-d float16 features each, the ``make demo`` WSI cohort's shape) divided by ``attention_mil``'s, in one run:
``(fit with --timing-epochs E) - (fit with 1 epoch)`` over ``E - 1`` per head after one warm-up fit each, the
heads alternating over rounds and the median taken.

    python benchmarks/bench_mil_heads.py --out mil_heads.json
    python benchmarks/bench_mil_heads.py --skip timing --seeds 0 --epochs 30   # quicker, the heads' defaults

Not a test (``tests/heads/test_mil_heads.py`` runs a smaller MNIST-bags check); timings depend on the machine
and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

NEW_HEADS = ("clam_sb", "clam_mb", "dsmil", "transmil")
HEADS = ("attention_mil", *NEW_HEADS)
MODALITY = "digits"
TARGET_DIGIT = 9
AUROC_MIN, KEY_TOP_MIN = 0.90, 0.70  # issue 26's done-when


def digit_bags(n_bags: int, seed: int, mean_len: float = 10.0, sd_len: float = 2.0
               ) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """(bags of 64-d pixel vectors, bag labels (1 = holds a '9'), per-bag key flags) from ``load_digits``.

    Bag lengths ``max(1, int(N(mean_len, sd_len)))`` as Ilse et al.'s ``MnistBags``; digits drawn without
    replacement across bags, so at most ``1797 / mean_len`` bags (ValueError beyond the digits available)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rs = np.random.RandomState(seed)
    order = rs.permutation(len(digits.target))
    bags, labels, keys, at = [], [], [], 0
    for _ in range(n_bags):
        n = max(1, int(rs.normal(mean_len, sd_len)))
        if at + n > len(order):
            raise ValueError(f"{n_bags} bags of ~{mean_len:g} digits need more than the {len(order)} digits of "
                             "load_digits; ask for fewer bags")
        idx = order[at:at + n]
        at += n
        is_key = digits.target[idx] == TARGET_DIGIT
        bags.append(digits.data[idx].astype(np.float32))
        keys.append(is_key)
        labels.append(int(is_key.any()))
    return bags, np.asarray(labels), keys


def write_store(path: Path, bags: list[np.ndarray], labels: np.ndarray, encoder: str = "digits-8x8-pixels"
                ) -> pd.DataFrame:
    """Each bag as one item of patient ``B<i>`` in a new feature store at ``path``; returns the labels table."""
    from mmcli.pipeline.store import open_store

    fs = open_store(path, "a")
    ids = [f"B{i:04d}" for i in range(len(bags))]
    for pid, bag in zip(ids, bags):
        coords = np.stack([np.arange(len(bag)) * 8, np.zeros(len(bag))], 1).astype(np.int64)  # a row of 8px tiles
        fs.write_item(MODALITY, encoder, pid, "bag", bag, coords)
    return pd.DataFrame({"label": np.where(labels == 1, "pos", "neg")}, index=pd.Index(ids, name="patient_id"))


def _cohort(store: Path, labels: pd.DataFrame) -> Any:
    from mmcli.heads.data import load_cohort, resolve_sources
    from mmcli.pipeline.store import open_store

    fs = open_store(store, "r")
    return load_cohort(fs, resolve_sources(fs, [MODALITY]), list(labels.index))


def mnist_bags_cv(heads: tuple[str, ...], n_bags: int, folds: int, seed: int, workdir: Path,
                  params: dict[str, dict[str, Any]] | None = None, log: Any = None) -> dict[str, dict[str, Any]]:
    """Per head: out-of-fold AUROC (fold mean, SD, pooled), key instance on top in correctly called positive bags
    (rate and count), seconds; ``params`` per head (``--param``-style values)."""
    from sklearn.metrics import roc_auc_score

    from mmcli.heads.targets import build_target
    from mmcli.heads.training.cv import cross_validate

    log = log or _log
    bags, y, keys = digit_bags(n_bags, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    labels = write_store(workdir / "digits.zarr", bags, y)
    cohort = _cohort(workdir / "digits.zarr", labels)
    target = build_target(labels, target="label")
    pos = list(target.classes).index("pos")
    is_key = {pid: k for pid, k in zip(labels.index, keys)}
    out = {}
    for head in heads:
        t0 = time.perf_counter()
        res = cross_validate(head, cohort, target, folds=folds, seed=seed, params=(params or {}).get(head),
                             explain=False)
        fold_auc, y_all, p_all, hits = [], [], [], []
        for r in res:
            yt, p = np.asarray(target.y[r.test_idx]) == pos, r.pred[:, pos]
            fold_auc.append(roc_auc_score(yt, p))
            y_all.append(yt)
            p_all.append(p)
            att = r.head.attention(cohort.subset(r.test_idx))[MODALITY]
            for j, i in enumerate(r.test_idx):
                pid = cohort.patients[i]
                if yt[j] and p[j] >= 0.5:  # a positive bag called positive
                    hits.append(bool(is_key[pid][int(np.argmax(att[j]))]))
        out[head] = {"auroc_fold_mean": float(np.mean(fold_auc)), "auroc_fold_sd": float(np.std(fold_auc, ddof=1)),
                     "auroc_pooled": float(roc_auc_score(np.concatenate(y_all), np.concatenate(p_all))),
                     "key_top_rate": float(np.mean(hits)) if hits else float("nan"),
                     "positives_called": len(hits), "seconds": time.perf_counter() - t0,
                     "params": (params or {}).get(head, {})}
        log(f"{head}: AUROC {out[head]['auroc_fold_mean']:.3f} (fold SD {out[head]['auroc_fold_sd']:.3f}, pooled "
            f"{out[head]['auroc_pooled']:.3f}), key on top {out[head]['key_top_rate']:.2f} of "
            f"{len(hits)}, {out[head]['seconds']:.0f}s")
    out["_data"] = {"bags": len(bags), "positive": int(y.sum()), "instances": int(sum(len(b) for b in bags)),
                    "keys": int(sum(k.sum() for k in keys)), "folds": folds, "seed": seed}
    return out


def epoch_timing(heads: tuple[str, ...], patients: int, tiles: tuple[int, int], dim: int, epochs: int,
                 rounds: int, seed: int, workdir: Path, log: Any = None) -> dict[str, Any]:
    """Seconds per training epoch of each head on a demo-sized cohort and the ratio to attention_mil's."""
    from mmcli.heads import create_head

    log = log or _log
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, patients)
    bags = []
    for label in y:
        bag = rng.standard_normal((int(rng.integers(tiles[0], tiles[1] + 1)), dim)).astype(np.float32)
        if label:
            bag[: max(1, len(bag) // 10), :16] += 1.5
        bags.append(bag.astype(np.float16))
    labels = write_store(workdir / "demo_sized.zarr", bags, y, encoder="demo-sized-1024")
    cohort = _cohort(workdir / "demo_sized.zarr", labels)
    target = np.asarray(y)
    runs: dict[str, list[float]] = {h: [] for h in heads}

    def fit_seconds(head: str, n_epochs: int) -> float:
        t = time.perf_counter()
        create_head(head, task="classification", n_classes=2, epochs=n_epochs, seed=seed).fit(cohort, target)
        return time.perf_counter() - t

    for head in heads:  # warm-up: first-call costs (imports, allocator) would land in the first fit timed
        fit_seconds(head, 1)
    for r in range(rounds):
        for head in heads if r % 2 == 0 else heads[::-1]:
            one = fit_seconds(head, 1)
            runs[head].append((fit_seconds(head, epochs) - one) / (epochs - 1))
    per_epoch = {h: float(np.median(v)) for h, v in runs.items()}
    base = per_epoch["attention_mil"]
    ratio = {h: per_epoch[h] / base for h in heads}
    for h in heads:
        log(f"{h}: {per_epoch[h]:.3f} s/epoch, {ratio[h]:.2f}x attention_mil")
    return {"seconds_per_epoch": per_epoch, "ratio_to_attention_mil": ratio, "patients": patients,
            "tiles": list(tiles), "dim": dim, "epochs": epochs, "rounds": rounds, "runs": runs}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _params(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``HEAD:KEY=VALUE`` (VALUE as JSON when it parses) -> {head: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for p in pairs:
        head, _, kv = p.partition(":")
        key, _, value = kv.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(head, {})[key] = parsed
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=",".join(HEADS), help="comma-separated heads (attention_mil is the baseline)")
    ap.add_argument("--bags", type=int, default=150, help="MNIST-bags: number of bags (<= ~175 with load_digits)")
    ap.add_argument("--folds", type=int, default=5, help="patient-level CV folds")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds; each draws other bags, folds and "
                    "initial weights (results per seed and their mean)")
    ap.add_argument("--epochs", type=int, default=100, help="MNIST-bags: training epochs of every head (the heads' "
                    "default, 30, gives ~120 training bags only ~120 steps)")
    ap.add_argument("--param", action="append", default=[], help="HEAD:KEY=VALUE head parameter (repeatable)")
    ap.add_argument("--timing-patients", type=int, default=120, help="demo-sized cohort: patients")
    ap.add_argument("--timing-epochs", type=int, default=11, help="epochs of the timed fit (>= 2)")
    ap.add_argument("--timing-rounds", type=int, default=3, help="alternating timing rounds (median taken)")
    ap.add_argument("--skip", action="append", default=[], choices=["mnist", "timing"], help="skip a part")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    import torch

    result: dict[str, Any] = {"command": "python benchmarks/bench_mil_heads.py " + " ".join(argv or sys.argv[1:]),
                              "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": 1,
                              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        seeds = [int(x) for x in args.seeds.split(",")]
        if "mnist" not in args.skip:
            given = _params(args.param)
            params = {h: {"epochs": args.epochs, **given.get(h, {})} for h in heads}
            per_seed = {seed: mnist_bags_cv(heads, args.bags, args.folds, seed, Path(tmp) / f"seed{seed}", params)
                        for seed in seeds}
            summary = {h: {k: float(np.mean([per_seed[s][h][k] for s in seeds]))
                           for k in ("auroc_fold_mean", "auroc_pooled", "key_top_rate", "seconds")} for h in heads}
            result["mnist_bags"] = {"per_seed": per_seed, "mean_over_seeds": summary}
            result["done_when"] = {h: bool(summary[h]["auroc_fold_mean"] >= AUROC_MIN
                                           and summary[h]["key_top_rate"] >= KEY_TOP_MIN)
                                   for h in heads if h in NEW_HEADS}
            for h in heads:
                _log(f"mean over seeds {seeds}: {h} AUROC {summary[h]['auroc_fold_mean']:.3f}, key on top "
                     f"{summary[h]['key_top_rate']:.2f}")
        if "timing" not in args.skip:
            base = heads if "attention_mil" in heads else ("attention_mil", *heads)
            result["epoch_timing"] = epoch_timing(base, args.timing_patients, (20, 60), 1024, args.timing_epochs,
                                                  args.timing_rounds, seeds[0], Path(tmp))
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
