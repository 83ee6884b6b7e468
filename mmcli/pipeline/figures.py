"""Matplotlib figures without pyplot (an Agg canvas per figure: no global state, no display), and their PNG as
inline base64 for self-contained HTML. Shared by the report and ablate's chart."""
from __future__ import annotations

import base64
import html
import io

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
