"""Progress of cohort runs: rich bars in a terminal, plain lines in a log.

* In a terminal, :class:`CohortProgress` draws a cohort bar plus a bar for the item in flight (tiles/s, ETA).
* Where progress goes to a file or a pipe (a SLURM log, CI, ``| tee``), bars would stay blank until the end, so
  :class:`ProgressLines` prints one plain line every :data:`EVERY_S` seconds instead::

      extract wsi [resnet50_trunc-...]: 37/177 items (21%), 4m12s elapsed, ETA 15m54s

  and a last one when the run ends. ``extract`` and ``import`` use it through :class:`CohortProgress`; stage-2
  loops (fit, ablate) use :class:`ProgressLines` directly. The ETA is the mean time per finished unit times the
  units left (no ETA before the first one finishes).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mmcli.pipeline.log import FILE_ONLY, get_logger

console = Console(stderr=True)
_log = get_logger("progress")
EVERY_S = 30.0  # seconds between two plain progress lines


def interactive(stream: Any = None) -> bool:
    """Whether progress written to ``stream`` (default: stderr, where progress goes) reaches a terminal; rich's
    own test (``FORCE_COLOR``, ``TERM=dumb`` and Jupyter are honoured)."""
    return (console if stream is None else Console(file=stream)).is_terminal


def duration(seconds: float) -> str:
    """``"45s"``, ``"4m12s"``, ``"2h03m"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLines:
    """``n/N`` progress as plain lines, at most one every ``every`` seconds (and one at :meth:`finish`).

    ``write`` receives each line (default: stderr through rich, without markup); ``clock`` is monotonic seconds
    (injectable for tests). ``update(done)`` sets the count, ``advance(k)`` adds to it; ``note`` is appended to
    the line (e.g. ``"fold 2/5"``).
    """

    def __init__(self, total: int, title: str, unit: str = "item", *, every: float = EVERY_S,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.title, self.unit, self.every = int(total), title, unit, float(every)
        self.done = 0
        self._write = write or (lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
        self._clock = clock
        self._t0 = clock()
        self._last = self._t0
        self.lines: list[str] = []

    def line(self, note: str = "") -> str:
        """The current progress line."""
        elapsed = self._clock() - self._t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        units = self.unit if self.unit.endswith("s") or self.total == 1 else f"{self.unit}s"
        text = f"{self.title}: {self.done}/{self.total} {units}{pct}, {duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", ETA {duration(elapsed / self.done * (self.total - self.done))}"
        return text + (f"; {note}" if note else "")

    def update(self, done: int, note: str = "", *, force: bool = False) -> bool:
        """Set the count to ``done``; print a line when ``every`` seconds passed since the last one (or
        ``force``). Returns whether a line was printed."""
        self.done = int(done)
        now = self._clock()
        if not force and now - self._last < self.every:
            return False
        self._last = now
        text = self.line(note)
        self.lines.append(text)
        self._write(text)
        return True

    def advance(self, k: int = 1, note: str = "") -> bool:
        return self.update(self.done + k, note)

    def finish(self, note: str = "") -> None:
        """The last line (always printed), e.g. ``12/12 items (100%), 3m05s elapsed``."""
        self.update(self.done, note, force=True)


class _Rate(TextColumn):
    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task: Any) -> Any:
        from rich.text import Text

        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", self.unit)
        return Text(f"{speed:.1f} {unit}/s" if speed else "", style="cyan")


class CohortProgress:
    """``with CohortProgress(n, title) as bar: with bar.item(name) as cb: ...; bar.advance(outcome)``.

    In a terminal the cohort bar counts items and an item's sub-bar counts ``unit`` (e.g. tiles) with its rate
    and ETA. Elsewhere (``lines`` None: decided by :func:`interactive`) it prints :class:`ProgressLines` of the
    items every :data:`EVERY_S` seconds, noting the item in flight and its units, and a last line at the end.
    """

    def __init__(self, total: int, title: str, unit: str = "item", enabled: bool = True,
                 lines: bool | None = None, **line_kw: Any) -> None:
        self.enabled = enabled and total > 0
        self.unit = unit
        self.total = total
        self.counts = {"done": 0, "cached": 0, "failed": 0, "missing": 0, "locked": 0}
        self.plain = self.enabled and (not interactive() if lines is None else lines)
        self._lines = ProgressLines(total, title, "item", **line_kw) if self.plain else None
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            _Rate(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not self.enabled or self.plain, transient=False,
            refresh_per_second=4 if sys.stderr.isatty() else 0.2,
        )
        self._title = title
        self._task = None

    def __enter__(self) -> CohortProgress:
        self._progress.__enter__()
        self._task = self._progress.add_task(self._title, total=self.total, unit="item")
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)
        if self._lines is not None:
            self._lines.finish(", ".join(f"{k} {v}" for k, v in self.counts.items() if v))

    @contextmanager
    def item(self, name: str) -> Iterator[Any]:
        """A sub-bar for one item; yields a ``(done, total)`` callback for the extractor."""
        task = self._progress.add_task(f"  {name}", total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(task, completed=done, total=total)
            if self._lines is not None:
                self._lines.update(self._lines.done, f"{name}: {done}/{total} {self.unit}s")

        try:
            yield update
        finally:
            self._progress.remove_task(task)

    def advance(self, outcome: Any) -> None:
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        self._progress.advance(self._task)
        if self._lines is not None:
            self._lines.advance(1)
        if outcome.status in ("failed", "missing"):
            what = escape(f"{outcome.patient_id}/{outcome.item_id}: {outcome.reason}")  # "[Errno 2]" is text
            console.print(f"[red]{outcome.status}[/red] {what}", highlight=False)
            _log.warning("%s %s/%s: %s", outcome.status, outcome.patient_id, outcome.item_id, outcome.reason,
                         extra=FILE_ONLY)  # shown above; the log file keeps it too
