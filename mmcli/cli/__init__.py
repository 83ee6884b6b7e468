"""The ``mmcli`` command: parses, builds the typed options once, calls ``mmcli.stages``; errors become exit
codes in one place (:func:`handled`). Exit codes: 0 ok, 1 per-item failures (or a full disk), 2 bad usage or
input.

Modules: :mod:`~mmcli.cli.app` (the app, :func:`handled`, console lines), :mod:`~mmcli.cli.flags` (flags
generated from the Options models, the shared flags), and one module per group of commands. ``extract`` is
loaded only when invoked (its flags come from the modality option models, which import numpy).
"""
from __future__ import annotations

from mmcli.cli import demo, serve, stage1, stage2, study  # noqa: F401 - registering the commands
from mmcli.cli.app import app, handled, main

__all__ = ["app", "handled", "main"]
