"""``mmcli run study.yaml``: a whole study from one typed file (:mod:`mmcli.workflows.study_file`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmcli.cli.app import app, handled, say


def _log(kw: dict[str, Any]) -> Path | None:
    """``OUT/run.log`` when the study's out can be read cheaply, else no log file."""
    try:
        from mmcli.workflows.study_file import read_yaml

        out = kw.get("out") or read_yaml(kw["study"]).get("out")
        return None if out is None else (kw["study"].parent / str(out) if kw.get("out") is None else Path(out)) / \
            "run.log"
    except Exception:  # noqa: BLE001 - a bad file is reported by the command itself
        return None


@app.command("run")
@handled(log=_log)
def run_cmd(
    study: Path = typer.Argument(..., help="The study file (YAML): cohort, extraction, fits, comparisons, "
                                 "ablations, reports, exports. `mmcli run --check FILE` prints it resolved."),
    only: str | None = typer.Option(None, "--only", help="Comma list of the fits, ablations or comparisons "
                                    "(a-vs-b) to run; the cohort and extraction steps always run (cached)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder instead of the file's out:."),
    check: bool = typer.Option(False, "--check", help="Validate the study and print it resolved (every default, "
                               "absolute paths); run nothing."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No extraction progress display."),
) -> None:
    """Run a whole study from one file; it is written back resolved into OUT/study.yaml and every run folder, so
    any result can be replayed (`mmcli run OUT/runs/NAME/study.yaml --only NAME`)."""
    import yaml

    from mmcli.cli.flags import csv_list
    from mmcli.workflows.study import run_study
    from mmcli.workflows.study_file import load_study, resolved_doc

    spec = load_study(study, out=out)
    if check:
        say(yaml.safe_dump(resolved_doc(spec), sort_keys=False, allow_unicode=True, width=110).rstrip())
        return
    res = run_study(spec, only=csv_list(only), echo=say, progress=not no_progress)
    for name, path in res.reports.items():
        say(f"report {name}: {path}")
    for name, why in res.failed.items():
        say(f"FAILED {name}: {why}")
    say(f"study written back resolved: {spec.out / 'study.yaml'}")
    raise typer.Exit(res.code)
