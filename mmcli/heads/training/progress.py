"""Progress of a cross-validation: a bar over the folds (fold k/K, elapsed, ETA) and, inside the fold being
fitted, its epochs (torch heads report them through ``Head.on_epoch``), like extract's cohort and item bars."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

OnEpoch = Callable[[int, int], None]


class _NoBar:
    @contextmanager
    def fold(self, k: int) -> Iterator[OnEpoch | None]:
        yield None


class _FoldBar:
    def __init__(self, bar: object, n: int) -> None:
        self.bar, self.n = bar, n

    @contextmanager
    def fold(self, k: int) -> Iterator[OnEpoch]:
        with self.bar.item(f"fold {k + 1}/{self.n}") as update:  # type: ignore[attr-defined]
            yield update
        self.bar.advance(SimpleNamespace(status="done"))  # type: ignore[attr-defined]


@contextmanager
def fold_progress(n_folds: int, enabled: bool, title: str = "cross-validation") -> Iterator[_FoldBar | _NoBar]:
    """``with fold_progress(K, True) as bar: with bar.fold(k) as on_epoch: ...`` (a no-op when disabled)."""
    if not enabled:
        yield _NoBar()
        return
    from mmcli.pipeline.progress import CohortProgress

    with CohortProgress(n_folds, title, unit="epoch") as bar:
        yield _FoldBar(bar, n_folds)
