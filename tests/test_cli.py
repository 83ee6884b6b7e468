"""The CLI's one error/log decorator: exit codes, ``error:`` lines without tracebacks, internal errors logged
with their traceback, help texts that keep their defaults, the command log file, and formula-escaped CSVs
from ``fit`` and ``predict`` with a class label that a spreadsheet would run."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from helpers.planted_data import make_store
from mmcli import cli
from mmcli.cli.app import say
from mmcli.pipeline.errors import DiskFullError, InputError, ItemError
from mmcli.pipeline.log import get_logger
from mmcli.pipeline.rundir import load_run

EVIL = "=cmd|' /C calc'!A0"
FORMULA = ("=", "+", "-", "@")


def _app(body, log_to: Path | None = None) -> typer.Typer:
    """A one-command app whose command runs ``body()`` under :func:`mmcli.cli.handled`."""
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.command()
    @cli.handled(log=(lambda kw: log_to) if log_to else None)
    def boom(flag: int = typer.Option(0, "--flag")) -> None:
        body()

    @app.command()
    def other() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    return app


@pytest.mark.parametrize(("error", "code"), [(InputError("labels.csv: bad row 3. Fix: edit it"), 2),
                                              (DiskFullError("disk full: /x (needs about 3 MB more)"), 1),
                                              (ItemError("slide.svs: corrupt"), 1)])
def test_mmcli_errors_exit_with_their_code_and_one_line(error, code, tmp_path: Path) -> None:
    def body() -> None:
        raise error

    r = CliRunner().invoke(_app(body, tmp_path / "cmd.log"), ["boom"])
    assert r.exit_code == code and f"error: {error}" in r.output and "Traceback" not in r.output
    log = (tmp_path / "cmd.log").read_text()
    assert f"error: {error}" in log


def test_unexpected_exception_is_one_line_and_the_traceback_goes_to_the_log(tmp_path: Path) -> None:
    def body() -> None:
        {}["missing_key"]

    r = CliRunner().invoke(_app(body, tmp_path / "cmd.log"), ["boom"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "internal error: KeyError: 'missing_key'" in r.output and str(tmp_path / "cmd.log") in r.output
    log = (tmp_path / "cmd.log").read_text()
    assert "Traceback (most recent call last)" in log and "KeyError: 'missing_key'" in log


def test_internal_error_without_an_output_folder_logs_to_the_fallback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def body() -> None:
        raise RuntimeError("nope")

    r = CliRunner().invoke(_app(body, tmp_path / "never" / "cmd.log"), ["boom"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    logs = list((tmp_path / "state" / "mmcli" / "logs").glob("boom-*.log"))  # per user, mode 0700 (test_security)
    assert len(logs) == 1 and str(logs[0]) in r.output and "RuntimeError: nope" in logs[0].read_text()
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("code", [0, 1, 2])
def test_a_command_exit_passes_through(code: int, tmp_path: Path) -> None:
    def body() -> None:
        (tmp_path / "out").mkdir(exist_ok=True)
        raise typer.Exit(code)

    r = CliRunner().invoke(_app(body, tmp_path / "out" / "cmd.log"), ["boom"])
    assert r.exit_code == code and r.output == ""
    assert f"exit {code}" in (tmp_path / "out" / "cmd.log").read_text()


def test_bad_input_before_any_output_leaves_no_folder_behind(tmp_path: Path) -> None:
    def body() -> None:
        get_logger().info("checking inputs")
        raise InputError("--flag 0: must be positive")

    r = CliRunner().invoke(_app(body, tmp_path / "out" / "cmd.log"), ["boom"])
    assert r.exit_code == 2 and "checking inputs" in r.output and not (tmp_path / "out").exists()


def test_messages_reach_console_and_log_file_library_noise_only_the_file(tmp_path: Path) -> None:
    def body() -> None:
        (tmp_path / "out").mkdir()
        get_logger("stage").info("loaded 12 patients")
        logging.getLogger("tiffslide").warning("invalid page offset")
        warnings.warn("a library deprecation", DeprecationWarning, stacklevel=1)
        say("result line")

    r = CliRunner().invoke(_app(body, tmp_path / "out" / "cmd.log"), ["boom"])
    assert r.exit_code == 0, r.output
    assert "loaded 12 patients" in r.output and "result line" in r.output
    assert "invalid page offset" not in r.output and "deprecation" not in r.output
    log = (tmp_path / "out" / "cmd.log").read_text()
    for text in ("loaded 12 patients", "result line", "invalid page offset", "a library deprecation"):
        assert text in log, text
    # handlers are removed after the command
    assert get_logger().handlers == [] and get_logger().propagate


def _help(*args: str) -> str:
    """A command's --help as one line of text (help panels wrap at the terminal's width)."""
    out = CliRunner().invoke(cli.app, [*args, "--help"], env={"COLUMNS": "300"}).output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())


def test_help_keeps_bracketed_and_parenthesised_defaults() -> None:
    fit_help = _help("fit")
    assert "(default: concat)" in fit_help and "gated]" not in fit_help
    assert "(default: all the head can use)" in fit_help and "[default: 5]" in fit_help
    ablate_help = _help("ablate")
    assert "(default: auroc for classification, c_index for survival, r2 for regression)" in ablate_help
    assert "(default: singles, pairs and the full set)" in ablate_help
    report_help = _help("report")
    assert "(default: RUN/report.html)" in report_help


def test_fusion_help_names_the_real_default() -> None:
    from mmcli.heads.models.fusion_mlp import FusionMLPHead  # the registered fusion_mlp head

    default = FusionMLPHead.Params.model_fields["fusion"].default  # the head's typed parameter model
    assert f"(default: {default})" in _help("fit")


def _cells(path: Path) -> list[str]:
    return [c for line in path.read_text().splitlines() for c in line.split(",")]


def test_fit_and_predict_escape_formula_labels_and_write_the_fit_log(tmp_path: Path) -> None:
    """A class label ``=cmd|' /C calc'!A0`` is written as text (``'=cmd...``) into predictions.csv and predict's
    CSV, and still reads back as the label; ``mmcli fit`` leaves ``fit.log`` in the run folder."""
    p = make_store(tmp_path / "s.zarr", n=24, task="binary", seed=3, modalities=("genes",))
    labels = p.labels.replace({"label": {"pos": EVIL}}).reset_index()
    labels.to_csv(tmp_path / "labels.csv", index=False)
    run = tmp_path / "run"
    r = CliRunner().invoke(cli.app, ["fit", "--head", "xgboost", "--store", str(p.store), "--labels",
                                     str(tmp_path / "labels.csv"), "--target", "label", "--out", str(run),
                                     "--folds", "2", "--n-boot", "5", "--param", "n_estimators=3"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    log = (run / "fit.log").read_text()
    assert "24 patients" in log and "xgboost (classification, 24 patients, 2 folds)" in log
    cells = _cells(run / "predictions.csv")
    assert not [c for c in cells if c.startswith(FORMULA)] and f"'{EVIL}" in cells
    loaded = load_run(run)
    assert loaded.classes == [EVIL, "neg"] and set(loaded.require_predictions()["y_true"]) == {EVIL, "neg"}
    assert len(loaded.class_index()) == 24

    out = tmp_path / "pred" / "scores.csv"
    r = CliRunner().invoke(cli.app, ["predict", "--model", str(run), "--store", str(p.store), "--out", str(out)])
    assert r.exit_code == 0, r.output
    cells = _cells(out)
    assert not [c for c in cells if c.startswith(FORMULA)]
    assert f"prob_{EVIL}" in out.read_text().splitlines()[0]
    df = pd.read_csv(out)
    assert set(df["y_pred"]) <= {f"'{EVIL}", "neg"}
    assert (tmp_path / "pred" / "scores.predict.log").is_file()


def test_failed_fit_writes_no_run_folder(tmp_path: Path) -> None:
    p = make_store(tmp_path / "s.zarr", n=12, task="binary", seed=3, modalities=("genes",))
    p.labels.reset_index().to_csv(tmp_path / "labels.csv", index=False)
    run = tmp_path / "run"
    r = CliRunner().invoke(cli.app, ["fit", "--head", "xgboost", "--store", str(p.store), "--labels",
                                     str(tmp_path / "labels.csv"), "--target", "nope", "--out", str(run)])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "Traceback" not in r.output
    assert not run.exists()


def test_fit_refuses_bad_run_options_with_exit_2(tmp_path: Path) -> None:
    """Issue 25 item 9: `fit --n-boot 0` (and other out-of-range run options) is exit 2 naming the flag, before
    anything is read or written."""
    for flag, value, want in (("--n-boot", "0", "--n-boot"), ("--n-boot", "-5", "--n-boot"),
                              ("--folds", "1", "--folds"), ("--memory-budget", "lots", "--memory-budget"),
                              ("--task", "ranking", "--task")):
        r = CliRunner().invoke(cli.app, ["fit", "--head", "xgboost", "--store", str(tmp_path / "s.zarr"), "--labels",
                                         str(tmp_path / "l.csv"), "--target", "y", "--out", str(tmp_path / "run"),
                                         flag, value])
        assert r.exit_code == 2 and want in r.output and "Traceback" not in r.output, (flag, r.output)
        assert not (tmp_path / "run").exists()
