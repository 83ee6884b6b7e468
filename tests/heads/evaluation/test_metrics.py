"""Metric values against scikit-learn / lifelines / scikit-survival on fixed inputs; the bootstrap summary."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    roc_auc_score,
)
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from mmcli.heads.evaluation.metrics import (
    CLASSIFICATION_METRICS,
    GRID_METRICS,
    SURVIVAL_METRICS,
    FoldPredictions,
    auroc,
    center_risks_by_fold,
    classification_metrics,
    corrected_t_interval,
    eval_times,
    summarise,
    survival_grid,
    survival_metrics,
)

Y_BIN = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
P_POS = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.55, 0.7, 0.3])


def test_the_one_auroc_equals_scikit_learn_with_ties_and_is_nan_for_one_class():
    rng = np.random.default_rng(4)
    for n in (5, 40, 300):
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        s = rng.integers(0, 6, n).astype(float)  # many ties
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        w = np.ones((1, n))
        from mmcli.heads.evaluation.metrics import _weighted_auc

        assert _weighted_auc(w, y == 1, s)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc(np.ones(4, int), np.arange(4.0)))


def test_summarise_names_its_headline_interval():
    rng = np.random.default_rng(0)
    folds = []
    for _ in range(3):
        y = rng.integers(0, 2, 40)
        p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 40), 0.01, 0.99)
        folds.append(FoldPredictions(y=y, probs=np.c_[1 - p, p]))
    cv = summarise(folds, n_boot=50)
    one = summarise(folds[:1], n_boot=50)
    assert {m["headline"] for m in cv.values()} == {"ci_t"} and {m["headline"] for m in one.values()} == {"ci"}
    assert cv["auroc"]["interval"]["headline"].startswith("ci_t")
    assert one["auroc"]["interval"]["headline"].startswith("ci:")
    assert one["auroc"]["ci_t_low"] is None  # no t-interval over one value


def test_binary_metrics_match_sklearn_and_hand_checked_values():
    m = classification_metrics(Y_BIN, np.stack([1 - P_POS, P_POS], 1))
    assert list(m) == list(CLASSIFICATION_METRICS)
    assert m["auroc"] == pytest.approx(roc_auc_score(Y_BIN, P_POS))
    assert m["auroc"] == pytest.approx(23 / 25)  # 2 of the 25 positive/negative pairs are mis-ordered
    assert m["auprc"] == pytest.approx(average_precision_score(Y_BIN, P_POS))
    pred = (P_POS > 0.5).astype(int)
    assert m["f1_macro"] == pytest.approx(f1_score(Y_BIN, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_BIN, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(Y_BIN, P_POS))
    assert m["brier"] == pytest.approx(np.mean((P_POS - Y_BIN) ** 2))


def test_multiclass_metrics_are_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 2], 8)
    p = rng.dirichlet(np.ones(3), size=len(y)) + np.eye(3)[y] * 0.3
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p)
    onehot = np.eye(3)[y]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["auprc"] == pytest.approx(np.mean([average_precision_score(onehot[:, k], p[:, k]) for k in range(3)]))
    assert m["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    # Stated convention: mean of the one-vs-rest Brier scores (= sum over classes / K).
    assert m["brier"] == pytest.approx(np.mean([brier_score_loss(onehot[:, k], p[:, k]) for k in range(3)]))
    assert m["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)) / 3)


def test_undefined_metric_is_nan_not_an_exception():
    m = classification_metrics(np.zeros(4, int), np.tile([0.7, 0.3], (4, 1)))
    assert np.isnan(m["auroc"]) and np.isfinite(m["brier"])


@pytest.fixture
def surv_data():
    rng = np.random.default_rng(1)
    n = 80
    risk = rng.normal(size=n)
    t = rng.exponential(20 / np.exp(risk))
    c = rng.uniform(5, 40, size=n)
    time, event = np.minimum(t, c), (t <= c).astype(int)
    return time[:50], event[:50], time[50:], event[50:], risk[50:]


def test_survival_metrics_match_lifelines_and_sksurv(surv_data):
    tr_t, tr_e, t, e, r = surv_data
    times = eval_times(tr_t, tr_e, t)
    assert len(times) >= 2 and times.min() > t.min() and times.max() < min(t.max(), tr_t.max())
    surv = np.exp(-np.outer(np.exp(r), times / 20))
    m = survival_metrics(t, e, r, train_time=tr_t, train_event=tr_e, surv=surv, times=times)
    # Harrell: lifelines scores "higher = longer survival", so risk enters with a minus sign.
    assert m["c_index"] == pytest.approx(concordance_index(t, -r, e))
    assert m["c_index"] > 0.6
    y_tr, y_te = Surv.from_arrays(tr_e.astype(bool), tr_t), Surv.from_arrays(e.astype(bool), t)
    assert m["c_index_uno"] == pytest.approx(concordance_index_ipcw(y_tr, y_te, r, tau=times[-1])[0])
    assert m["td_auc"] == pytest.approx(cumulative_dynamic_auc(y_tr, y_te, r, times)[1])
    assert m["ibs"] == pytest.approx(integrated_brier_score(y_tr, y_te, surv, times))
    flipped = survival_metrics(t, e, -r)
    assert flipped["c_index"] == pytest.approx(1 - m["c_index"], abs=0.02)


def test_summarise_reports_fold_mean_bootstrap_ci_and_per_fold():
    rng = np.random.default_rng(2)
    folds = []
    for _ in range(4):
        y = rng.integers(0, 2, 30)
        p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 30), 0.01, 0.99)
        folds.append(FoldPredictions(y=y, probs=np.stack([1 - p, p], 1)))
    s = summarise(folds, n_boot=60, seed=0)
    assert s == summarise(folds, n_boot=60, seed=0)  # seeded
    for name, d in s.items():
        per_fold = [f.metrics()[name] for f in folds]
        assert d["per_fold"] == pytest.approx(per_fold)
        assert d["mean"] == pytest.approx(np.mean(per_fold))
        assert d["ci_low"] < d["mean"] < d["ci_high"], name
    assert s["auroc"]["ci_high"] - s["auroc"]["ci_low"] < 0.3
    json.dumps(s, allow_nan=False)


def test_summarise_turns_undefined_values_into_null():
    """Changed with issue 12: each metric gained fields (n_valid, ci_t_*, interval), so the four original keys
    are compared as a subset instead of the whole dict; the new fields are checked too."""
    folds = [FoldPredictions(y=np.zeros(5, int), probs=np.tile([0.6, 0.4], (5, 1))),
             FoldPredictions(y=np.zeros(5, int), probs=np.tile([0.6, 0.4], (5, 1)))]
    s = summarise(folds, n_boot=10)
    assert {k: s["auroc"][k] for k in ("mean", "ci_low", "ci_high", "per_fold")} == {
        "mean": None, "ci_low": None, "ci_high": None, "per_fold": [None, None]}
    assert (s["auroc"]["n_valid"], s["auroc"]["ci_t_low"], s["auroc"]["ci_t_high"]) == (0, None, None)
    json.dumps(s, allow_nan=False)


# ---- issue 12: the weighted (bootstrap) forms equal the library metrics ------------------------------------
@pytest.mark.parametrize("K", [2, 3])
def test_weighted_classification_equals_sklearn_on_resamples(K):
    """Each replicate is a vector of multiplicities; the metric on it must equal sklearn on the duplicated rows
    (ties in the scores included)."""
    rng = np.random.default_rng(K)
    for _ in range(15):
        y = np.r_[np.arange(K), rng.integers(0, K, 27)]
        p = np.round(rng.dirichlet(np.ones(K), len(y)), 1) + 1e-3 * np.arange(K)
        p /= p.sum(1, keepdims=True)
        fold = FoldPredictions(y=y, probs=p)
        for rows in (None, rng.integers(0, len(y), len(y))):
            got = fold.metrics(rows)
            r = np.arange(len(y)) if rows is None else rows
            ref = classification_metrics(y[r], p[r])
            assert got == pytest.approx(ref, abs=1e-12, nan_ok=True)


def _cohort(n, seed, censor=(2.0, 30.0), ties=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_ev = rng.exponential(10 * np.exp(-x))
    c = rng.uniform(*censor, n)
    time, event = np.minimum(t_ev, c), (t_ev <= c).astype(int)
    if ties:
        time = np.round(time, 0) + 0.5
    return x, time, event


def test_weighted_survival_equals_lifelines_and_sksurv_on_stratified_resamples():
    """Harrell (lifelines), Uno, td-AUC and IBS (scikit-survival) on the full fold and on stratified resamples
    (duplicated rows), with tied times and tied risks; every stratified resample is defined for sksurv too."""
    rng = np.random.default_rng(5)
    for seed in range(6):
        x, time, event = _cohort(70, seed, ties=seed % 2 == 1)
        # the longest follow-up goes to training: sksurv refuses a test event after the training follow-up
        rest = np.delete(np.arange(70), np.argmax(time))
        tr, te = np.r_[np.argmax(time), rest[:44]], rest[44:]
        grid = survival_grid(time, event, [te])
        risk = np.round(x[te] + rng.normal(0, 0.5, len(te)), 1)
        surv = np.exp(-np.outer(np.exp(risk), grid / 10))
        fold = FoldPredictions(time=time[te], event=event[te], risk=risk, surv=surv, times=grid,
                               train_time=time[tr], train_event=event[tr])
        W = fold.resample(rng, 8)
        for w in np.vstack([np.ones(len(te)), W]):
            rows = np.repeat(np.arange(len(te)), w.astype(int))
            got = fold.replicate_metrics(w[None])
            ref = survival_metrics(time[te][rows], event[te][rows], risk[rows], train_time=time[tr],
                                   train_event=event[tr], surv=surv[rows], times=grid)
            for k in SURVIVAL_METRICS:
                assert np.isfinite(ref[k]), (seed, k)
                assert got[k][0] == pytest.approx(ref[k], abs=1e-10), (seed, k)


# ---- issue 12: survival summary with known answers -----------------------------------------------------------
def _survival_folds(time, event, risk, surv_fn, k=5, seed=0):
    idx = np.random.default_rng(seed).permutation(len(time))
    tests = np.array_split(idx, k)
    grid = survival_grid(time, event, tests)
    folds = []
    for te in tests:
        tr = np.setdiff1d(idx, te)
        folds.append(FoldPredictions(time=time[te], event=event[te], risk=risk[te], surv=surv_fn(te, grid),
                                     times=grid, train_time=time[tr], train_event=event[tr]))
    return folds, grid


def test_survival_summary_of_perfect_predictions_is_exact_in_every_replicate():
    """No censoring, risk = -time, survival curves = the true step functions: c = Uno = td-AUC = 1 and IBS = 0 in
    every fold and every replicate, so the intervals collapse onto them and no replicate is lost."""
    rng = np.random.default_rng(0)
    time = rng.exponential(10, 60) + 0.01
    event = np.ones(60, int)
    folds, grid = _survival_folds(time, event, -time, lambda te, g: (time[te][:, None] > g[None, :]).astype(float))
    s = summarise(folds, n_boot=300, seed=1)
    for k, want in {"c_index": 1.0, "c_index_uno": 1.0, "td_auc": 1.0, "ibs": 0.0}.items():
        assert s[k]["per_fold"] == pytest.approx([want] * 5, abs=1e-12), k
        assert (s[k]["mean"], s[k]["ci_low"], s[k]["ci_high"]) == pytest.approx((want,) * 3, abs=1e-12), k
        assert s[k]["n_valid"] == s[k]["n_boot"] == 300, k
    flipped = summarise(_survival_folds(time, event, time, lambda te, g: np.full((len(te), len(g)), 0.5))[0],
                        n_boot=50)
    assert flipped["c_index"]["mean"] == pytest.approx(0.0)
    # S(t) = 1/2 for everyone, no censoring: the Brier score is 1/4 at every time, whatever happens
    assert (flipped["ibs"]["mean"], flipped["ibs"]["ci_low"], flipped["ibs"]["ci_high"]) == pytest.approx((0.25,) * 3)


def test_survival_bootstrap_has_no_undefined_replicates_in_small_folds():
    """The audit's failing case (n=30, K=5: td_auc NaN in 40 % of fold replicates): now every replicate of every
    metric is defined, and the CI brackets the mean."""
    x, time, event = _cohort(30, 3)
    folds, _ = _survival_folds(time, event, x, lambda te, g: np.exp(-np.outer(np.exp(x[te]), g / 10)))
    s = summarise(folds, n_boot=1000, seed=0)
    for k in SURVIVAL_METRICS:
        assert s[k]["n_valid"] == 1000, k
        assert s[k]["ci_low"] <= s[k]["mean"] <= s[k]["ci_high"], k
    json.dumps(s, allow_nan=False)


def test_survival_grid_is_shared_covers_follow_up_and_is_recorded():
    x, time, event = _cohort(120, 4)
    folds, grid = _survival_folds(time, event, x, lambda te, g: np.exp(-np.outer(np.exp(x[te]), g / 10)))
    assert len(grid) == 10 and np.all(np.diff(grid) > 0)
    assert grid[-1] <= np.percentile(time, 80) + 1e-12
    assert grid[0] == pytest.approx(max(f.time[f.event == 1].min() for f in folds))
    for f in folds:  # every fold has a case at the first grid time and a control past the last one
        assert (f.event[f.time <= grid[0]] == 1).any() and (f.time > grid[-1]).any()
    s = summarise(folds, n_boot=20)
    for k in GRID_METRICS:
        assert s[k]["eval_times"] == pytest.approx(grid.tolist())
    assert "eval_times" not in s["c_index"]
    folds[1] = FoldPredictions(time=folds[1].time, event=folds[1].event, risk=folds[1].risk,
                               surv=folds[1].surv[:, :-1], times=grid[:-1], train_time=folds[1].train_time,
                               train_event=folds[1].train_event)
    with pytest.raises(ValueError, match="share one evaluation grid"):
        summarise(folds, n_boot=5)
    assert len(survival_grid(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 0]))) == 0  # no event: no grid


def test_an_undefined_fold_makes_the_metric_undefined_not_a_subset_mean():
    good = FoldPredictions(y=np.array([0, 1, 0, 1]), probs=np.tile([0.5, 0.5], (4, 1)) + [[0.1, -0.1]] * 4)
    one_class = FoldPredictions(y=np.zeros(4, int), probs=np.tile([0.6, 0.4], (4, 1)))
    s = summarise([good, one_class], n_boot=50)
    assert s["auroc"]["per_fold"][0] is not None and s["auroc"]["per_fold"][1] is None
    assert (s["auroc"]["mean"], s["auroc"]["ci_low"], s["auroc"]["n_valid"]) == (None, None, 0)
    assert s["brier"]["mean"] is not None and s["brier"]["n_valid"] == 50


def test_classification_resampling_is_stratified_by_class():
    """4 patients per fold, one positive: unstratified, 1/3 of replicates would lack it (old NaN mixing)."""
    rng = np.random.default_rng(0)
    folds = []
    for _ in range(4):
        y = np.array([1, 0, 0, 0])
        p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 4), 0.01, 0.99)
        folds.append(FoldPredictions(y=y, probs=np.stack([1 - p, p], 1)))
    W = folds[0].resample(rng, 200)
    assert (W[:, 0] == 1).all() and (W[:, 1:].sum(1) == 3).all()
    s = summarise(folds, n_boot=200)
    assert all(s[k]["n_valid"] == 200 for k in s)


def test_corrected_t_interval_against_hand_computation():
    v = [0.70, 0.80, 0.75, 0.65, 0.90]
    sizes = [24, 24, 24, 24, 24]
    # mean 0.76, sample variance 0.00925, (1/5 + 24/96) = 0.45, t(4, 0.975) = 2.7764451051977987
    half = 2.7764451051977987 * np.sqrt(0.45 * 0.00925)
    assert corrected_t_interval(v, sizes) == pytest.approx((0.76 - half, 0.76 + half), abs=1e-12)
    lo, hi = corrected_t_interval(v, [10, 20, 30, 20, 20])  # ratio = mean(n_k / (100 - n_k))
    ratio = np.mean([10 / 90, 20 / 80, 30 / 70, 20 / 80, 20 / 80])
    assert hi - lo == pytest.approx(2 * 2.7764451051977987 * np.sqrt((0.2 + ratio) * 0.00925), abs=1e-12)
    assert corrected_t_interval([0.9, 1.0, 0.95], [10, 10, 10])[1] == 1.0  # clipped to the metric's range
    assert np.isnan(corrected_t_interval([0.7, np.nan, 0.8], [10, 10, 10])[0])
    folds = [FoldPredictions(y=np.array([0, 1] * 12), probs=np.stack([1 - p, p], 1))
             for p in (np.linspace(0.1, 0.9, 24), np.linspace(0.9, 0.1, 24), np.r_[[0.2, 0.7] * 12])]
    s = summarise(folds, n_boot=20)
    want = corrected_t_interval(s["auroc"]["per_fold"], [24, 24, 24])
    assert (s["auroc"]["ci_t_low"], s["auroc"]["ci_t_high"]) == pytest.approx(want)
    assert "Nadeau" in s["auroc"]["interval"]["ci_t"] and "held fixed" in s["auroc"]["interval"]["ci"]


def test_center_risks_by_fold_removes_fold_offsets_only():
    rng = np.random.default_rng(1)
    x, time, event = _cohort(100, 2)
    fold = np.arange(100) % 4
    offset = np.array([-3.0, 0.5, 4.0, 9.0])[fold]  # arbitrary per-model offsets (Cox is shift-invariant)
    risk = x + rng.normal(0, 0.3, 100)
    pred = pd.DataFrame({"patient_id": [f"P{i}" for i in range(100)], "fold": fold, "time": time,
                         "event": event, "risk": risk + offset})
    out = center_risks_by_fold(pred)
    assert out.groupby("fold")["risk"].mean().abs().max() < 1e-12
    for f in range(4):  # within-fold rankings unchanged
        m = fold == f
        assert (np.argsort(out["risk"][m].to_numpy()) == np.argsort(pred["risk"][m].to_numpy())).all()
    centred_truth = risk - pd.Series(risk).groupby(fold).transform("mean").to_numpy()
    assert out["risk"].to_numpy() == pytest.approx(centred_truth)
    pooled_raw = concordance_index(time, -pred["risk"], event)
    pooled = concordance_index(time, -out["risk"], event)
    assert pooled > pooled_raw + 0.1 and pooled == pytest.approx(concordance_index(time, -centred_truth, event))
    assert center_risks_by_fold(out)["risk"].to_numpy() == pytest.approx(out["risk"].to_numpy())  # idempotent
    assert pred["risk"].to_numpy() == pytest.approx(risk + offset)  # input untouched


def test_summarise_is_fast_at_the_default_resamples():
    """1000 resamples of a 120-patient, 5-fold survival CV stay well under a few seconds (vectorised)."""
    import time as _time

    x, time, event = _cohort(120, 6)
    folds, _ = _survival_folds(time, event, x, lambda te, g: np.exp(-np.outer(np.exp(x[te]), g / 10)))
    t0 = _time.perf_counter()
    s = summarise(folds)
    assert s["td_auc"]["n_boot"] == 1000 and _time.perf_counter() - t0 < 20
