"""The small HTML pieces every report section writes: escaped text, numbers, an 'absent' note."""
from __future__ import annotations

import html
from typing import Any

import numpy as np

DASH = "–"  # a number that is not there (not numeric, NaN or infinite)


def esc(x: Any) -> str:
    """``x`` as text safe inside HTML."""
    return html.escape(str(x))


def num(v: Any, digits: int = 3, missing: str = DASH) -> str:
    """``v`` with ``digits`` decimals; ``missing`` where it is not a finite number."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return missing
    return f"{f:.{digits}f}" if np.isfinite(f) else missing


def absent(text: str) -> str:
    """A greyed paragraph saying what a section cannot show (``text`` is HTML)."""
    return f"<p class='absent'>{text}</p>"
