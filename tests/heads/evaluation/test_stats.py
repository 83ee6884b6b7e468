"""DeLong and paired bootstrap: checked against R pROC's documented example, a brute-force computation of the
structural components, a large bootstrap, and the null distribution of p-values."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from lifelines.utils import concordance_index
from scipy.stats import mannwhitneyu
from scipy.stats import t as t_dist
from sklearn.metrics import roc_auc_score

from mmcli.heads.evaluation.stats import (
    auroc,
    auroc_bootstrap,
    cindex_bootstrap,
    corrected_t_test,
    delong_covariance,
    delong_test,
    paired_bootstrap,
    percentile_interval_and_p,
)

# pROC's aSAH data set (Turck et al. 2010, Intensive Care Med 36:107; 113 patients, shipped with R pROC),
# y = outcome == "Poor". pROC's documentation of roc.test() prints for roc(outcome, s100b) vs roc(outcome, wfns):
# "Z = -2.209, p-value = 0.02718 ... AUC of roc1 0.7313686, AUC of roc2 0.8236789"; auc(outcome, ndka) = 0.612.
ASAH_Y = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0,
    0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0,
    0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0,
    0,
]  # fmt: skip
ASAH_S100B = [
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71,
    0.04, 0.08, 0.49, 0.04, 0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11,
    0.13, 0.19, 0.05, 0.16, 0.41, 0.14, 0.34, 0.35, 0.48, 0.09, 0.96, 0.25, 0.5, 0.46,
    0.16, 0.07, 0.43, 0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1,
    0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09,
    0.27, 0.71, 0.08, 0.26, 0.08, 0.16, 0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28,
    0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24, 0.38, 0.1, 0.15, 0.08, 0.14, 0.1, 0.07,
    0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.5,
    0.48,
]  # fmt: skip
ASAH_WFNS = [
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2,
    1, 1, 3, 4, 2, 1, 4, 5, 4, 1, 4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1,
    2, 2, 2, 1, 5, 1, 1, 2, 5, 2, 1, 4, 5, 2, 4, 4, 1, 4, 1, 2, 1, 4, 2, 1, 2, 3, 2, 4,
    2, 1, 4, 5, 1, 1, 5, 4, 2, 2, 1, 1, 1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4, 4, 5, 1, 1,
    1,
]  # fmt: skip
ASAH_NDKA = [
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6.0, 13.2, 15.54, 6.01, 15.96, 17.86, 5.18,
    8.9, 13.41, 20.75, 11.6, 16.11, 32.37, 54.82, 32.41, 49.94, 40.34, 9.47, 6.29,
    12.53, 6.54, 6.3, 80.3, 12.8, 9.8, 9.81, 9.85, 18.21, 5.03, 14.04, 21.93, 8.02,
    7.42, 8.38, 6.59, 9.63, 13.12, 7.96, 14.34, 41.43, 7.63, 7.06, 12.59, 13.56, 3.87,
    9.44, 7.66, 12.98, 419.19, 27.19, 22.27, 9.95, 21.22, 11.73, 10.4, 58.83, 6.39,
    11.09, 12.22, 13.67, 17.21, 22.63, 12.9, 9.7, 21.57, 8.23, 72.57, 15.54, 10.51,
    10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44, 11.07, 19.46, 10.83, 5.37,
    11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9, 46.83, 11.68, 12.67, 9.01, 9.57,
    34.06, 11.72, 14.26, 47.61, 11.67, 24.58, 10.33, 13.87, 15.89, 22.43, 6.79, 13.45,
]  # fmt: skip


def test_delong_reproduces_proc_documented_asah_example() -> None:
    y = np.array(ASAH_Y)
    assert (len(y), int(y.sum())) == (113, 41)
    r = delong_test(y, ASAH_S100B, ASAH_WFNS)
    assert r.auc_a == pytest.approx(0.7313686, abs=5e-8)
    assert r.auc_b == pytest.approx(0.8236789, abs=5e-8)
    assert r.z == pytest.approx(-2.209, abs=5e-4)
    assert r.p_value == pytest.approx(0.02718, abs=5e-6)
    assert (r.n_positive, r.n_negative) == (41, 72)
    assert r.ci_low < r.difference < r.ci_high < 0  # significant at 5 %: the Wald CI excludes 0
    assert auroc(y, ASAH_NDKA) == pytest.approx(0.612, abs=5e-4)


def _brute_force(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's definition directly: psi(x, z) = 1 if x > z, 1/2 if tied, 0 otherwise, over all m*n pairs."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    v10 = np.empty_like(pos)
    v01 = np.empty_like(neg)
    for r in range(scores.shape[0]):
        psi = (pos[r][:, None] > neg[r][None, :]) + 0.5 * (pos[r][:, None] == neg[r][None, :])
        v10[r], v01[r] = psi.mean(axis=1), psi.mean(axis=0)
    return v10.mean(axis=1), np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_equals_brute_force_with_ties_and_sklearn_auc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    a = np.round(0.8 * y + rng.normal(0, 1, 150), 1)  # rounding forces ties within and across classes
    b = np.round(0.5 * a + rng.normal(0, 1, 150), 0)
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    ref_aucs, ref_cov = _brute_force(y, np.vstack([a, b]))
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)
    assert aucs[0] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert aucs[1] == pytest.approx(roc_auc_score(y, b), abs=1e-12)


def test_delong_variance_matches_a_large_bootstrap() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(120, int), np.ones(80, int)]
    a = y + rng.normal(0, 1.2, 200)
    b = 0.6 * a + rng.normal(0, 0.9, 200)
    r = delong_test(y, a, b)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(2000):  # stratified bootstrap with scipy's Mann-Whitney U, independent of the midrank code
        ip, ineg = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        ua = mannwhitneyu(a[ip], a[ineg], method="asymptotic").statistic
        ub = mannwhitneyu(b[ip], b[ineg], method="asymptotic").statistic
        diffs.append((ua - ub) / (len(pos) * len(neg)))
    assert np.std(diffs, ddof=1) == pytest.approx(r.se, rel=0.1)


def test_delong_p_values_are_uniform_under_the_null() -> None:
    rng = np.random.default_rng(7)
    ps = []
    for _ in range(300):  # two equally good, correlated scores: H0 holds
        y = rng.integers(0, 2, 80)
        base = 0.7 * y + rng.normal(0, 1, 80)
        ps.append(delong_test(y, base + rng.normal(0, 0.7, 80), base + rng.normal(0, 0.7, 80)).p_value)
    ps = np.asarray(ps)
    assert 0.02 <= np.mean(ps < 0.05) <= 0.09  # nominal 5 % type-I error
    assert 0.4 <= np.median(ps) <= 0.6


def test_delong_identical_scores_and_bad_input() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.8, 0.3, 0.7, 0.2, 0.4])
    r = delong_test(y, s, s)
    assert (r.difference, r.z, r.p_value) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="both classes"):
        delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="0/1"):
        delong_test([0, 2, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="does not match"):
        delong_test([0, 1, 1], [0.1, 0.2], [0.3, 0.2])


def _survival(seed: int, n: int = 120) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = rng.exponential(np.exp(-x)) * 12  # months; higher x = shorter survival
    event = (rng.random(n) < 0.7).astype(int)
    return time, event, x + rng.normal(0, 0.3, n), x + rng.normal(0, 2.0, n)


def test_cindex_bootstrap_is_deterministic_and_sensible() -> None:
    t, e, good, poor = _survival(0)
    r1 = cindex_bootstrap(t, e, good, poor, n_boot=300, seed=5)
    r2 = cindex_bootstrap(t, e, good, poor, n_boot=300, seed=5)
    r3 = cindex_bootstrap(t, e, good, poor, n_boot=300, seed=6)
    assert r1 == r2 and r1 != r3
    assert r1.estimate_a == pytest.approx(concordance_index(t, -good, e))
    assert r1.estimate_b == pytest.approx(concordance_index(t, -poor, e))
    assert r1.difference > 0 and r1.ci_low > 0 and r1.p_value < 0.01 and r1.n_valid == 300
    same = cindex_bootstrap(t, e, good, good, n_boot=50, seed=0)
    assert same.difference == 0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="no observed events"):
        cindex_bootstrap(t, np.zeros_like(e), good, poor, n_boot=10)


def test_bootstrap_is_antisymmetric_and_keeps_strata() -> None:
    t, e, good, poor = _survival(1)
    ab = cindex_bootstrap(t, e, good, poor, n_boot=200, seed=0)
    ba = cindex_bootstrap(t, e, poor, good, n_boot=200, seed=0)
    assert ba.difference == pytest.approx(-ab.difference)
    assert (ba.ci_low, ba.ci_high) == pytest.approx((-ab.ci_high, -ab.ci_low))
    assert ba.p_value == pytest.approx(ab.p_value)
    seen: list[int] = []
    strata = np.r_[np.zeros(5, int), np.ones(20, int)]
    paired_bootstrap(lambda i: seen.append(int((i < 5).sum())) or 0.0, lambda i: 0.0, 25,
                     n_boot=20, strata=strata)
    assert set(seen) == {5}  # every resample keeps 5 rows of the small stratum


def test_auroc_bootstrap_binary_and_macro() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 150)
    onehot = np.eye(3)[y]
    good = onehot * 2 + rng.normal(0, 1, (150, 3))
    poor = onehot * 0.3 + rng.normal(0, 1, (150, 3))
    good, poor = _softmax(good), _softmax(poor)
    r = auroc_bootstrap(y, good, poor, n_boot=200, seed=1)
    assert r.estimate_a == pytest.approx(roc_auc_score(y, good, multi_class="ovr", average="macro"))
    assert r.difference > 0.1 and r.p_value < 0.01
    yb = (y == 1).astype(int)
    rb = auroc_bootstrap(yb, good[:, 1], poor[:, 1], n_boot=200, seed=1)
    assert rb.estimate_a == pytest.approx(roc_auc_score(yb, good[:, 1]))
    assert rb == auroc_bootstrap(yb, good[:, 1], poor[:, 1], n_boot=200, seed=1)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


# ---- issue 12: small classes, reference distribution, interval/p agreement ----------------------------------
@pytest.mark.parametrize("n_pos", [1, 0])
def test_delong_with_one_case_in_a_class_is_nan_with_a_message(n_pos: int) -> None:
    """The old code set S10 to 0 with one positive (type-I error 0.58); now there is no test at all."""
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(1, int), np.zeros(39, int)] if n_pos else np.r_[np.zeros(1, int), np.ones(39, int)]
    a, b = rng.normal(size=40), rng.normal(size=40)
    r = delong_test(y, a, b)
    assert np.isnan([r.se, r.z, r.p_value, r.ci_low, r.ci_high]).all() and not r.defined
    assert "at least 2 positives and 2 negatives" in r.message
    assert r.auc_a == pytest.approx(roc_auc_score(y, a))  # the AUCs themselves are still reported
    assert np.isnan(delong_covariance(y, np.vstack([a, b]))[1]).all()


def test_delong_small_class_warns_and_uses_satterthwaite_t() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(4, int), np.zeros(36, int)]
    a = y + rng.normal(0, 1, 40)
    b = 0.5 * a + rng.normal(0, 1, 40)
    with pytest.warns(UserWarning, match="rough under 10 cases"):
        r = delong_test(y, a, b)
    assert r.reference == "t" and "only 4 positives" in r.message
    # hand computation from the structural components
    pos, neg = y == 1, y == 0
    v10 = np.array([[(s[i] > s[neg]).mean() + 0.5 * (s[i] == s[neg]).mean() for i in np.flatnonzero(pos)]
                    for s in (a, b)])
    v01 = np.array([[(s[pos] > s[j]).mean() + 0.5 * (s[pos] == s[j]).mean() for j in np.flatnonzero(neg)]
                    for s in (a, b)])
    c10, c01 = np.var(v10[0] - v10[1], ddof=1) / 4, np.var(v01[0] - v01[1], ddof=1) / 36
    df = (c10 + c01) ** 2 / (c10 ** 2 / 3 + c01 ** 2 / 35)
    assert r.se == pytest.approx(np.sqrt(c10 + c01)) and r.df == pytest.approx(df)
    assert r.p_value == pytest.approx(2 * t_dist.sf(abs(r.z), df))
    assert r.ci_high - r.difference == pytest.approx(t_dist.ppf(0.975, df) * r.se)
    normal = delong_test(y, a, b, reference="normal")
    assert normal.z == pytest.approx(r.z) and normal.p_value < r.p_value and np.isinf(normal.df)


def test_delong_type_one_error_with_three_positives_is_near_nominal() -> None:
    """3 positives among 40: the normal reference rejected a true null ~11 % of the time; the t reference must
    stay near 5 % (benchmarks/bench_stats.py runs 2000 repetitions; this is a quick 600)."""
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(3, int), np.zeros(37, int)]
    rejected = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(600):
            base = y + rng.normal(size=40)
            r = delong_test(y, base + rng.normal(size=40), base + rng.normal(size=40))
            rejected += r.p_value < 0.05
    assert rejected / 600 <= 0.075


def test_interval_and_p_value_never_disagree() -> None:
    """Over a batch of random cases (discrete and continuous bootstrap distributions, ties at 0, DeLong with
    both references): p < alpha exactly when the (1 - alpha) interval excludes 0."""
    rng = np.random.default_rng(4)
    checked = 0
    for _ in range(400):
        alpha = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
        B = int(rng.integers(20, 400))
        boots = rng.normal(rng.normal(0, 1.5), 1, B)
        if rng.random() < 0.4:
            boots = np.round(boots * 2) / 4  # many exact zeros and ties
        lo, hi, p = percentile_interval_and_p(boots, alpha)
        assert (p < alpha) == (lo > 0 or hi < 0), (alpha, B, lo, hi, p)
        assert lo <= hi
        checked += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(300):
            n = int(rng.integers(8, 60))
            y = rng.integers(0, 2, n)
            if min(y.sum(), n - y.sum()) < 2:
                continue
            a = y * rng.normal(0.5, 0.5) + rng.normal(size=n)
            b = 0.5 * a + rng.normal(size=n)
            alpha = float(rng.choice([0.01, 0.05, 0.1]))
            r = delong_test(y, a, b, alpha=alpha, reference=str(rng.choice(["auto", "normal", "t"])))
            assert (r.p_value < alpha) == (r.ci_low > 0 or r.ci_high < 0)
            checked += 1
    assert checked > 600


def test_paired_bootstrap_follows_the_validity_rule() -> None:
    """Issue 24 item 6: below MIN_VALID_SHARE of usable resamples there is no interval and no p (a message says
    why), as everywhere else; at or above it the interval stands."""
    from mmcli.heads.evaluation.bootstrap import MIN_VALID_SHARE

    calls = iter(range(10_000))

    def flaky(share: float):
        def stat(_i: np.ndarray) -> float:
            k = next(calls)
            return float("nan") if (k % 100) >= 100 * share else float(k % 7)
        return stat

    low = paired_bootstrap(flaky(0.90), lambda i: 0.0, 30, n_boot=200, seed=0)
    assert low.n_valid < MIN_VALID_SHARE * 200 and np.isnan([low.ci_low, low.ci_high, low.p_value]).all()
    assert "resamples" in low.message
    ok = paired_bootstrap(flaky(1.0), lambda i: 0.0, 30, n_boot=200, seed=0)
    assert ok.n_valid == 200 and np.isfinite([ok.ci_low, ok.ci_high, ok.p_value]).all() and not ok.message


def test_corrected_t_test_against_hand_computation_and_its_p_agrees_with_its_interval() -> None:
    d = np.array([0.03, -0.01, 0.05, 0.02, 0.04])
    sizes = [30, 30, 30, 30, 29]
    r = corrected_t_test(d, sizes)
    ratio = np.mean([s / (149 - s) for s in sizes])
    se = np.sqrt((1 / 5 + ratio) * d.var(ddof=1))
    q = t_dist.ppf(0.975, 4)
    assert (r.difference, r.se, r.ci_low, r.ci_high, r.df) == pytest.approx((d.mean(), se, d.mean() - q * se,
                                                                            d.mean() + q * se, 4))
    assert r.p_value == pytest.approx(2 * t_dist.sf(d.mean() / se, 4))
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = rng.normal(rng.normal(0, 0.02), 0.03, 5)
        for alpha in (0.05, 0.1):
            res = corrected_t_test(x, sizes, alpha)
            assert (res.p_value < alpha) == (res.ci_low > 0 or res.ci_high < 0)
    single = corrected_t_test([0.1], [30])
    assert np.isnan(single.p_value) and "fewer than 2 folds" in single.message
    assert "undefined" in corrected_t_test([0.1, np.nan], [30, 30]).message
    flat = corrected_t_test([0.0, 0.0, 0.0], [10, 10, 10])
    assert (flat.p_value, flat.ci_low, flat.ci_high) == (1.0, 0.0, 0.0)
