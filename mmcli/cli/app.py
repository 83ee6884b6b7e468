"""The ``mmcli`` typer app and the one place errors become exit codes (:func:`handled`).

Exit codes: 0 ok, 1 per-item failures (or a full disk), 2 bad usage or input. Every command goes through
:func:`handled`, which sets up the command's log (:mod:`mmcli.pipeline.log`) and prints ``error: ...`` (an
unexpected exception prints one ``internal error: ...`` line and its traceback goes to the command's log file).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer
import typer.main
from typer.core import TyperGroup

from mmcli import __version__
from mmcli.pipeline.errors import EXIT_ITEM_FAILURES, MmcliError
from mmcli.pipeline.log import FILE_ONLY, command_log, get_logger, stamp
from mmcli.pipeline.signals import Interrupted

# commands whose flags are generated from heavy modules (extract: the modality option models import numpy and
# pandas): name -> (module holding a one-command typer app, one-line help); imported only when invoked
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("mmcli.cli.extract", "Stage 1: encode every file of one modality of the manifest into the "
                                     "feature store (resumable)."),
}


class LazyGroup(TyperGroup):
    """The root group: :data:`LAZY_COMMANDS` are built on first use, so ``mmcli fit`` never imports them."""

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: Any, name: str) -> Any:
        cmd = super().get_command(ctx, name)
        if cmd is None and name in LAZY_COMMANDS:
            sub = importlib.import_module(LAZY_COMMANDS[name][0]).app
            cmd = typer.main.get_command(sub)
            cmd.name = name
            self.commands[name] = cmd
        return cmd


app = typer.Typer(
    cls=LazyGroup,
    add_completion=False,
    no_args_is_help=True,
    help="mmcli: multimodal disease prediction as a two-stage feature-caching pipeline "
    "(stage 1 `extract` once, stage 2 `fit` as often as you like).",
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help panels; bracketed text such as "[default: ...]" is kept (rich mode eats it)
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature store.", rich_markup_mode="markdown")
audit_app = typer.Typer(no_args_is_help=True, help="Check the audit log of `mmcli serve`.", rich_markup_mode="markdown")
app.add_typer(store_app, name="store")
app.add_typer(audit_app, name="audit")

LogPath = Callable[[dict[str, Any]], "Path | None"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmcli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """mmcli: multimodal disease prediction as a two-stage feature-caching pipeline (stage 1 `extract` once,
    stage 2 `fit` as often as you like)."""


def fail(e: MmcliError) -> None:
    """Print ``error: <message>`` and exit with the error's code (the one place errors are printed)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(e.exit_code)


def say(message: str) -> None:
    """A result line on stdout, also kept in the command's log file."""
    typer.echo(message)
    get_logger().info(message, extra=FILE_ONLY)


def warn(message: str) -> None:
    """A warning on stderr, also kept in the command's log file."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
    get_logger().warning(message, extra=FILE_ONLY)


def safe_name(text: str) -> str:
    """``text`` usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40] or "_"


def runs_log(store: Path, what: str) -> Path:
    """``<store>.runs/<what>-<time>-<pid>.log``, beside the run records of extract and import."""
    return store.with_name(store.name + ".runs") / f"{what}-{stamp()}.log"


def num(v: float | None) -> str:
    """A metric for the console; None (undefined, e.g. a fold without events) prints as n/a."""
    return "n/a" if v is None else f"{v:.3f}"


def handled(log: LogPath | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a command with its log (``log(kwargs)`` -> log file path, or None) and map its errors to exit codes:
    :class:`MmcliError` -> ``error: ...`` and its ``exit_code``; any other exception -> one ``internal error``
    line, the traceback in the log file, exit 1; SIGINT / SIGTERM (:class:`Interrupted`, KeyboardInterrupt) ->
    ``error: interrupted by ...`` and exit 130 / 143. ``typer.Exit`` and click's own exits pass through."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            name = fn.__name__.removesuffix("_cmd").replace("_", " ")
            with command_log(name, log(kwargs) if log else None) as clog:
                try:
                    return fn(**kwargs)
                except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort,
                        click.ClickException) as e:
                    clog.file_only(f"exit {getattr(e, 'exit_code', 1)}", logging.DEBUG)
                    raise
                except MmcliError as e:
                    clog.file_only(f"error: {e}", logging.ERROR)
                    fail(e)
                except BrokenPipeError:
                    # the reader of stdout went away (`mmcli ... | head`): not an error of the command; click's
                    # standalone mode quiets the stream and exits 1, as Python's docs recommend
                    clog.file_only("stdout was closed by its reader (broken pipe)", logging.DEBUG)
                    raise
                except (Interrupted, KeyboardInterrupt) as e:
                    stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
                    clog.file_only(f"error: {stop}", logging.ERROR)
                    typer.secho(f"error: {stop}", fg=typer.colors.RED, err=True)
                    raise typer.Exit(stop.exit_code) from None
                except Exception as e:  # noqa: BLE001 - no raw traceback on the console, ever
                    clog.crash(e)
                    typer.secho(f"internal error: {type(e).__name__}: {e} (traceback in {clog.crash_log_path()}; "
                                "please report it)", fg=typer.colors.RED, err=True)
                    raise typer.Exit(EXIT_ITEM_FAILURES) from None

        return run

    return decorate


def main() -> None:
    """The console script: every command is registered when :mod:`mmcli.cli` is imported."""
    try:
        app()
    except MmcliError as e:  # raised outside a command's own handler
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:  # stdout's reader left before click could quiet it: no traceback at exit either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_ITEM_FAILURES)
