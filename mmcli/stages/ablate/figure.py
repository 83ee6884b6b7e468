"""The ablation bar chart: one bar per fit with its 95% CI, best single modality highlighted."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

SINGLE_COLOUR, MULTI_COLOUR, BEST_COLOUR = "#9db4d3", "#4c72b0", "#dd8452"


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot state, no display)."""
    fig = Figure(figsize=(width, height), dpi=96, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(r: pd.Series, several_heads: bool) -> str:
    what = r["fusion"] if r["fusion"] != "-" else r["head"]
    if several_heads and r["fusion"] != "-":
        what = f"{r['head']}/{what}"
    return f"{r['subset']} · {what}"


def ablation_figure(table: pd.DataFrame, metric: str) -> Figure:
    """Horizontal bars sorted by mean, asymmetric CI error bars; the best single-modality fit is orange and
    its mean and CI are drawn across the chart as the bar to beat."""
    ok = table[table["mean"].notna()].sort_values("mean", ascending=True).reset_index(drop=True)
    fig = new_figure(7.5, 1.4 + 0.26 * max(len(ok), 1))
    ax = fig.subplots()
    if ok.empty:
        ax.text(0.5, 0.5, "no fit finished", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    singles = ok[ok["n_modalities"] == 1]
    best_single = singles["mean"].idxmax() if not singles.empty else None
    colours = [BEST_COLOUR if i == best_single else SINGLE_COLOUR if n == 1 else MULTI_COLOUR
               for i, n in zip(ok.index, ok["n_modalities"])]
    lo = np.clip((ok["mean"] - ok["ci_low"]).to_numpy(float), 0, None)
    hi = np.clip((ok["ci_high"] - ok["mean"]).to_numpy(float), 0, None)
    err = np.nan_to_num(np.vstack([lo, hi]))
    ax.barh(range(len(ok)), ok["mean"], xerr=err, color=colours, capsize=2, error_kw={"lw": 0.8}, zorder=2)
    several = ok["head"].nunique() > 1
    ax.set_yticks(range(len(ok)), [_label(r, several) for _, r in ok.iterrows()], fontsize=7)
    if best_single is not None:
        b = ok.loc[best_single]
        ax.axvline(b["mean"], color=BEST_COLOUR, ls="--", lw=1, zorder=3)
        if np.isfinite(b["ci_low"]) and np.isfinite(b["ci_high"]):
            ax.axvspan(b["ci_low"], b["ci_high"], color=BEST_COLOUR, alpha=0.15, lw=0, zorder=0)
        ax.get_yticklabels()[best_single].set_fontweight("bold")
    left = float(np.nanmin(ok["ci_low"].fillna(ok["mean"])))
    right = float(np.nanmax(ok["ci_high"].fillna(ok["mean"])))
    pad = 0.05 * max(right - left, 0.05)
    ax.set_xlim(max(0.0, left - pad) if metric in ("auroc", "c_index", "auprc") else left - pad, right + pad)
    ax.set(xlabel=f"{metric} (mean, 95% CI)", title=f"Ablation: {metric} by modality subset and fusion")
    fig.legend(handles=[Patch(color=BEST_COLOUR, label="best single modality (line: mean, band: 95% CI)"),
                        Patch(color=SINGLE_COLOUR, label="single modality"),
                        Patch(color=MULTI_COLOUR, label="multimodal")], fontsize=7, loc="outside lower center",
               ncol=3, frameon=False)
    return fig
