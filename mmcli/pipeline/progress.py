"""Progress display for cohort runs (rich): a cohort bar plus a bar for the item in flight (tiles/s, ETA)."""
from __future__ import annotations

import sys
from collections.abc import Iterator
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

    The cohort bar counts items; an item's sub-bar counts ``unit`` (e.g. tiles) with its rate and ETA.
    """

    def __init__(self, total: int, title: str, unit: str = "item", enabled: bool = True) -> None:
        self.enabled = enabled and total > 0
        self.unit = unit
        self.total = total
        self.counts = {"done": 0, "cached": 0, "failed": 0, "missing": 0, "locked": 0}
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            _Rate(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not self.enabled, transient=False,
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

    @contextmanager
    def item(self, name: str) -> Iterator[Any]:
        """A sub-bar for one item; yields a ``(done, total)`` callback for the extractor."""
        task = self._progress.add_task(f"  {name}", total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(task, completed=done, total=total)

        try:
            yield update
        finally:
            self._progress.remove_task(task)

    def advance(self, outcome: Any) -> None:
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        self._progress.advance(self._task)
        if outcome.status in ("failed", "missing"):
            what = escape(f"{outcome.patient_id}/{outcome.item_id}: {outcome.reason}")  # "[Errno 2]" is text
            console.print(f"[red]{outcome.status}[/red] {what}", highlight=False)
            _log.warning("%s %s/%s: %s", outcome.status, outcome.patient_id, outcome.item_id, outcome.reason,
                         extra=FILE_ONLY)  # shown above; the log file keeps it too
