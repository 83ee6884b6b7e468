"""``mmcli demo``: the study in :data:`DEMO_STUDY` (``demo.yaml`` beside this module) run into ``--out``:
synth -> extract every modality -> fit every head, each with its report -> a small pre-specified ablation -> a
QuPath GeoJSON of one slide with its attention, then the headline tables.

Besides one fit per head (classification of ``subtype`` where the head classifies, else survival), attention_mil
is fitted once more on ``time``/``event`` (``runs/attention_mil_survival``), so a survival report with attention
heatmaps and top tiles is part of the demo. The slide with the most tiles is exported as QuPath GeoJSON with the
classification run's out-of-fold attention per tile (``qupath/<slide>.geojson``) and drawn back over its
thumbnail (``qupath/<slide>.png``).

Everything runs through :func:`mmcli.workflows.study.run_study`, the same steps as ``mmcli run``; the demo never
fabricates a result. It prints one line per run with its headline metric and its report's path as the run
finishes (each fit's own progress lines pass through, indented), and at the end one table per task (metrics as
rows, runs as columns, so it fits an 80-column terminal) and the list of reports.

The ablation is fixed in advance (each single modality, and all modalities together, with ``concat`` fusion) so
that "fusion vs the best single modality" is one planned comparison, not the best of many fits; ``mmcli ablate``
runs the full grid.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmcli.pipeline.io import atomic_write_text
from mmcli.workflows.exports import export_attention_geojson  # noqa: F401 - the demo's export, re-exported
from mmcli.workflows.study import StudyResult, results_doc, run_study
from mmcli.workflows.study_file import load_study, read_yaml

DEMO_STUDY = Path(__file__).with_name("demo.yaml")
CLASSIFICATION_METRICS = ("auroc", "auprc", "f1_macro", "balanced_accuracy", "brier")
SURVIVAL_METRICS = ("c_index", "ibs", "td_auc")
EXTRA_FITS = (("attention_mil_survival", "attention_mil", dict(time="time", event="event")),)

console = Console(stderr=False)
if not console.is_terminal:  # piped output (a log, CI): no terminal width to fit, but keep lines readable
    console = Console(stderr=False, width=120)


def demo_study(out: str | Path, patients: int = 120, seed: int = 0, folds: int = 5) -> Any:
    """The demo's study with ``out``, the cohort size and seed and the folds set (validated like any study)."""
    doc = read_yaml(DEMO_STUDY)
    doc["cohort"]["synth"] = {"patients": patients, "seed": seed}
    doc["fit_defaults"] = {**doc.get("fit_defaults", {}), "folds": folds, "seed": seed}
    doc["ablations"] = [{**a, "folds": folds, "seed": seed} for a in doc.get("ablations", [])]
    return load_study(doc, out=out, base=Path.cwd())


def run_demo(out: str | Path, patients: int = 120, seed: int = 0, folds: int = 5, *, progress: bool = True) -> int:
    """Run the demo into ``out``; returns the exit code (0 ok, 1 if any step had item failures, a stop's code)."""
    study = demo_study(out, patients, seed, folds)

    def echo(line: str) -> None:
        if line.startswith("== "):
            console.rule(f"[bold]{line[3:]}")
        else:
            console.print(line, markup=False, highlight=False, soft_wrap=True)

    res = run_study(study, echo=echo, progress=progress)
    if res.stopped:
        return res.code
    if res.fits:
        print_tables(res)
        atomic_write_text(study.out / "demo_results.json", json.dumps(results_doc(res), indent=2))
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()), highlight=False)
    console.print(f"the study, resolved: {study.out / 'study.yaml'} (replay: mmcli run {study.out / 'study.yaml'})",
                  markup=False, highlight=False, soft_wrap=True)
    return res.code


def _cell(v: dict[str, Any] | None) -> str:
    """``0.812`` over ``[0.75, 0.86]`` (two lines: a column stays 12 characters wide)."""
    if not isinstance(v, dict) or v.get("mean") is None:
        return "-"
    from mmcli.heads.evaluation import headline

    lo, hi, _ = headline.headline_interval(v)
    ci = f"\n[{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{v['mean']:.3f}{ci}"


def tables(res: StudyResult) -> list[tuple[str, Table]]:
    """``(caption, table)`` per task: metrics as rows, runs as columns, cells ``mean`` over ``[headline 95%
    CI]``."""
    out = []
    for task, names in (("classification", CLASSIFICATION_METRICS), ("survival", SURVIVAL_METRICS)):
        runs = {n: r for n, r in res.fits.items() if r.get("task") == task}
        if not runs:
            continue
        caption = f"{task}: out-of-fold mean over folds [95% CI: corrected t over folds]"
        table = Table()
        table.add_column("metric", no_wrap=True)
        for name in runs:
            table.add_column(name, justify="right", overflow="fold", min_width=12)
        for m in names:
            if any(m in (r.get("metrics") or {}) for r in runs.values()):
                table.add_row(m, *(_cell((r.get("metrics") or {}).get(m)) for r in runs.values()))
        out.append((caption, table))
    return out


def fit_and_report(head: str, store: Path, labels: str | Path, run_dir: Path, task: dict[str, str], *,
                   folds: int = 5, seed: int = 0, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One demo fit outside a study: ``head`` on ``task`` (``target=...`` or ``time=..., event=...``) into
    ``run_dir`` (replaced on a re-run) with its ``report.html``; returns fit's summary."""
    from mmcli.stages.fit import fit
    from mmcli.stages.report import report

    result = fit(head, store, labels, run_dir, folds=folds, seed=seed, drop_unmatched=True, overwrite=True,
                 params=params, **task)
    report(run_dir)
    return result


def print_tables(res: StudyResult) -> None:
    for caption, table in tables(res):
        console.print(caption, markup=False, highlight=False)
        console.print(table)
    if res.reports:
        console.print("reports:", highlight=False)
        for name, path in res.reports.items():
            console.print(f"  {name}: {path}", markup=False, highlight=False, soft_wrap=True)
    for name, why in res.failed.items():
        console.print(f"  {name}: FAILED: {why}", markup=False, highlight=False, soft_wrap=True)
