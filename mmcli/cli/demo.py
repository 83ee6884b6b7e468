"""``mmcli demo``: the whole pipeline on a synthetic cohort."""
from __future__ import annotations

from pathlib import Path

import typer

from mmcli.cli.app import app, handled


@app.command()
@handled(log=lambda kw: kw["out"] / "demo.log")
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the demo cohort, store and runs."),
    patients: int = typer.Option(120, "--patients", help="Patients in the synthetic cohort."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """synth -> extract every modality -> fit every head -> report -> ablation: the study
    mmcli/workflows/demo.yaml (resolved copy in OUT/study.yaml), one line per run with its report, then tables."""
    from mmcli.workflows.demo import run_demo

    code = run_demo(out, patients=patients, seed=seed)
    raise typer.Exit(code)
