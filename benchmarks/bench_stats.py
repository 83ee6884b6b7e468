"""Simulation check of mmcli's metric intervals and of DeLong's type-I error (issue 12). Not a test.

Survival part: ``--cohorts`` cohorts of ``--n`` patients from a known generator (one covariate x ~ N(0, 1),
exponential event times with hazard ``0.1 * exp(x)``, uniform censoring on [1, 40] months, about 30 %
censored). Each cohort goes through mmcli's procedure: stratified ``--folds``-fold CV, a Cox model on x fitted
per training fold (scikit-survival), risks ``beta_hat * x``, survival curves from mmcli's Breslow baseline,
one shared grid (:func:`mmcli.heads.evaluation.metrics.survival_grid`) and
:func:`mmcli.heads.evaluation.metrics.summarise`
(default 1000 stratified resamples). The true values are the same metrics of the same fold models on a very
large independent sample of the generator (``--big`` patients), with the same grid and the same training-fold
censoring distribution:

* ``conditional`` truth: mean over the cohort's K fold models of their big-sample metric. The bootstrap CI
  (fold models held fixed) targets it.
* ``procedure`` truth: the mean of the conditional truths over all cohorts, i.e. the expected performance of
  the procedure (training included) at this sample size. The corrected t-interval targets it.

Reported: the coverage of both intervals for both truths (c_index = Harrell, ibs, td_auc), their mean widths,
and how many cohorts lost any bootstrap replicate (``n_valid < n_boot``; must be 0: no NaN-subset averaging).
On the big sample, Harrell's c comes from lifelines (computed once: the fold models' risks ``beta_hat * x``
all rank patients like ``x`` when ``beta_hat > 0``); td_auc and ibs from an O(n log n) form of scikit-survival's
definitions (same training-fold censoring weights, same Kaplan-Meier weighting of td_auc), checked at start
against scikit-survival itself on the big sample administratively censored just past the last grid time
(which leaves both metrics unchanged and avoids scikit-survival's refusal of test events after the training
follow-up).

DeLong part: ``--delong-reps`` repetitions per class-size setting of two correlated scores with equal AUROC
(H0 true); the rejection rate at 5 % for mmcli's default reference (t under 10 cases per class) and for the
classical normal reference.

    python benchmarks/bench_stats.py            # full: 200 cohorts, 2000 DeLong repetitions (< 10 min, 1 core)
    python benchmarks/bench_stats.py --quick    # 30 cohorts, 300 resamples, 300 repetitions
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, tiny matrices
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from mmcli.heads.base import BreslowBaseline  # noqa: E402
from mmcli.heads.evaluation.metrics import FoldPredictions, summarise, survival_grid  # noqa: E402
from mmcli.heads.evaluation.stats import delong_test  # noqa: E402

METRICS = ("c_index", "ibs", "td_auc")
BASE_HAZARD, BETA, CENSOR = 0.1, 1.0, (1.0, 40.0)


def generate(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, observed time, event) from the known generator."""
    x = rng.normal(size=n)
    t_event = rng.exponential(1.0 / (BASE_HAZARD * np.exp(BETA * x)))
    c = rng.uniform(*CENSOR, size=n)
    return x, np.minimum(t_event, c), (t_event <= c).astype(int)


def surv_array(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, dtype=np.float64))


def fit_fold(x: np.ndarray, time: np.ndarray, event: np.ndarray) -> tuple[float, BreslowBaseline]:
    """Cox model on one covariate (scikit-survival, Breslow ties) and mmcli's Breslow baseline."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    y = surv_array(time, event)
    beta = float(CoxPHSurvivalAnalysis().fit(x[:, None], y).coef_[0])
    y_mm = np.empty(len(time), dtype=[("time", "f8"), ("event", "?")])
    y_mm["time"], y_mm["event"] = time, event.astype(bool)
    return beta, BreslowBaseline().fit(beta * x, y_mm)


class BigSample:
    """The large independent sample and what does not depend on the fold model."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        from lifelines.utils import concordance_index
        from sksurv.nonparametric import kaplan_meier_estimator

        self.x, self.t, self.e = generate(rng, n)
        c = float(concordance_index(self.t, -self.x, self.e))
        self.harrell = {1.0: c, -1.0: 1.0 - c}  # by the sign of beta_hat (no ties in x)
        self.km_t, self.km_s = kaplan_meier_estimator(self.e.astype(bool), self.t)

    def km(self, at: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.km_t, at, side="right") - 1
        return np.where(i >= 0, self.km_s[np.maximum(i, 0)], 1.0)

    def truth(self, beta: float, baseline: BreslowBaseline, grid: np.ndarray, train_time: np.ndarray,
              train_event: np.ndarray) -> dict[str, float]:
        """The fold model's metrics on the big sample, as mmcli (scikit-survival) defines them for a fold."""
        from sksurv.nonparametric import CensoringDistributionEstimator

        t, e, risk = self.t, self.e.astype(bool), beta * self.x
        cens = CensoringDistributionEstimator().fit(surv_array(train_time, train_event))
        g_t = cens.predict_proba(grid)
        g_i = cens.predict_proba(np.minimum(t, grid[-1]))
        auc = np.empty(len(grid))
        for k, tk in enumerate(grid):
            case, ctrl = e & (t <= tk), t > tk
            sc = np.sort(risk[ctrl])
            below = np.searchsorted(sc, risk[case], side="left")
            tied = np.searchsorted(sc, risk[case], side="right") - below
            w = 1.0 / g_i[case]
            auc[k] = float(np.sum(w * (below + 0.5 * tied)) / (w.sum() * ctrl.sum()))
        s = self.km(grid)
        drop = -np.diff(np.r_[1.0, s])
        surv = baseline.survival(risk, grid)
        case = e[:, None] & (t[:, None] <= grid[None, :])
        ctrl = t[:, None] > grid[None, :]
        inv = np.where(e & (t <= grid[-1]), 1.0 / g_i, 0.0)
        bs = np.mean(surv ** 2 * case * inv[:, None] + (1 - surv) ** 2 * ctrl / g_t[None, :], axis=0)
        return {"c_index": self.harrell[float(np.sign(beta))],
                "td_auc": float(np.sum(auc * drop) / (1 - s[-1])),
                "ibs": float(np.trapezoid(bs, grid) / (grid[-1] - grid[0]))}

    def check_against_sksurv(self, beta: float, baseline: BreslowBaseline, grid: np.ndarray,
                             train_time: np.ndarray, train_event: np.ndarray) -> float:
        """Largest |difference| between :meth:`truth` and scikit-survival (and lifelines) on this sample."""
        from lifelines.utils import concordance_index
        from sksurv.metrics import cumulative_dynamic_auc, integrated_brier_score

        mine = self.truth(beta, baseline, grid, train_time, train_event)
        risk = beta * self.x
        cut = 0.5 * (grid[-1] + train_time.max())  # administrative censoring past the grid: metrics unchanged
        y_big = surv_array(np.minimum(self.t, cut), (self.e == 1) & (self.t <= cut))
        y_train = surv_array(train_time, train_event)
        ref = {"c_index": float(concordance_index(self.t, -risk, self.e)),
               "td_auc": float(cumulative_dynamic_auc(y_train, y_big, risk, grid)[1]),
               "ibs": float(integrated_brier_score(y_train, y_big, baseline.survival(risk, grid), grid))}
        return max(abs(mine[k] - ref[k]) for k in METRICS)


def one_cohort(rng: np.random.Generator, n: int, folds: int, n_boot: int, big: BigSample,
               seed: int, check: bool = False) -> dict[str, dict[str, float]] | None:
    from sklearn.model_selection import StratifiedKFold

    x, t, e = generate(rng, n)
    if e.sum() < folds or (1 - e).sum() < folds:
        return None
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, e))
    grid = survival_grid(t, e, [te for _, te in splits])
    if len(grid) < 2:
        return None
    fold_preds, truths = [], []
    for tr, te in splits:
        beta, baseline = fit_fold(x[tr], t[tr], e[tr])
        risk = beta * x[te]
        fold_preds.append(FoldPredictions(time=t[te], event=e[te], risk=risk, surv=baseline.survival(risk, grid),
                                          times=grid, train_time=t[tr], train_event=e[tr]))
        truths.append(big.truth(beta, baseline, grid, t[tr], e[tr]))
        if check:
            gap = big.check_against_sksurv(beta, baseline, grid, t[tr], e[tr])
            if gap > 1e-8:
                raise AssertionError(f"big-sample truth differs from scikit-survival/lifelines by {gap:.2e}")
            check = False
    s = summarise(fold_preds, n_boot=n_boot, seed=seed)
    out = {}
    for k in (*METRICS, "c_index_uno"):
        out[k] = {f: s[k][f] for f in ("mean", "ci_low", "ci_high", "ci_t_low", "ci_t_high", "n_valid")}
        if k in METRICS:
            out[k]["truth"] = float(np.mean([tr_[k] for tr_ in truths]))
    return out


def survival_benchmark(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    big = BigSample(np.random.default_rng(args.seed + 10_000), args.big)
    rows, skipped = [], 0
    for c in range(args.cohorts):
        r = one_cohort(rng, args.n, args.folds, args.n_boot, big, seed=args.seed + c, check=c == 0)
        if r is None:
            skipped += 1
            continue
        rows.append(r)
        if args.progress and (c + 1) % 20 == 0:
            print(f"  {c + 1}/{args.cohorts} cohorts, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    lost = sum(any(r[k]["n_valid"] != args.n_boot for k in r) for r in rows)
    undefined = sum(any(r[k]["ci_low"] is None or r[k]["ci_t_low"] is None for k in METRICS) for r in rows)
    res: dict = {"cohorts": len(rows), "skipped_cohorts": skipped, "n": args.n, "folds": args.folds,
                 "n_boot": args.n_boot, "big_sample": args.big,
                 "cohorts_with_lost_replicates": lost, "cohorts_with_undefined_interval": undefined,
                 "seconds": round(time.perf_counter() - t0, 1), "metrics": {}}
    for k in METRICS:
        ok = [r[k] for r in rows if r[k]["ci_low"] is not None and r[k]["ci_t_low"] is not None]
        cond = np.array([r["truth"] for r in ok])
        proc = float(cond.mean())
        boot = np.array([(r["ci_low"], r["ci_high"]) for r in ok])
        tint = np.array([(r["ci_t_low"], r["ci_t_high"]) for r in ok])
        est = np.array([r["mean"] for r in ok])

        def cover(iv: np.ndarray, truth: np.ndarray | float) -> float:
            return round(float(np.mean((iv[:, 0] <= truth) & (truth <= iv[:, 1]))), 3)

        res["metrics"][k] = {
            "procedure_truth": round(proc, 4), "mean_estimate": round(float(est.mean()), 4),
            "bootstrap_ci": {"covers_conditional": cover(boot, cond), "covers_procedure": cover(boot, proc),
                             "mean_width": round(float(np.mean(boot[:, 1] - boot[:, 0])), 4)},
            "t_interval": {"covers_conditional": cover(tint, cond), "covers_procedure": cover(tint, proc),
                           "mean_width": round(float(np.mean(tint[:, 1] - tint[:, 0])), 4)},
        }
    return res


def delong_benchmark(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed + 1)
    out = {"repetitions": args.delong_reps, "alpha": 0.05, "settings": []}
    for m, n in ((3, 3), (5, 5), (10, 10), (3, 37), (5, 35), (10, 30)):
        y = np.r_[np.ones(m, int), np.zeros(n, int)]
        rej = {"default": 0, "normal": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(args.delong_reps):
                base = y + rng.normal(size=m + n)  # two equally good scores, correlated through ``base``
                a, b = base + rng.normal(size=m + n), base + rng.normal(size=m + n)
                rej["default"] += delong_test(y, a, b).p_value < 0.05
                rej["normal"] += delong_test(y, a, b, reference="normal").p_value < 0.05
        out["settings"].append({"positives": m, "negatives": n,
                                "type1_default": round(rej["default"] / args.delong_reps, 4),
                                "type1_normal": round(rej["normal"] / args.delong_reps, 4)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, default=200)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--big", type=int, default=50_000, help="size of the independent sample giving the truth")
    ap.add_argument("--delong-reps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="30 cohorts, 300 resamples, 300 DeLong repetitions")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.cohorts, args.n_boot, args.delong_reps = 30, 300, 300
    t0 = time.perf_counter()
    res = {"survival": survival_benchmark(args), "delong": delong_benchmark(args)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    s = res["survival"]
    print(f"survival: {s['cohorts']} cohorts (n={s['n']}, {s['folds']} folds, {s['n_boot']} resamples), "
          f"cohorts with lost replicates: {s['cohorts_with_lost_replicates']}, "
          f"with an undefined interval: {s['cohorts_with_undefined_interval']}")
    print(f"  {'metric':<8} {'truth':>7} {'estim.':>7} | {'boot CI: cond':>13} {'proc':>6} {'width':>6} | "
          f"{'t-int: cond':>11} {'proc':>6} {'width':>6}")
    for k, v in s["metrics"].items():
        b, t = v["bootstrap_ci"], v["t_interval"]
        print(f"  {k:<8} {v['procedure_truth']:>7.4f} {v['mean_estimate']:>7.4f} | {b['covers_conditional']:>13.3f} "
              f"{b['covers_procedure']:>6.3f} {b['mean_width']:>6.3f} | {t['covers_conditional']:>11.3f} "
              f"{t['covers_procedure']:>6.3f} {t['mean_width']:>6.3f}")
    d = res["delong"]
    print(f"DeLong type-I error at 5 % ({d['repetitions']} null repetitions each):")
    for row in d["settings"]:
        print(f"  {row['positives']:>3} pos / {row['negatives']:>3} neg: default {row['type1_default']:.3f}   "
              f"normal reference {row['type1_normal']:.3f}")
    print(f"total {res['seconds']}s")
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
