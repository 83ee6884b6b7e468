"""``mmcli extract``: its flags are generated from the modalities' option models (WSI, MRI, notes), one help
panel each, so a field added to ``WsiOptions`` is a flag with its description. Loaded only when invoked."""
from __future__ import annotations

from pathlib import Path

import typer

from mmcli.cli.app import handled, runs_log, safe_name, say, warn
from mmcli.cli.flags import SchedulerOpt, WorkersOpt, model_options
from mmcli.features.modalities import MODALITIES
from mmcli.pipeline.errors import InputError

app = typer.Typer(add_completion=False, rich_markup_mode="markdown", pretty_exceptions_enable=False)
TABLES = "Tables (--modality tabular)"
SHARED = "Options of several modalities"


def _models() -> list[tuple[type, str]]:
    """``(options model, help panel)`` of every registered modality."""
    return [(MODALITIES.get(n).options, f"--modality {n}") for n in MODALITIES.names()]


def _label(model: type) -> str:
    return next(n for n in MODALITIES.names() if MODALITIES.get(n).options is model)


@app.command()
@handled(log=lambda kw: runs_log(kw["store"], "extract-" + safe_name(kw["modality"])))
@model_options(*_models(), shared=SHARED, label=_label)
def extract(
    modality: str = typer.Option(..., "--modality", help="What to extract: "
                                 f"{', '.join(MODALITIES.names())} (files of the manifest) or tabular (a CSV or VCF)."),
    store: Path = typer.Option(..., "--store", help="Feature store: a .zarr directory (default) or .h5 file; "
                               "created if missing."),
    manifest: Path | None = typer.Option(None, "--manifest", help="Cohort manifest CSV: patient_id,modality,path"
                                         "[,item_id]; only rows of --modality are extracted."),
    force: bool = typer.Option(False, "--force", help="Re-extract items that are already cached."),
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bars."),
    table: Path | None = typer.Option(None, "--table", help="CSV with patient_id + feature columns (omics, "
                                      "proteomics, clinical); NaN kept, no scaling.", rich_help_panel=TABLES),
    name: str | None = typer.Option(None, "--name", help="Table name in the store (/tabular/NAME).",
                                    rich_help_panel=TABLES),
    id_column: str = typer.Option("patient_id", "--id-column", help="The patient id column.",
                                  rich_help_panel=TABLES),
    categorical: list[str] | None = typer.Option(None, "--categorical", help="Treat this column as categorical "
                                                 "(repeatable); text columns with <= 20 levels are categorical "
                                                 "anyway (2 levels -> 0/1, more -> one-hot).", rich_help_panel=TABLES),
    vcf: str | None = typer.Option(None, "--vcf", help="VCF file or glob (multi-sample or per patient; samples = "
                                   "patient ids) -> alt-allele dosage table.", rich_help_panel=TABLES),
    genes: str | None = typer.Option(None, "--genes", help="With --vcf: one column per gene (comma list or a file, "
                                     "one per line), variants assigned by their ANN/CSQ/GENE annotation.",
                                     rich_help_panel=TABLES),
    regions: Path | None = typer.Option(None, "--regions", help="With --vcf: one column per BED region.",
                                        rich_help_panel=TABLES),
    **options: object,
) -> None:
    """Stage 1: encode every file of one modality of the manifest into the feature store (resumable).

    Cached items (complete, same source fingerprint, same encoder_id) are skipped unless --force. A missing,
    corrupt or unsupported file is named and skipped; the rest finish and the exit code is 1. Unsafe or
    duplicate ids stop the run with exit 2 before any work. Each modality takes the flags of its panel.
    """
    from mmcli.stages.extract import extract as run_extract

    if modality.lower() == "tabular":
        modality = "tabular"
    if modality == "tabular" and vcf is not None:
        _extract_vcf(vcf, name, store, genes, regions, table, manifest)
    if modality == "tabular":
        _extract_table(table, name, store, id_column, categorical, manifest)
    if manifest is None:
        raise InputError(f"--modality {modality} needs --manifest CSV.")
    summary = run_extract(modality, manifest, store, force=force, scheduler=scheduler, workers=workers,
                          progress=not no_progress, **options)
    if not summary.outcomes:
        warn(f"{manifest} has no {modality} rows; nothing to do.")
    for line in summary.lines():
        say(line)
    raise typer.Exit(summary.exit_code)


def _extract_vcf(vcf: str, name: str | None, store: Path, genes: str | None, regions: Path | None,
                 table: Path | None, manifest: Path | None) -> None:
    """``extract --modality tabular --vcf``: dosage table into the store; always ends the command."""
    from mmcli.features.tabular import ingest_vcf

    if table is not None or manifest is not None or not name:
        raise InputError("--vcf takes --name NAME (not --table / --manifest): mmcli extract --modality tabular "
                         "--vcf 'calls/*.vcf.gz' --name variants [--genes TP53,KRAS | --regions loci.bed] --store S")
    res = ingest_vcf(vcf, name, store, genes=genes, regions=regions)
    say(f"tabular/{res['name']} -> {res['store']}: {res['patients']} patients x {res['features']} columns from "
        f"{res['files']} VCF(s), {100 * res['missing_fraction']:.1f}% missing genotypes (kept as NaN)")
    raise typer.Exit(0)


def _extract_table(table: Path | None, name: str | None, store: Path, id_column: str,
                   categorical: list[str] | None, manifest: Path | None) -> None:
    """``extract --modality tabular``: validate, ingest, report; always ends the command."""
    from mmcli.features.tabular import ingest_table

    if manifest is not None or table is None or not name:
        raise InputError("--modality tabular takes --table CSV and --name NAME (not --manifest): "
                         "mmcli extract --modality tabular --table genes.csv --name genes --store STORE")
    res = ingest_table(table, name, store, id_column=id_column, categorical=categorical or None)
    say(f"tabular/{res.name} -> {res.store}: {res.patients} patients x {res.features} features, "
        f"{100 * res.missing_fraction:.1f}% missing (kept as NaN)")
    for col, enc in res.encodings.items():
        say(f"  encoded {col} ({enc['type']}): {', '.join(enc['columns'])}")
    for w in res.warnings:
        say(f"  warning: {w}")
    raise typer.Exit(0)
