"""Decision-curve analysis (Vickers & Elkin 2006) with the ``dcurves`` package.

Net benefit at threshold probability ``pt`` of treating the patients whose predicted risk is ``>= pt``:
``TP/n - FP/n * pt / (1 - pt)``, compared with treating everybody (``treat_all``) and nobody (``treat_none``,
0). Binary tasks use the probability of the positive class; survival tasks use the predicted probability of
the event by the horizon ``T`` (``1 - S(T | x)``, the head's Breslow curve) and ``dcurves``' survival DCA
(true/false positives from Kaplan-Meier estimates at ``T`` among the patients called positive).

Uncertainty (issue 24 item 8): where the model "beats both" is a claim about a difference of net benefits,
``model - max(treat all, treat none)``, so it comes with a 95% percentile bootstrap interval per threshold
(:mod:`.bootstrap`: patients resampled without stratification, since net benefit depends on the prevalence;
null where fewer than ``MIN_VALID_SHARE`` of the resamples gave a value, e.g. survival thresholds whose
positives are rarely followed up to the horizon). ``model_beats_both_ranges`` lists the threshold ranges where
that interval's lower bound is above 0. The intervals are pointwise (each threshold's own), not a simultaneous
band. The resamples are scored by :func:`weighted_net_benefit`, a vectorised form of dcurves' definitions
(the tests check it equal to dcurves on the full data).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmcli.heads.evaluation.bootstrap import (
    finite_or_none,
    multiplicities,
    percentile_interval,
    resample_indices,
)
from mmcli.heads.evaluation.options import DEFAULT_THRESHOLDS
from mmcli.pipeline.errors import InputError


def parse_thresholds(text: str | None) -> np.ndarray:
    """``"START:STOP:STEP"`` (inclusive) or a comma list ``"0.1,0.2,0.3"`` -> thresholds in (0, 1)."""
    text = (text or DEFAULT_THRESHOLDS).strip()
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            values = np.round(np.arange(start, stop + step / 2, step), 10)
        else:
            values = np.array([float(v) for v in text.split(",") if v.strip()])
    except ValueError:
        values = np.zeros(0)
    if not len(values) or not ((values > 0) & (values < 1)).all():
        raise InputError(f"--dca-thresholds {text!r}: expected START:STOP:STEP or a comma list of probabilities "
                         f"strictly between 0 and 1 (default {DEFAULT_THRESHOLDS}).")
    return np.unique(values)


def weighted_net_benefit(W: np.ndarray, outcome: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, *,
                         time: np.ndarray | None = None, horizon: float | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Net benefit of the model and of treat-all, (B, T) each, for every row of multiplicities ``W`` (B, n).

    dcurves' definitions, weighted: binary ``TP/n - FP/n * pt/(1-pt)``; survival (``time``, ``horizon``)
    ``r * q - (1 - r) * q * pt/(1-pt)`` with ``q`` the share called positive and ``r`` one minus their
    Kaplan-Meier survival at the horizon (0 when nobody is called positive; NaN when none of them is followed
    to the horizon, or nobody at all is)."""
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    y = np.asarray(outcome).astype(bool)
    thr = np.sort(np.asarray(thresholds, dtype=np.float64))
    odds = thr / (1 - thr)
    call = np.asarray(prob, dtype=np.float64)[:, None] >= thr[None, :]  # (n, T)
    total = W.sum(1)[:, None]
    if horizon is None:
        tp = (W @ (call & y[:, None])) / total
        fp = (W @ (call & ~y[:, None])) / total
        prev = (W @ y)[:, None] / total
        return tp - fp * odds, prev - (1 - prev) * odds
    assert time is not None
    t = np.asarray(time, dtype=np.float64)
    u = np.unique(t[y & (t <= horizon)])  # event times up to the horizon
    died = (y[:, None] & (t[:, None] == u[None, :])).astype(np.float64)  # (n, m)
    at_risk = (t[:, None] >= u[None, :]).astype(np.float64)
    late = t >= horizon

    def risk_by_horizon(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Ws = W * sel
        d, r = Ws @ died, Ws @ at_risk
        with np.errstate(divide="ignore", invalid="ignore"):
            surv = np.prod(np.where(r > 0, 1 - d / np.where(r > 0, r, 1), 1.0), axis=1)
        q = Ws.sum(1) / total[:, 0]
        risk = np.where(q > 0, 1 - surv, 0.0)
        risk[(q > 0) & ((Ws @ late) <= 0)] = np.nan  # positives not followed to the horizon: undefined
        return risk, q

    r_all, _ = risk_by_horizon(np.ones(len(t)))
    nb_all = r_all[:, None] - (1 - r_all[:, None]) * odds
    nb_model = np.empty((len(W), len(thr)))
    for j in range(len(thr)):
        r, q = risk_by_horizon(call[:, j])
        nb_model[:, j] = r * q - (1 - r) * q * odds[j]
    nobody_late = (W @ late) <= 0  # dcurves: every value undefined when nobody reaches the horizon
    nb_model[nobody_late], nb_all[nobody_late] = np.nan, np.nan
    return nb_model, nb_all


def beats_both_ranges(thresholds: Sequence[float], lower: Sequence[float | None]) -> list[dict[str, float]]:
    """Contiguous runs of ``thresholds`` (sorted) where ``lower`` (a lower confidence bound of the net-benefit
    difference) is above 0, as ``[{"from": first, "to": last}, ...]``."""
    out: list[dict[str, float]] = []
    run: list[float] = []
    for t, lo in zip(thresholds, lower):
        if lo is not None and lo > 0:
            run.append(float(t))
            continue
        if run:
            out.append({"from": run[0], "to": run[-1]})
        run = []
    if run:
        out.append({"from": run[0], "to": run[-1]})
    return out


def decision_curve(outcome: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, *, time: np.ndarray | None = None,
                   horizon: float | None = None, what: str = "", n_boot: int = 0, seed: int = 0,
                   alpha: float = 0.05) -> dict[str, Any]:
    """metrics.json's ``decision_curve`` block: thresholds and the net benefit of the model, treat-all and
    treat-none (arrays in threshold order), the thresholds where the model beats both (point estimates), and,
    with ``n_boot`` resamples, the net-benefit difference with its pointwise CIs and the threshold ranges where
    the CI excludes 0 (``model_beats_both_ranges``; None without resamples)."""
    thr = np.sort(np.asarray(thresholds, dtype=float))
    ones = np.ones((1, len(prob)))
    with np.errstate(invalid="ignore"):
        model, treat_all = weighted_net_benefit(ones, outcome, prob, thr, time=time, horizon=horizon)
    nb = {"model": model[0], "all": treat_all[0], "none": np.zeros(len(thr))}
    best = (nb["model"] > nb["all"]) & (nb["model"] > nb["none"])
    diff = nb["model"] - np.maximum(nb["all"], nb["none"])
    # treat-all's net benefit at threshold pt is prev - (1 - prev) pt / (1 - pt): the prevalence is its value at 0
    prevalence = weighted_net_benefit(ones, outcome, prob, np.array([1e-12]), time=time, horizon=horizon)[1][0, 0]
    out: dict[str, Any] = {
        "method": "dcurves' net benefit (vectorised here: equal to dcurves.dca, tested against it)"
                  + (f"; survival, event by horizon {horizon:g}" if horizon is not None else ""),
        "what": what,
        "horizon": horizon,
        "prevalence": finite_or_none(prevalence),
        "thresholds": [float(t) for t in thr],
        "net_benefit": {"model": [finite_or_none(v) for v in nb["model"]],
                        "treat_all": [finite_or_none(v) for v in nb["all"]],
                        "treat_none": [finite_or_none(v) for v in nb["none"]]},
        "model_beats_both_at": [float(t) for t in thr[best]],
        "n": int(len(prob)),
    }
    difference: dict[str, Any] = {
        "definition": "net benefit of the model minus the larger of treat-all and treat-none",
        "value": [finite_or_none(v) for v in diff], "n_boot": n_boot,
    }
    ranges = None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        W = multiplicities(resample_indices(rng, n_boot, len(prob)), len(prob))
        with np.errstate(invalid="ignore"):
            model_b, all_b = weighted_net_benefit(W, outcome, prob, thr, time=time, horizon=horizon)
            boot = model_b - np.maximum(all_b, 0.0)
        cis = [percentile_interval(boot[:, j], alpha, estimate=diff[j]) for j in range(len(thr))]
        difference.update(
            ci_low=[finite_or_none(c.low) for c in cis], ci_high=[finite_or_none(c.high) for c in cis],
            n_valid=[c.n_valid for c in cis],
            ci=f"{100 * (1 - alpha):g}% pointwise percentile bootstrap over patients (not stratified: net benefit "
               "depends on the prevalence); null where fewer than 95% of the resamples gave a value")
        ranges = beats_both_ranges(thr, difference["ci_low"])
    out["net_benefit_difference"] = difference
    out["model_beats_both_ranges"] = ranges
    out["model_beats_both_ranges_rule"] = ("threshold ranges where the lower bound of the net-benefit difference's "
                                           "pointwise 95% CI is above 0 (model_beats_both_at: point estimates only)")
    return out
