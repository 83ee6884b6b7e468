"""Coverage of mmcli's headline intervals (issue 24 item 3): which interval covers what, and how wide it is.

Generator with an exact answer: ``X | y ~ N(y * delta, I_30)``, ``y ~ Bernoulli(1/2)``, ``delta`` non-zero on
the first ``--informative`` features with the Bayes AUROC ``--bayes-auroc``. Any linear score ``w . x`` then has
the true AUROC ``Phi(w . delta / (sqrt(2) |w|))``, so every truth below is computed, not estimated on a test
sample. The procedure is scikit-learn's ``LogisticRegression()`` (L2, C = 1, all 30 features) under mmcli's
5-fold stratified cross-validation, scored by :func:`mmcli.heads.evaluation.metrics.summarise` (``--n-boot``
resamples) exactly as ``mmcli fit`` does.

Per cohort size ``n`` (``--sizes``), ``--reps`` cohorts; for each interval of the AUROC, coverage of:

* ``procedure``: the expected true AUROC of the procedure at the training size ``n (K-1)/K`` (mean over
  ``--truth-fits`` independent training sets): what a cross-validation estimates;
* ``these models``: the mean true AUROC of this cohort's K fold models (what the fixed-model bootstrap targets);
* ``final model``: the true AUROC of the model refitted on all ``n`` patients (what is shipped).

Intervals: ``ci`` (percentile bootstrap, fold models fixed) and ``ci_t`` (corrected resampled t, Nadeau &
Bengio), the headline of ``fit`` since issue 24. Also ``mmcli compare``'s two intervals for the difference of
two procedures (A: C = 1; B: C = 0.02) cross-validated on the same folds: DeLong on the pooled out-of-fold
predictions (models fixed) and the corrected paired t over the per-fold differences (the headline), for the
procedures' expected difference.

Binomial standard error of a coverage c over R cohorts: sqrt(c (1 - c) / R) (1000 cohorts: 0.007 at 0.95,
0.012 at 0.85).

    python benchmarks/bench_coverage.py                  # 1000 cohorts per size, n in {150, 400}
    python benchmarks/bench_coverage.py --quick          # 100 cohorts, 300 resamples
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, small matrices
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

from mmcli.heads.evaluation.metrics import FoldPredictions, auroc, summarise  # noqa: E402
from mmcli.heads.evaluation.stats import corrected_t_test, delong_test  # noqa: E402

N_FEATURES, FOLDS, C_A, C_B = 30, 5, 1.0, 0.02


class Generator:
    """The Gaussian two-class generator and the exact AUROC of a linear score."""

    def __init__(self, informative: int, bayes_auroc: float) -> None:
        sep = np.sqrt(2) * norm.ppf(bayes_auroc)  # |delta|
        self.delta = np.zeros(N_FEATURES)
        self.delta[:informative] = sep / np.sqrt(informative)

    def cohort(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)])
        return rng.normal(size=(n, N_FEATURES)) + y[:, None] * self.delta, y

    def true_auroc(self, coef: np.ndarray) -> float:
        w = np.asarray(coef, dtype=np.float64).ravel()
        return float(norm.cdf(w @ self.delta / (np.sqrt(2) * np.linalg.norm(w))))


def fit(x: np.ndarray, y: np.ndarray, c: float):  # noqa: ANN201 - a fitted LogisticRegression
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000).fit(x, y)


def stratified_folds(rng: np.random.Generator, y: np.ndarray, k: int) -> np.ndarray:
    fold = np.empty(len(y), int)
    for c in (0, 1):
        rows = np.flatnonzero(y == c)
        fold[rng.permutation(rows)] = np.arange(len(rows)) % k
    return fold


def procedure_truth(gen: Generator, rng: np.random.Generator, n_train: int, fits: int) -> tuple[float, float]:
    """Expected true AUROC of procedure A and expected A - B at the training size (independent training sets)."""
    a, d = [], []
    for _ in range(fits):
        x, y = gen.cohort(rng, n_train)
        ta, tb = gen.true_auroc(fit(x, y, C_A).coef_), gen.true_auroc(fit(x, y, C_B).coef_)
        a.append(ta)
        d.append(ta - tb)
    return float(np.mean(a)), float(np.mean(d))


def one_cohort(gen: Generator, rng: np.random.Generator, n: int, n_boot: int, seed: int) -> dict[str, float]:
    x, y = gen.cohort(rng, n)
    fold = stratified_folds(rng, y, FOLDS)
    folds, cond, cond_d, diffs, sizes = [], [], [], [], []
    pooled_a, pooled_b = np.empty(n), np.empty(n)
    for f in range(FOLDS):
        te, tr = fold == f, fold != f
        ma, mb = fit(x[tr], y[tr], C_A), fit(x[tr], y[tr], C_B)
        pa, pb = ma.predict_proba(x[te]), mb.predict_proba(x[te])
        folds.append(FoldPredictions(y=y[te], probs=pa))
        pooled_a[te], pooled_b[te] = pa[:, 1], pb[:, 1]
        ta, tb = gen.true_auroc(ma.coef_), gen.true_auroc(mb.coef_)
        cond.append(ta)
        cond_d.append(ta - tb)
        diffs.append(auroc(y[te], pa[:, 1]) - auroc(y[te], pb[:, 1]))
        sizes.append(int(te.sum()))
    s = summarise(folds, n_boot=n_boot, seed=seed)["auroc"]
    d = delong_test(y, pooled_a, pooled_b)
    t = corrected_t_test(diffs, sizes)
    return {"mean": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"], "ci_t_low": s["ci_t_low"],
            "ci_t_high": s["ci_t_high"], "conditional": float(np.mean(cond)),
            "final": gen.true_auroc(fit(x, y, C_A).coef_),
            "delong_low": d.ci_low, "delong_high": d.ci_high, "t_diff_low": t.ci_low, "t_diff_high": t.ci_high,
            "conditional_diff": float(np.mean(cond_d))}


def cover(rows: list[dict[str, float]], lo: str, hi: str, truth: str | float) -> float:
    t = np.array([r[truth] for r in rows]) if isinstance(truth, str) else truth
    low, high = np.array([r[lo] for r in rows]), np.array([r[hi] for r in rows])
    return round(float(np.mean((low <= t) & (t <= high))), 3)


def width(rows: list[dict[str, float]], lo: str, hi: str) -> float:
    return round(float(np.mean([r[hi] - r[lo] for r in rows])), 4)


def run_size(gen: Generator, n: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed + n)
    t0 = time.perf_counter()
    proc, proc_d = procedure_truth(gen, np.random.default_rng(args.seed + 10_000 + n), n - n // FOLDS,
                                   args.truth_fits)
    rows = []
    for r in range(args.reps):
        rows.append(one_cohort(gen, rng, n, args.n_boot, seed=args.seed + r))
        if args.progress and (r + 1) % 100 == 0:
            print(f"  n={n}: {r + 1}/{args.reps} cohorts, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    out = {"n": n, "cohorts": len(rows), "procedure_truth": round(proc, 4),
           "mean_estimate": round(float(np.mean([r["mean"] for r in rows])), 4),
           "mean_final_model_truth": round(float(np.mean([r["final"] for r in rows])), 4),
           "procedure_difference_truth": round(proc_d, 4), "seconds": round(time.perf_counter() - t0, 1),
           "intervals": {}}
    for name, lo, hi in (("ci (bootstrap, models fixed)", "ci_low", "ci_high"),
                         ("ci_t (corrected t, headline)", "ci_t_low", "ci_t_high")):
        out["intervals"][name] = {"covers_procedure": cover(rows, lo, hi, proc),
                                  "covers_these_models": cover(rows, lo, hi, "conditional"),
                                  "covers_final_model": cover(rows, lo, hi, "final"), "mean_width": width(rows, lo, hi)}
    for name, lo, hi in (("compare A-B: DeLong, pooled OOF", "delong_low", "delong_high"),
                         ("compare A-B: corrected paired t (headline)", "t_diff_low", "t_diff_high")):
        out["intervals"][name] = {"covers_procedure": cover(rows, lo, hi, proc_d),
                                  "covers_these_models": cover(rows, lo, hi, "conditional_diff"),
                                  "covers_final_model": None, "mean_width": width(rows, lo, hi)}
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="150,400", help="cohort sizes, comma list")
    ap.add_argument("--reps", type=int, default=1000, help="cohorts per size")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--truth-fits", type=int, default=2000, help="training sets for the procedure truth")
    ap.add_argument("--informative", type=int, default=10)
    ap.add_argument("--bayes-auroc", type=float, default=0.80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100 cohorts, 300 resamples, 500 truth fits")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.n_boot, args.truth_fits = 100, 300, 500
    warnings.simplefilter("ignore", UserWarning)
    gen = Generator(args.informative, args.bayes_auroc)
    t0 = time.perf_counter()
    res = {"settings": {"features": N_FEATURES, "informative": args.informative, "bayes_auroc": args.bayes_auroc,
                        "folds": FOLDS, "model": "sklearn LogisticRegression(C=1)", "compare_b": f"C={C_B}",
                        "reps": args.reps, "n_boot": args.n_boot, "truth_fits": args.truth_fits, "seed": args.seed,
                        "cpu": cpu_name()},
           "sizes": [run_size(gen, int(n), args) for n in args.sizes.split(",")]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{args.reps} cohorts per size, {FOLDS}-fold CV, LogisticRegression(C=1) on {N_FEATURES} features "
          f"({args.informative} informative, Bayes AUROC {args.bayes_auroc}), {args.n_boot} resamples; "
          f"{res['settings']['cpu']}")
    print("| n | interval | covers procedure | covers these models | covers final model | mean width |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in res["sizes"]:
        for name, v in s["intervals"].items():
            fin = "–" if v["covers_final_model"] is None else f"{v['covers_final_model']:.3f}"
            print(f"| {s['n']} | {name} | {v['covers_procedure']:.3f} | {v['covers_these_models']:.3f} | {fin} | "
                  f"{v['mean_width']:.3f} |")
    for s in res["sizes"]:
        print(f"n={s['n']}: procedure AUROC {s['procedure_truth']}, mean CV estimate {s['mean_estimate']}, mean final "
              f"model {s['mean_final_model_truth']}, procedure A-B {s['procedure_difference_truth']} ({s['seconds']}s)")
    print(f"total {res['seconds']}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
