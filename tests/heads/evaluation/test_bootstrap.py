"""The one bootstrap: resampling schemes, the validity rule, percentile intervals, finite-or-None."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mmcli.heads.evaluation.bootstrap import (
    MIN_VALID_SHARE,
    finite_or_nan,
    finite_or_none,
    multiplicities,
    percentile_interval,
    percentile_interval_and_p,
    resample_indices,
    resample_weights,
)


def test_finite_or_none_and_nan():
    assert [finite_or_none(v) for v in (1, 0.5, math.nan, math.inf, None, np.float32(2))] == [1.0, 0.5, None, None,
                                                                                                None, 2.0]
    assert math.isnan(finite_or_nan(None)) and math.isnan(finite_or_nan(-math.inf)) and finite_or_nan(3) == 3.0


def test_stratified_weights_keep_every_stratum_size_and_plain_draws_are_uniform():
    strata = np.array([0] * 7 + [1] * 3 + [2] * 20)
    W = resample_weights(np.random.default_rng(0), 500, strata)
    for s, size in ((0, 7), (1, 3), (2, 20)):
        assert (W[:, strata == s].sum(1) == size).all()
    idx = resample_indices(np.random.default_rng(1), 2000, 30)
    counts = np.bincount(idx.ravel(), minlength=30) / idx.size
    assert np.abs(counts - 1 / 30).max() < 0.004  # each row drawn with probability 1/n
    M = multiplicities(idx[:3], 30)
    assert (M.sum(1) == 30).all() and (M[0] == np.bincount(idx[0], minlength=30)).all()


def test_stratified_indices_are_the_per_replicate_per_stratum_draws():
    """The stream mmcli compare has always used: replicate by replicate, stratum by stratum (np.unique order),
    so its numbers are unchanged for a seed."""
    strata = np.array([1, 0, 1, 1, 0, 2, 2, 1])
    got = resample_indices(np.random.default_rng(5), 4, 8, strata)
    rng = np.random.default_rng(5)
    groups = [np.flatnonzero(strata == u) for u in np.unique(strata)]
    want = np.stack([np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]) for _ in range(4)])
    assert (got == want).all()
    for row in got:
        assert (np.bincount(strata[row], minlength=3) == np.bincount(strata, minlength=3)).all()


def test_the_validity_rule():
    rng = np.random.default_rng(0)
    v = rng.normal(size=200)
    full = percentile_interval(v)
    assert (full.low, full.high) == pytest.approx(tuple(np.percentile(v, [2.5, 97.5])))
    assert full.n_valid == full.n_boot == 200 and full.defined
    need = math.ceil(MIN_VALID_SHARE * 200)
    v_ok, v_bad = v.copy(), v.copy()
    v_ok[need:] = np.nan  # exactly the threshold share valid
    v_bad[need - 1:] = np.nan  # one fewer
    ok, bad = percentile_interval(v_ok), percentile_interval(v_bad)
    assert ok.defined and ok.n_valid == need
    assert (ok.low, ok.high) == pytest.approx(tuple(np.percentile(v_ok[:need], [2.5, 97.5])))
    assert not bad.defined and bad.n_valid == need - 1 and bad.json() == {"ci_low": None, "ci_high": None}
    # n_boot given: replicates dropped before count as invalid
    assert not percentile_interval(v[:need - 1], n_boot=200).defined
    # an undefined point estimate makes the interval null whatever the replicates
    assert not percentile_interval(v, estimate=math.nan).defined and not percentile_interval(v, estimate=None).defined
    assert percentile_interval(v, alpha=0.1).json("gap_ci")["gap_ci_low"] == pytest.approx(np.percentile(v, 5))


def test_percentile_interval_and_p_agree():
    rng = np.random.default_rng(3)
    for _ in range(200):
        b = rng.normal(rng.normal(0, 1), 1, size=int(rng.integers(10, 300)))
        lo, hi, p = percentile_interval_and_p(b, 0.05)
        assert (p < 0.05) == (lo > 0 or hi < 0)
