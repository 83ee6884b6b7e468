"""Decision curves: dcurves' net benefit against a hand computation; threshold parsing; survival at a horizon."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from mmcli.heads.evaluation.decision_curve import decision_curve, parse_thresholds
from mmcli.pipeline.errors import InputError


def test_net_benefit_matches_hand_computation():
    rng = np.random.default_rng(0)
    n = 300
    p = rng.uniform(size=n)
    y = (rng.uniform(size=n) < p).astype(int)
    res = decision_curve(y, p, np.array([0.1, 0.25, 0.5]))
    for i, pt in enumerate(res["thresholds"]):
        call = p >= pt
        tp, fp = np.sum(call & (y == 1)), np.sum(call & (y == 0))
        hand = tp / n - fp / n * pt / (1 - pt)
        assert res["net_benefit"]["model"][i] == pytest.approx(hand, abs=1e-12)
        prev = y.mean()
        assert res["net_benefit"]["treat_all"][i] == pytest.approx(prev - (1 - prev) * pt / (1 - pt), abs=1e-12)
        assert res["net_benefit"]["treat_none"][i] == 0
    assert res["prevalence"] == pytest.approx(y.mean())


def test_a_useless_model_does_not_beat_treat_all_at_low_thresholds():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    res = decision_curve(y, rng.uniform(size=500), parse_thresholds("0.05:0.3:0.05"))
    assert not [t for t in res["model_beats_both_at"] if t < 0.3]


def test_parse_thresholds():
    np.testing.assert_allclose(parse_thresholds("0.1:0.3:0.1"), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(parse_thresholds("0.2,0.1"), [0.1, 0.2])
    assert len(parse_thresholds(None)) == 99
    for bad in ("0:1:0.1", "a,b", "0.1:0.5:0", "1.5"):
        with pytest.raises(InputError, match="--dca-thresholds"):
            parse_thresholds(bad)


def test_survival_decision_curve_at_a_horizon():
    rng = np.random.default_rng(2)
    n = 400
    z = rng.normal(size=n)
    t_event = rng.exponential(20 * np.exp(-z))
    t_cens = rng.uniform(5, 60, n)
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)
    prob = 1 - np.exp(-12 / (20 * np.exp(-z)))  # true P(event by 12)
    res = decision_curve(event, prob, parse_thresholds("0.1:0.6:0.1"), time=time, horizon=12.0)
    assert res["horizon"] == 12.0 and "survival" in res["method"]
    model = np.array(res["net_benefit"]["model"], dtype=float)
    assert np.isfinite(model).all() and (model >= np.array(res["net_benefit"]["treat_all"]) - 0.02).all()
    assert res["model_beats_both_at"]  # the true risk is useful somewhere


# ---- uncertainty (issue 24 item 8) -------------------------------------------------------------------------------
def _table(outcome, prob, thresholds, **kw):

    t = net_benefit_table(outcome, prob, thresholds, **kw)
    return {m: t.loc[t["model"] == m].sort_values("threshold")["net_benefit"].to_numpy(float) for m in ("model", "all")}


def _survival(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    t_event = rng.exponential(20 * np.exp(-z))
    t_cens = rng.uniform(5, 60, n)
    time = np.round(np.minimum(t_event, t_cens), 1)  # ties, as in real follow-up data
    return time, (t_event <= t_cens).astype(int), 1 - np.exp(-12 / (20 * np.exp(-z)))


@pytest.mark.parametrize("horizon", [None, 12.0, 55.0])
def test_weighted_net_benefit_equals_dcurves_on_the_data_and_on_a_resample(horizon):
    """The bootstrap's vectorised net benefit is dcurves' on every resample (NaN where dcurves gives None)."""
    from mmcli.heads.evaluation.decision_curve import weighted_net_benefit

    time, event, prob = _survival(3)
    outcome = event if horizon is not None else (np.random.default_rng(4).uniform(size=len(prob)) < prob).astype(int)
    kw = {"time": time, "horizon": horizon} if horizon is not None else {}
    thr = parse_thresholds("0.05:0.95:0.05")
    n = len(prob)
    idx = np.random.default_rng(5).integers(0, n, n)
    for rows, w in ((np.arange(n), np.ones(n)), (idx, np.bincount(idx, minlength=n).astype(float))):
        ref = _table(outcome[rows], prob[rows], thr, **({"time": time[rows], "horizon": horizon} if kw else {}))
        model, treat_all = weighted_net_benefit(w[None], outcome, prob, thr, **kw)
        np.testing.assert_allclose(model[0], ref["model"], atol=1e-12)
        np.testing.assert_allclose(treat_all[0], ref["all"], atol=1e-12)
    if horizon == 55.0:
        assert np.isnan(ref["model"]).any()  # positives not followed to 55 at high thresholds: undefined


def test_beats_both_ranges_are_runs_of_thresholds_with_the_lower_bound_above_zero():
    from mmcli.heads.evaluation.decision_curve import beats_both_ranges

    t = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert beats_both_ranges(t, [-0.1, 0.01, 0.02, None, 0.03, 0.0]) == [{"from": 0.2, "to": 0.3},
                                                                         {"from": 0.5, "to": 0.5}]
    assert beats_both_ranges(t, [0.1] * 6) == [{"from": 0.1, "to": 0.6}] and beats_both_ranges(t, [None] * 6) == []


def test_beating_both_carries_uncertainty():
    """A weak model beats both by chance at a few point estimates; no range survives its CI. A strong one does."""
    rng = np.random.default_rng(0)
    n = 150
    y = rng.integers(0, 2, n)
    weak = np.clip(0.5 + 0.05 * (y - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    res = decision_curve(y, weak, parse_thresholds("0.05:0.95:0.05"), n_boot=300, seed=1)
    assert res["model_beats_both_at"] and res["model_beats_both_ranges"] == []
    diff = res["net_benefit_difference"]
    assert len(diff["ci_low"]) == len(res["thresholds"]) and set(diff["n_valid"]) == {300}
    strong = np.clip(0.5 + 0.6 * (y - 0.5) + rng.normal(0, 0.1, n), 0.01, 0.99)
    res = decision_curve(y, strong, parse_thresholds("0.05:0.95:0.05"), n_boot=300, seed=1)
    ranges = res["model_beats_both_ranges"]
    assert ranges and ranges[0]["from"] <= 0.3 <= ranges[0]["to"]
    assert decision_curve(y, strong, np.array([0.3]))["model_beats_both_ranges"] is None  # no resamples, no claim


def test_net_benefit_difference_interval_covers_the_truth_and_a_halved_one_does_not():
    """p ~ U(0, 1), y ~ Bernoulli(p): at pt = 0.3 the model's net benefit is (1 - pt)/2 = 0.35 and treat-all's
    1/2 - 1/2 pt/(1 - pt), so the true difference is 0.0643. 120 cohorts of 200 (coverage SE ~0.02)."""
    pt = 0.3
    truth = (1 - pt) / 2 - (0.5 - 0.5 * pt / (1 - pt))
    rng = np.random.default_rng(11)
    got = []
    for r in range(120):
        p = rng.uniform(size=200)
        y = (rng.uniform(size=200) < p).astype(int)
        d = decision_curve(y, p, np.array([pt]), n_boot=200, seed=r)["net_benefit_difference"]
        got.append((d["ci_low"][0], d["ci_high"][0]))
    lo, hi = np.array(got).T
    mid, half = (lo + hi) / 2, (hi - lo) / 4
    assert np.mean((lo <= truth) & (truth <= hi)) >= 0.85
    assert np.mean((mid - half <= truth) & (truth <= mid + half)) < 0.85


def net_benefit_table(outcome: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, *,
                      time: np.ndarray | None = None, horizon: float | None = None) -> pd.DataFrame:
    """The reference: dcurves' own table (columns ``model``, ``threshold``, ``net_benefit``, ...) for ``model``,
    ``all``, ``none``.

    ``outcome``: 0/1 (binary) or the event indicator (survival, with ``time`` and ``horizon``)."""
    import dcurves

    data = pd.DataFrame({"outcome": np.asarray(outcome, dtype=int), "model": np.asarray(prob, dtype=np.float64)})
    kwargs: dict[str, Any] = {}
    if horizon is not None:
        assert time is not None
        data["time"] = np.asarray(time, dtype=np.float64)
        kwargs = {"time": float(horizon), "time_to_outcome_col": "time"}
    return dcurves.dca(data=data, outcome="outcome", modelnames=["model"], thresholds=list(thresholds), **kwargs)
