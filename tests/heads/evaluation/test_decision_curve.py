"""Decision curves: dcurves' net benefit against a hand computation; threshold parsing; survival at a horizon."""
from __future__ import annotations

import numpy as np
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
