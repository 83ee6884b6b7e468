"""Graceful stop on SIGINT / SIGTERM for commands that write one result at the end (``fit``).

Inside :func:`stop_on_signals` the first SIGINT or SIGTERM raises :class:`Interrupted` in the main thread,
wherever it is (a training loop, a metric bootstrap). It is a ``BaseException``, so no ``except Exception``
on the way swallows it; ``finally`` blocks and context managers clean up (the run's staging folder, its
lock), and the CLI exits 128 + the signal number (130 SIGINT, 143 SIGTERM) with a message. Further signals
while it unwinds are ignored, so a second Ctrl-C cannot cut the clean-up short (SIGKILL still can).

:func:`critical` marks a few statements that must not be cut in half (the renames that swap a new run in):
a signal arriving inside it is held and raised right after. Outside the main thread (a library caller's
worker thread) nothing is installed and both are no-ops.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mmcli.pipeline.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
__all__ = ["SIGNALS", "Interrupted", "critical", "stop_on_signals"]


class _State:
    def __init__(self) -> None:
        self.critical = 0
        self.pending: int | None = None
        self.raised = False

    def handler(self, signum: int, _frame: Any) -> None:
        if self.raised:
            return
        if self.critical:
            self.pending = signum
            return
        self.raised = True
        raise Interrupted(signum)


_ACTIVE: list[_State] = []


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT / SIGTERM raise :class:`Interrupted` inside the block (main thread only); handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = _State()
    old = {s: signal.signal(s, state.handler) for s in SIGNALS}
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.remove(state)
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT / SIGTERM for the length of the block; one that came meanwhile is raised after it."""
    state = _ACTIVE[-1] if _ACTIVE and threading.current_thread() is threading.main_thread() else None
    if state is None:
        yield
        return
    state.critical += 1
    try:
        yield
    except BaseException:
        state.critical -= 1
        raise
    state.critical -= 1
    if not state.critical and state.pending is not None and not state.raised:
        state.raised = True
        raise Interrupted(state.pending)
