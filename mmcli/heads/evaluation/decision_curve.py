"""Decision-curve analysis (Vickers & Elkin 2006) with the ``dcurves`` package.

Net benefit at threshold probability ``pt`` of treating the patients whose predicted risk is ``>= pt``:
``TP/n - FP/n * pt / (1 - pt)``, compared with treating everybody (``treat_all``) and nobody (``treat_none``,
0). Binary tasks use the probability of the positive class; survival tasks use the predicted probability of
the event by the horizon ``T`` (``1 - S(T | x)``, the head's Breslow curve) and ``dcurves``' survival DCA
(true/false positives from Kaplan-Meier estimates at ``T`` among the patients called positive).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

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


def net_benefit_table(outcome: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, *,
                      time: np.ndarray | None = None, horizon: float | None = None) -> pd.DataFrame:
    """dcurves' table (columns ``model``, ``threshold``, ``net_benefit``, ...) for ``model``, ``all``, ``none``.

    ``outcome``: 0/1 (binary) or the event indicator (survival, with ``time`` and ``horizon``)."""
    import dcurves

    data = pd.DataFrame({"outcome": np.asarray(outcome, dtype=int), "model": np.asarray(prob, dtype=np.float64)})
    kwargs: dict[str, Any] = {}
    if horizon is not None:
        assert time is not None
        data["time"] = np.asarray(time, dtype=np.float64)
        kwargs = {"time": float(horizon), "time_to_outcome_col": "time"}
    return dcurves.dca(data=data, outcome="outcome", modelnames=["model"], thresholds=list(thresholds), **kwargs)


def decision_curve(outcome: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, *, time: np.ndarray | None = None,
                   horizon: float | None = None, what: str = "") -> dict[str, Any]:
    """metrics.json's ``decision_curve`` block: thresholds and the net benefit of the model, treat-all and
    treat-none (arrays in threshold order), and the thresholds where the model beats both."""
    table = net_benefit_table(outcome, prob, thresholds, time=time, horizon=horizon)
    nb = {name: table.loc[table["model"] == name].sort_values("threshold")["net_benefit"].to_numpy(float)
          for name in ("model", "all", "none")}
    best = (nb["model"] > nb["all"]) & (nb["model"] > nb["none"])
    thr = np.sort(np.asarray(thresholds, dtype=float))
    return {
        "method": "dcurves.dca" + (f" (survival, event by horizon {horizon:g})" if horizon is not None else ""),
        "what": what,
        "horizon": horizon,
        "prevalence": _num(table["prevalence"].iloc[0]),
        "thresholds": [float(t) for t in thr],
        "net_benefit": {"model": [_num(v) for v in nb["model"]], "treat_all": [_num(v) for v in nb["all"]],
                        "treat_none": [_num(v) for v in nb["none"]]},
        "model_beats_both_at": [float(t) for t in thr[best]],
        "n": int(len(prob)),
    }


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
