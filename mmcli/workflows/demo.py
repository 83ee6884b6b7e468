"""``mmcli demo``: synth -> extract every modality -> fit every head -> report -> a small pre-specified ablation
-> a QuPath GeoJSON of one slide with its attention, then a heads x metrics table.

Besides one fit per head (classification of ``subtype`` where the head classifies, else survival), attention_mil
is fitted once more on ``time``/``event`` (``runs/attention_mil_survival``), so a survival report with attention
heatmaps and top tiles is part of the demo. The slide with the most tiles is exported as QuPath GeoJSON with the
classification run's out-of-fold attention per tile (``qupath/<slide>.geojson``) and drawn back over its
thumbnail (``qupath/<slide>.png``).

Every step calls the same stage functions as the CLI verbs; the demo never fabricates a result.

The ablation is fixed in advance (``ABLATION_SUBSETS``: each single modality, and all modalities together, with
``concat`` fusion) so that "fusion vs the best single modality" is one planned comparison, not the best of many
fits; ``mmcli ablate`` runs the full grid.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmcli.pipeline.errors import MmcliError
from mmcli.pipeline.io import atomic_write_text

console = Console(stderr=False)
if not console.is_terminal:  # piped output (a log, CI) would be cut at 80 columns
    console = Console(stderr=False, width=200)

HEADS = ("attention_mil", "fusion_mlp", "xgboost", "cox")
SURVIVAL = dict(time="time", event="event")
EXTRA_FITS = (("attention_mil_survival", "attention_mil", SURVIVAL),)  # (run name, head, task) beyond HEADS
CLASSIFICATION_METRICS = ("auroc", "auprc", "f1_macro", "balanced_accuracy", "brier")
SURVIVAL_METRICS = ("c_index", "ibs", "td_auc")
ABLATION_FUSIONS = ("concat",)


def _step(title: str) -> None:
    console.rule(f"[bold]{title}")


def run_demo(out: str | Path, patients: int = 120, seed: int = 0, folds: int = 5) -> int:
    """Run the whole demo into ``out``; returns the exit code (0 ok, 1 if any step had item failures)."""
    from mmcli.features.tabular import ingest_table
    from mmcli.heads import head_class
    from mmcli.stages.ablate import ablate, format_ablation
    from mmcli.stages.extract import extract
    from mmcli.stages.synth import synth

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    code = 0
    timings: dict[str, float] = {}

    _step("1/6 synth: synthetic multimodal cohort")
    t = time.perf_counter()
    cohort = synth(out / "cohort", patients=patients, seed=seed)
    timings["synth"] = time.perf_counter() - t
    console.print(f"cohort in {cohort.out_dir} ({timings['synth']:.1f}s)")

    _step("2/6 extract: every modality into the feature store")
    store = out / "features.zarr"
    extracted: list[str] = []
    t = time.perf_counter()
    for modality in ("wsi", "mri", "text"):
        try:
            summary = extract(modality=modality, manifest=cohort.manifest, store=store, progress=True)
        except (ValueError, KeyError, NotImplementedError) as e:
            console.print(f"[yellow]skipped {modality}: {e}[/yellow]")
            continue
        extracted.append(modality)
        console.print(f"{modality}: done={summary.count('done')} cached={summary.count('cached')} "
                      f"failed={len(summary.problems)}")
        code = max(code, summary.exit_code)
        if summary.stopped:  # SIGINT/SIGTERM or a full disk stopped the run: the demo stops with it
            console.print(f"[red]stopped: {summary.stopped}[/red]")
            return summary.exit_code
    for name, table in cohort.tables.items():
        ingest_table(table=table, name=name, store=store)
        extracted.append(name)
    timings["extract"] = time.perf_counter() - t
    console.print(f"extracted {extracted} in {timings['extract']:.1f}s")

    _step("3/6 fit: every head on the cached features")
    results: dict[str, dict[str, Any]] = {}
    if not extracted:
        console.print("[yellow]skipped: nothing was extracted[/yellow]")
    else:
        t = time.perf_counter()
        fits = [(head, head, dict(target="subtype") if {"binary", "multiclass"} & set(head_class(head).tasks)
                 else SURVIVAL) for head in HEADS]
        for name, head, task in [*fits, *EXTRA_FITS]:
            tf = time.perf_counter()
            results[name] = fit_and_report(head, store, cohort.labels, out / "runs" / name, task, folds=folds,
                                           seed=seed)
            timings[f"fit {name}"] = time.perf_counter() - tf
        timings["fit"] = time.perf_counter() - t

    _step("4/6 ablate: each single modality vs all of them fused (pre-specified)")
    ablation = None
    if len(extracted) < 2:
        console.print("[yellow]skipped: fewer than two modalities were extracted[/yellow]")
    else:
        t = time.perf_counter()
        subsets = [(m,) for m in extracted] + [tuple(extracted)]
        table = ablate(store, cohort.labels, out / "ablation", target="subtype", subsets=subsets,
                       fusions=ABLATION_FUSIONS, folds=folds, seed=seed, n_boot=200,
                       echo=lambda line: console.print(line, markup=False, highlight=False))
        timings["ablate"] = time.perf_counter() - t
        console.print(format_ablation(table), markup=False, highlight=False)
        ablation = table.attrs.get("summary")

    _step("5/6 QuPath GeoJSON: one slide with its out-of-fold attention per tile")
    geojson: dict[str, str] | None = None
    att_run = out / "runs" / "attention_mil"
    if not (att_run / "attention.csv").is_file():
        console.print("[yellow]skipped: no attention_mil run with attention.csv[/yellow]")
    else:
        t = time.perf_counter()
        try:
            gj, png = export_attention_geojson(store, att_run, out / "qupath")
        except (MmcliError, RuntimeError) as e:
            console.print(f"[red]GeoJSON export failed: {e}[/red]")
            code = max(code, 1)
        else:
            geojson = {"geojson": str(gj), "preview": str(png)}
            console.print(f"QuPath GeoJSON {gj} (File > Import objects from file), drawn over the slide in {png}")
        timings["geojson"] = time.perf_counter() - t

    _step("6/6 results")
    if results:
        _print_table(results)
        atomic_write_text(out / "demo_results.json", json.dumps(
            {"results": results, "ablation": ablation, "geojson": geojson, "timings_s": timings,
             "extracted": extracted}, indent=2, default=str))
    timings["total"] = time.perf_counter() - t0
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return code


def fit_and_report(head: str, store: Path, labels: str | Path, run_dir: Path, task: dict[str, str], *,
                   folds: int = 5, seed: int = 0, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit ``head`` on ``task`` (``target=...`` or ``time=..., event=...``) into ``run_dir`` (replaced on a
    re-run) and write its ``report.html``; returns fit's summary."""
    from mmcli.stages.fit import fit
    from mmcli.stages.report import report

    result = fit(head, store, labels, run_dir, folds=folds, seed=seed, drop_unmatched=True, overwrite=True,
                 params=params, **task)
    report(run_dir)
    return result


def export_attention_geojson(store: Path, run_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """QuPath GeoJSON of the slide with the most tiles in ``run_dir``'s ``attention.csv``, its tiles carrying
    their out-of-fold attention, and a PNG of the written file drawn over the slide thumbnail.
    Returns ``(geojson, png)``."""
    import pandas as pd

    from mmcli.features.interop.geojson import export_geojson, render_preview
    from mmcli.pipeline.rundir import load_run
    from mmcli.pipeline.store import open_store

    scores = run_dir / "attention.csv"
    att = pd.read_csv(scores, dtype={"patient_id": str, "item_id": str})
    counts = att.groupby(["patient_id", "item_id"]).size()
    pid, item = counts[counts == counts.max()].index[0]  # first by id among the largest slides
    eid = load_run(run_dir).encoder_ids.get("wsi")
    summary = export_geojson(store, out_dir, "wsi", eid, scores, items={(pid, item)})
    if summary.failed or not summary.written:
        raise RuntimeError(f"GeoJSON export of {pid}/{item} failed: {summary.failed}")
    gj = Path(summary.written[0])
    attrs = open_store(store, "r").item_attrs("wsi", summary.encoder_id, pid, item) or {}
    slide = (attrs.get("source_fingerprint") or {}).get("path")
    png = render_preview(gj, gj.with_suffix(".png"), slide if slide and Path(slide).is_file() else None)
    return gj, png


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    table = Table(title="heads x metrics (out-of-fold, mean [95% CI])")
    table.add_column("head")
    table.add_column("task")
    names = [m for m in CLASSIFICATION_METRICS + SURVIVAL_METRICS
             if any(m in r.get("metrics", {}) for r in results.values())]
    for m in names:
        table.add_column(m)
    for head, r in results.items():
        cells = []
        for m in names:
            v = r.get("metrics", {}).get(m)
            cells.append(f"{v['mean']:.3f} [{v['ci_low']:.2f}, {v['ci_high']:.2f}]" if v else "-")
        table.add_row(head, r.get("task", "?"), *cells)
    console.print(table)
