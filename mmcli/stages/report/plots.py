"""Figures for ``report.html``, each returned as a base64 PNG string (inline ``data:`` URI, no external files).

Figures are built on ``matplotlib.figure.Figure`` directly (Agg canvas; no pyplot state, no display needed).
Curves come from scikit-learn (``roc_curve``, ``precision_recall_curve``, ``calibration_curve``,
``confusion_matrix``) and lifelines (Kaplan-Meier, log-rank).
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 96


def new_figure(width: float = 5.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_base64(fig: Figure) -> str:
    """PNG bytes of ``fig`` as base64 text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(b64: str, alt: str) -> str:
    """An ``<img>`` element with the PNG inline (``data:`` URI)."""
    return f"<img src='data:image/png;base64,{b64}' alt='{html.escape(alt)}'>"

# Kaplan-Meier groups, low to high risk: blue, amber, red (high risk in a warning colour; ColorBrewer RdYlBu ends)
RISK_COLOURS = {"low risk": "#2166ac", "intermediate risk": "#e08214", "high risk": "#b2182b"}


def legend_below(fig: Any, ax: Any, ncol: int = 2, fontsize: float = 8) -> None:
    """The axes' legend under the plot (constrained layout makes room), so it never covers a curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(handles)), fontsize=fontsize,
                   frameon=False)


def _ovr(classes: Sequence[str]) -> list[int]:
    """Classes to draw one-vs-rest curves for: the positive class for binary, every class otherwise."""
    return [1] if len(classes) == 2 else list(range(len(classes)))


def roc_figure(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], what: str = "out-of-fold") -> str:
    """ROC curve(s): binary (positive = ``classes[1]``) or one-vs-rest per class, with AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = new_figure()
    ax = fig.subplots()
    for c in _ovr(classes):
        yc = (y == c).astype(int)
        if yc.min() == yc.max():
            continue
        fpr, tpr, _ = roc_curve(yc, probs[:, c])
        ax.plot(fpr, tpr, lw=1.6, label=f"{classes[c]} (AUROC {roc_auc_score(yc, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({what})",
           xlim=(0, 1), ylim=(0, 1.01))
    legend_below(fig, ax)
    return to_base64(fig)


def pr_figure(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> str:
    """Precision-recall curve(s) with average precision and the prevalence baseline."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = new_figure()
    ax = fig.subplots()
    for c in _ovr(classes):
        yc = (y == c).astype(int)
        if yc.min() == yc.max():
            continue
        prec, rec, _ = precision_recall_curve(yc, probs[:, c])
        line, = ax.step(rec, prec, where="post", lw=1.6,
                        label=f"{classes[c]} (AP {average_precision_score(yc, probs[:, c]):.3f})")
        ax.axhline(yc.mean(), ls=":", lw=0.8, c=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (dotted: prevalence)",
           xlim=(0, 1), ylim=(0, 1.02))
    legend_below(fig, ax)
    return to_base64(fig)


def calibration_figure(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_bins: int = 10) -> str:
    """Reliability diagram (``sklearn.calibration.calibration_curve``, quantile bins) per drawn class."""
    from sklearn.calibration import calibration_curve

    n_bins = int(max(2, min(n_bins, len(y) // 10)))
    fig = new_figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfectly calibrated")
    for c in _ovr(classes):
        yc = (y == c).astype(int)
        if yc.min() == yc.max():
            continue
        frac, mean_pred = calibration_curve(yc, np.clip(probs[:, c], 0, 1), n_bins=n_bins, strategy="quantile")
        ax.plot(mean_pred, frac, marker="o", ms=3, lw=1.4, label=classes[c])
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction", title="Calibration (quantile bins)",
           xlim=(0, 1), ylim=(0, 1.02))
    legend_below(fig, ax)
    return to_base64(fig)


def confusion_figure(y: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> str:
    """Confusion matrix: counts, coloured by row-normalised share (recall per true class)."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, y_pred, labels=list(range(len(classes))))
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    fig = new_figure(1.6 + 0.9 * k, 1.2 + 0.8 * k)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return to_base64(fig)


def risk_groups(risk: np.ndarray, n_events: int) -> tuple[np.ndarray, list[str]]:
    """Tertiles of out-of-fold risk when there are >= 30 patients and >= 15 events, else a median split.

    Returns group index per patient (0 = lowest risk) and the group names.
    """
    if len(risk) >= 30 and n_events >= 15:
        cuts = np.quantile(risk, [1 / 3, 2 / 3])
        names = ["low risk", "intermediate risk", "high risk"]
    else:
        cuts = np.quantile(risk, [0.5])
        names = ["low risk", "high risk"]
    groups = np.searchsorted(cuts, risk, side="right")
    return groups, names


def km_figure(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
              time_unit: str = "") -> tuple[str, dict[str, Any]]:
    """Kaplan-Meier curves of out-of-fold risk groups with the (multivariate) log-rank test (lifelines).

    Returns the figure and ``{"groups": [...], "sizes": [...], "events": [...], "logrank_p": p, "test": name}``.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    groups, names = risk_groups(risk, int(event.sum()))
    used = sorted(set(groups.tolist()))
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    for g in used:
        m = groups == g
        KaplanMeierFitter(label=f"{names[g]} (n={int(m.sum())}, events={int(event[m].sum())})").fit(
            time[m], event[m]).plot_survival_function(ax=ax, ci_show=True, show_censors=True,
                                                      censor_styles={"ms": 4, "marker": "|"},
                                                      color=RISK_COLOURS.get(names[g]))
    info: dict[str, Any] = {"groups": [names[g] for g in used], "sizes": [int((groups == g).sum()) for g in used],
                            "events": [int(event[groups == g].sum()) for g in used], "logrank_p": None,
                            "test": "log-rank" if len(used) == 2 else "multivariate log-rank"}
    if len(used) > 1:
        res = multivariate_logrank_test(time, groups, event)
        info["logrank_p"] = float(res.p_value)
        ax.set_title(f"Kaplan-Meier by predicted risk group\n{info['test']} p = {res.p_value:.3g}", fontsize=10)
    else:
        ax.set_title("Kaplan-Meier (all risks equal: one group)")
    ax.set(xlabel=f"time{f' ({time_unit})' if time_unit else ''}", ylabel="survival probability", ylim=(0, 1.02))
    if ax.get_legend() is not None:  # lifelines draws one inside the axes
        ax.get_legend().remove()
    legend_below(fig, ax, ncol=1)
    return to_base64(fig), info


def bar_figure(names: Sequence[str], values: Sequence[float], *, title: str, xlabel: str,
               errors: Sequence[float] | None = None, top: int | None = None) -> str:
    """Horizontal bar chart, largest on top; optional symmetric error bars."""
    order = np.argsort(np.asarray(values, float))[::-1][: top or len(values)]
    names = [str(names[i]) for i in order][::-1]
    vals = np.asarray(values, float)[order][::-1]
    err = None if errors is None else np.asarray(errors, float)[order][::-1]
    fig = new_figure(6.0, 1.0 + 0.28 * len(names))
    ax = fig.subplots()
    ax.barh(range(len(names)), vals, xerr=err, color="#4c72b0", capsize=3 if err is not None else 0)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel=xlabel, title=title)
    return to_base64(fig)


def observed_figure(y: np.ndarray, value: np.ndarray, target: str) -> str:
    """Predicted against observed values, with the line of perfect agreement."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(y, value, s=12, alpha=0.6, color="#4c72b0", edgecolors="none")
    lo, hi = float(min(y.min(), value.min())), float(max(y.max(), value.max()))
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="#555555", linewidth=1)
    ax.set_xlabel(f"observed {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.set_title("Predicted vs observed")
    return to_base64(fig)


def residual_figure(y: np.ndarray, value: np.ndarray, target: str) -> str:
    """Residuals (observed - predicted) against the prediction, with zero marked."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(value, y - value, s=12, alpha=0.6, color="#dd8452", edgecolors="none")
    ax.axhline(0.0, linestyle="--", color="#555555", linewidth=1)
    ax.set_xlabel(f"predicted {target}")
    ax.set_ylabel("residual (observed - predicted)")
    ax.set_title("Residuals")
    return to_base64(fig)
