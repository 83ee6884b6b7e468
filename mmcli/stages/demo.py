"""``mmcli demo``: synth -> extract every modality -> fit every head -> report -> a small pre-specified ablation,
then a heads x metrics table.

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

console = Console(stderr=False)
if not console.is_terminal:  # piped output (a log, CI) would be cut at 80 columns
    console = Console(stderr=False, width=200)

HEADS = ("attention_mil", "fusion_mlp", "xgboost", "cox")
CLASSIFICATION_METRICS = ("auroc", "auprc", "f1_macro", "balanced_accuracy", "brier")
SURVIVAL_METRICS = ("c_index", "ibs", "td_auc")
ABLATION_FUSIONS = ("concat",)


def _step(title: str) -> None:
    console.rule(f"[bold]{title}")


def run_demo(out: str | Path, patients: int = 120, seed: int = 0, folds: int = 5) -> int:
    """Run the whole demo into ``out``; returns the exit code (0 ok, 1 if any step had item failures)."""
    from mmcli.heads import head_class
    from mmcli.stages.ablate import ablate, format_ablation
    from mmcli.stages.extract import extract, ingest_table
    from mmcli.stages.fit import fit
    from mmcli.stages.report import report
    from mmcli.stages.synth import synth

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    code = 0
    timings: dict[str, float] = {}

    _step("1/5 synth: synthetic multimodal cohort")
    t = time.perf_counter()
    cohort = synth(out / "cohort", patients=patients, seed=seed)
    timings["synth"] = time.perf_counter() - t
    console.print(f"cohort in {cohort.out_dir} ({timings['synth']:.1f}s)")

    _step("2/5 extract: every modality into the feature store")
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
    for name, table in cohort.tables.items():
        ingest_table(table=table, name=name, store=store)
        extracted.append(name)
    timings["extract"] = time.perf_counter() - t
    console.print(f"extracted {extracted} in {timings['extract']:.1f}s")

    _step("3/5 fit: every head on the cached features")
    results: dict[str, dict[str, Any]] = {}
    if not extracted:
        console.print("[yellow]skipped: nothing was extracted[/yellow]")
    else:
        t = time.perf_counter()
        for head in HEADS:
            classifies = bool({"binary", "multiclass"} & set(head_class(head).tasks))
            task = dict(target="subtype") if classifies else dict(time="time", event="event")
            run_dir = out / "runs" / head
            results[head] = fit(head, store, cohort.labels, run_dir, folds=folds, seed=seed, drop_unmatched=True,
                                overwrite=True, **task)  # a demo re-run replaces its runs
            report(run_dir)
        timings["fit"] = time.perf_counter() - t

    _step("4/5 ablate: each single modality vs all of them fused (pre-specified)")
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

    _step("5/5 results")
    if results:
        _print_table(results)
        (out / "demo_results.json").write_text(json.dumps(
            {"results": results, "ablation": ablation, "timings_s": timings, "extracted": extracted}, indent=2,
            default=str))
    timings["total"] = time.perf_counter() - t0
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return code


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
