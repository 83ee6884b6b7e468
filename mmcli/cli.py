"""The ``mmcli`` command: parses, validates, calls ``mmcli.stages``. Exit codes: 0 ok, 1 per-item failures (or a
full disk), 2 bad usage or input.

Every command goes through :func:`handled`, the one place where errors become exit codes and console lines
(``error: ...``; an unexpected exception prints one ``internal error: ...`` line and its traceback goes to the
command's log file) and where the command's logging is set up (:mod:`mmcli.pipeline.log`).
"""
from __future__ import annotations

import functools
import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer

from mmcli.pipeline.errors import EXIT_ITEM_FAILURES, InputError, MmcliError
from mmcli.pipeline.log import FILE_ONLY, command_log, get_logger, stamp
from mmcli.pipeline.signals import Interrupted

# rich_markup_mode=None: plain help, so bracketed text such as "[default: ...]" is shown, not eaten as markup
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mmcli: multimodal disease prediction as a two-stage feature-caching pipeline "
    "(stage 1 `extract` once, stage 2 `fit` as often as you like).",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature store.", rich_markup_mode=None)
app.add_typer(store_app, name="store")

LogPath = Callable[[dict[str, Any]], "Path | None"]


def _fail(e: MmcliError) -> None:
    """Print ``error: <message>`` and exit with the error's code (the one place errors are printed)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(e.exit_code)


def _say(message: str) -> None:
    """A result line on stdout, also kept in the command's log file."""
    typer.echo(message)
    get_logger().info(message, extra=FILE_ONLY)


def _warn(message: str) -> None:
    """A warning on stderr, also kept in the command's log file."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
    get_logger().warning(message, extra=FILE_ONLY)


def _safe(text: str) -> str:
    """``text`` usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40] or "_"


def _runs_log(store: Path, what: str) -> Path:
    """``<store>.runs/<what>-<time>-<pid>.log``, beside the run records of extract and import."""
    return store.with_name(store.name + ".runs") / f"{what}-{stamp()}.log"


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
                    _fail(e)
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


# ---- synth ----------------------------------------------------------------------------------------------
@app.command()
@handled()
def synth(
    out: Path = typer.Option(..., "--out", help="Output folder for the synthetic cohort."),
    patients: int = typer.Option(120, "--patients", help="Number of patients (>= 8)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
) -> None:
    """Write a synthetic multimodal breast-cancer cohort (slides, MRI, notes, tables, manifest, labels)."""
    from mmcli.stages.synth import synth as run_synth

    res = run_synth(out, patients=patients, seed=seed)
    _say(f"wrote synthetic cohort of {patients} patients to {out}")
    _say(f"  manifest: {res.manifest}\n  labels:   {res.labels}")


# ---- store ----------------------------------------------------------------------------------------------
@store_app.command("info")
@handled()
def store_info(
    path: Path = typer.Argument(..., help="Store path (.zarr directory or .h5 file)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Modalities, encoders, patients, items, feature dims and size of a store."""
    from mmcli.pipeline.store import open_store

    info = open_store(path, "r").info()
    if as_json:
        _say(json.dumps(info, indent=2))
        return
    _say(f"{info['path']} ({info['backend']}, schema {info['schema_version']}, "
               f"{info['size_bytes'] / 1e6:.1f} MB)")
    for m, encs in info["modalities"].items():
        for e, d in encs.items():
            _say(f"  {m}/{e}: encoder={d['encoder']} patients={d['patients']} items={d['items']} "
                       f"rows={d['rows']} dims={d['dims']} incomplete={d['incomplete_items']}")
    for t, d in info["tables"].items():
        _say(f"  tabular/{t}: patients={d['patients']} features={d['features']}")


@store_app.command("verify")
@handled()
def store_verify(
    path: Path = typer.Argument(..., help="Store path (.zarr directory or .h5 file)."),
    repair: bool = typer.Option(False, "--repair", help="Remove incomplete/corrupt items so a re-run redoes them."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check every item (complete flag, shapes, finite values); exit 1 listing each problem."""
    from mmcli.pipeline.store import open_store

    store = open_store(path, "a" if repair else "r")
    problems = store.verify()
    removed = store.repair(problems) if repair and problems else []
    if as_json:
        _say(json.dumps({"problems": [str(p) for p in problems], "removed": removed}, indent=2))
    else:
        for p in problems:
            _say(f"problem: {p}")
        for r in removed:
            _say(f"removed: {r}")
        _say(f"{len(problems)} problem(s) in {path}" if problems else f"{path}: ok")
    raise typer.Exit(1 if problems and not repair else 0)


@store_app.command("share")
@handled()
def store_share(
    src: Path = typer.Argument(..., help="Store to share."),
    dst: Path = typer.Argument(..., help="New store to write (.zarr or .h5)."),
    pseudonymize: Path | None = typer.Option(
        None, "--pseudonymize", help="Secret key file (created if absent); ids become HMAC-SHA256 pseudonyms."),
    labels: Path | None = typer.Option(None, "--labels", help="Labels CSV to pseudonymise alongside."),
    labels_out: Path | None = typer.Option(None, "--labels-out", help="Where to write those labels."),
    mapping: Path | None = typer.Option(
        None, "--mapping", help="Also write patient_id -> pseudonym CSV (keep it private)."),
) -> None:
    """Copy a store for sharing: no source paths; with --pseudonymize, no original patient or item ids."""
    from mmcli.stages.share import share_store

    res = share_store(src, dst, pseudonymize, labels, labels_out, mapping)
    if res["key_created"]:
        typer.secho(f"created a new secret key in {pseudonymize}: keep it private, it maps the pseudonyms",
                    fg=typer.colors.YELLOW, err=True)
    _say(f"shared store {dst}: {res['items']} items, {res['patients']} patients, {res['tables']} tables"
               + (", ids pseudonymised" if res["pseudonymized"] else ""))


# ---- extract --------------------------------------------------------------------------------------------
# (extract, import and export commands are defined below this line)
@app.command()
@handled(log=lambda kw: _runs_log(kw["store"], "extract-" + _safe(kw["modality"])))
def extract(
    modality: str = typer.Option(..., "--modality", help="What to extract: wsi (slides), mri, text, tabular."),
    manifest: Path | None = typer.Option(None, "--manifest", help="Cohort manifest CSV: patient_id,modality,path"
                                         "[,item_id]; only rows of --modality are extracted."),
    store: Path = typer.Option(..., "--store", help="Feature store: a .zarr directory (default) or .h5 file; "
                               "created if missing."),
    encoder: str | None = typer.Option(None, "--encoder", help="Encoder. wsi: resnet50_trunc (default; CLAM's "
                                       "1024-d), timm:NAME (any timm model), timm:hf-hub:ORG/NAME (HF cache). "
                                       "mri: r3d18 (default; 1-channel 3-D ResNet-18, 512-d). text: minilm-l6 "
                                       "(default; 384-d, bundled), hf:NAME (offline HF cache) or a model folder."),
    weights: Path | None = typer.Option(None, "--weights", help="Encoder weights: .safetensors, or .pth/.pt "
                                        "(loaded with weights_only=True). Without weights and without a cached "
                                        "model: loud warning, seeded random init, pretrained=false."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda  (default: auto)"),
    precision: str | None = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16 | int8  (default: "
                                         "auto = fp16 on CUDA, bf16 on CPUs with native bf16, else fp32). wsi "
                                         "int8: OpenVINO + NNCF, calibrated on the cohort's tissue tiles, its own "
                                         "encoder_id, refused below --min-cosine"),
    runtime: str | None = typer.Option(None, "--runtime", help="auto | torch | torch-compile | openvino  (default: "
                                       "auto = OpenVINO on a CPU when installed, torch on CUDA; the converted "
                                       "model is cached in $MMCLI_CACHE or ~/.cache/mmcli)"),
    min_cosine: float | None = typer.Option(None, "--min-cosine", help="wsi --precision int8: least cosine of "
                                            "int8 to fp32 features on held-out tissue tiles  (default: 0.99)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Inputs per encoder batch  (wsi: 64 tiles; "
                                        "text: 16 windows)"),
    workers: int | None = typer.Option(None, "--workers", help="Worker processes of --scheduler local  "
                                       "(default: one per core)"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Run items as dask tasks: 'local' (a "
                                         "LocalCluster), a scheduler address such as tcp://HOST:8786, or the "
                                         "JSON file of `dask scheduler --scheduler-file`. Default: in this "
                                         "process."),
    force: bool = typer.Option(False, "--force", help="Re-extract items that are already cached."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bars."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the random init used when no weights exist  "
                                    "(default: 0)"),
    mpp: float | None = typer.Option(None, "--mpp", help="wsi: tile resolution in µm/px  (default: 0.5, about 20x)"),
    patch_size: int | None = typer.Option(None, "--patch-size", help="wsi: tile side in pixels at --mpp  "
                                          "(default: 224)"),
    reader: str | None = typer.Option(None, "--reader", help="wsi: auto | openslide | cucim | tiffslide  (default "
                                      "auto: cuCIM if installed, else OpenSlide; falls back to the next reader)"),
    default_mpp: float | None = typer.Option(None, "--default-mpp", help="wsi: µm/px to assume for slides "
                                             "without mpp metadata (without it such slides fail, named)."),
    min_tissue: float | None = typer.Option(None, "--min-tissue", help="wsi: minimum tissue fraction of a "
                                            "tile  (default: 0.25)"),
    tissue_threshold: float | None = typer.Option(None, "--tissue-threshold", help="wsi: HSV saturation "
                                                  "threshold in 0..1  (default: Otsu, floored at 0.06)"),
    min_tissue_area: float | None = typer.Option(None, "--min-tissue-area", help="wsi: drop tissue pieces "
                                                 "smaller than this, in µm²  (default: 20000)"),
    read_threads: int | None = typer.Option(None, "--read-threads", help="wsi: tile reading/decoding threads "
                                            "per slide  (default: min(8, cores), at least 2)"),
    qc: bool | None = typer.Option(None, "--qc/--no-qc", help="wsi: write a QC PNG per slide to "
                                   "<store>.qc/  (default: on)"),
    feature_dtype: str | None = typer.Option(None, "--feature-dtype", help="wsi: float16 | float32 stored  "
                                             "(default: float16)"),
    torch_threads: int | None = typer.Option(None, "--torch-threads", help="wsi: CPU threads of the encoder "
                                             "per process  (default: torch's; cores / workers with --scheduler local)"),
    # wsi, before a tile is encoded (docs/extract.md); fields of WsiOptions
    remove_artifacts: str | None = typer.Option(None, "--remove-artifacts", help="wsi: artefact checks that "
                                                "remove tiles, comma-separated: blur, pen, dark, grandqc  "
                                                "(default: none)"),
    blur_threshold: float | None = typer.Option(None, "--blur-threshold", help="wsi blur: least sharpness of a "
                                                "kept tile (Laplacian variance at --mpp)  (default: 6)"),
    pen_max: float | None = typer.Option(None, "--pen-max", help="wsi pen: ink share that removes a tile  "
                                         "(default: 0.05)"),
    dark_max: float | None = typer.Option(None, "--dark-max", help="wsi dark: very dark share that removes a "
                                          "tile  (default: 0.5)"),
    artifact_weights: Path | None = typer.Option(None, "--artifact-weights", help="wsi grandqc: GrandQC artefact "
                                                 "checkpoint, a local file"),
    artifact_max: float | None = typer.Option(None, "--artifact-max", help="wsi grandqc: artefact share that "
                                              "removes a tile  (default: 0.25)"),
    stain_norm: str | None = typer.Option(None, "--stain-norm", help="wsi: macenko | reinhard stain "
                                          "normalisation of every tile  (default: none)"),
    stain_reference: Path | None = typer.Option(None, "--stain-reference", help="wsi --stain-norm: reference "
                                                "image  (default: built-in, see docs/extract.md)"),
    tissue_model: str | None = typer.Option(None, "--tissue-model", help="wsi: hest | grandqc learned tissue "
                                            "segmentation (with --tissue-weights)  (default: saturation/Otsu)"),
    tissue_weights: Path | None = typer.Option(None, "--tissue-weights", help="wsi --tissue-model: the published "
                                               "checkpoint, a local file (never downloaded)"),
    tissue_geojson: Path | None = typer.Option(None, "--tissue-geojson", help="wsi: folder of QuPath/TRIDENT "
                                               "<slide stem>.geojson (level-0 px); tiles only inside"),
    geojson_classes: str | None = typer.Option(None, "--geojson-classes", help="wsi --tissue-geojson: keep these "
                                               "classifications, comma-separated, e.g. Tumor  (default: all)"),
    spacing: str | None = typer.Option(None, "--spacing", help="mri: voxel spacing in mm after resampling, one "
                                       "number (isotropic) or X,Y,Z in RAS order  (default: 1.5)"),
    shape: str | None = typer.Option(None, "--shape", help="mri: grid in voxels X,Y,Z (or one number) that the "
                                     "RAS volume is centre-cropped/padded to  (default: 64,64,64)"),
    volume_index: int | None = typer.Option(None, "--volume-index", help="mri: volume of a 4-D image to encode  "
                                            "(default: 0, with a warning)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="text: window in tokens, special tokens "
                                          "included  (default: the model's own, 256 for minilm-l6)"),
    stride: int | None = typer.Option(None, "--stride", help="text: tokens shared by consecutive windows of a "
                                      "long note  (default: max-tokens / 4)"),
    pooling: str | None = typer.Option(None, "--pooling", help="text: token pooling per window, mean | cls  "
                                       "(default: mean); windows are averaged, weighted by their token counts"),
    max_note_chars: int | None = typer.Option(None, "--max-note-chars", help="text: characters of a note that "
                                              "are encoded; a longer note is cut there with a warning, recorded in "
                                              "the item  (default: 200000)"),
    table: Path | None = typer.Option(None, "--table", help="tabular: CSV with patient_id + feature columns "
                                      "(omics, proteomics, clinical); NaN kept, no scaling."),
    name: str | None = typer.Option(None, "--name", help="tabular: table name in the store (/tabular/NAME)."),
    id_column: str = typer.Option("patient_id", "--id-column", help="tabular: the patient id column."),
    categorical: list[str] | None = typer.Option(None, "--categorical", help="tabular: treat this column as "
                                                 "categorical (repeatable); text columns with <= 20 levels are "
                                                 "categorical anyway (2 levels -> 0/1, more -> one-hot)."),
    vcf: str | None = typer.Option(None, "--vcf", help="tabular: bgzipped, indexed VCF file or glob (multi-sample "
                                   "or per patient; samples = patient ids) -> alt-allele dosage table."),
    genes: str | None = typer.Option(None, "--genes", help="tabular --vcf: one column per gene (comma list or a "
                                     "file, one per line), variants assigned by their ANN/CSQ/GENE annotation."),
    regions: Path | None = typer.Option(None, "--regions", help="tabular --vcf: one column per BED region."),
) -> None:
    """Stage 1: encode every file of one modality of the manifest into the feature store (resumable).

    Cached items (complete, same source fingerprint, same encoder_id) are skipped unless --force. A missing,
    corrupt or unsupported file is named and skipped; the rest finish and the exit code is 1. Unsafe or
    duplicate ids stop the run with exit 2 before any work.
    """
    from mmcli.stages.extract import extract as run_extract
    from mmcli.stages.extract import summary_lines

    if modality == "tabular" and vcf is not None:
        _extract_vcf(vcf, name, store, genes, regions, table, manifest)
    if modality == "tabular":
        _extract_table(table, name, store, id_column, categorical, manifest)
    if manifest is None:
        raise InputError(f"--modality {modality} needs --manifest CSV.")
    options = dict(
        encoder=encoder, weights=weights, device=device, precision=precision, runtime=runtime,
        min_cosine=min_cosine, batch_size=batch_size, seed=seed,
        mpp=mpp, patch_size=patch_size, reader=reader, default_mpp=default_mpp, min_tissue=min_tissue,
        tissue_threshold=tissue_threshold, min_tissue_area=min_tissue_area, read_threads=read_threads, qc=qc,
        feature_dtype=feature_dtype, torch_threads=torch_threads, spacing=spacing, shape=shape,
        volume_index=volume_index, max_tokens=max_tokens, stride=stride, pooling=pooling,
        max_note_chars=max_note_chars,
        remove_artifacts=remove_artifacts, blur_threshold=blur_threshold, pen_max=pen_max, dark_max=dark_max,
        artifact_weights=artifact_weights, artifact_max=artifact_max, stain_norm=stain_norm,
        stain_reference=stain_reference, tissue_model=tissue_model, tissue_weights=tissue_weights,
        tissue_geojson=tissue_geojson, geojson_classes=geojson_classes,
    )
    summary = run_extract(modality, manifest, store, force=force, scheduler=scheduler, workers=workers,
                          progress=not no_progress, **options)
    if not summary.outcomes:
        _warn(f"{manifest} has no {modality} rows; nothing to do.")
    for line in summary_lines(summary):
        _say(line)
    raise typer.Exit(summary.exit_code)


def _extract_vcf(vcf: str, name: str | None, store: Path, genes: str | None, regions: Path | None,
                 table: Path | None, manifest: Path | None) -> None:
    """``extract --modality tabular --vcf``: dosage table into the store; always ends the command."""
    from mmcli.features.tabular import ingest_vcf

    if table is not None or manifest is not None or not name:
        raise InputError("--vcf takes --name NAME (not --table / --manifest): mmcli extract --modality tabular "
                         "--vcf 'calls/*.vcf.gz' --name variants [--genes TP53,KRAS | --regions loci.bed] --store S")
    res = ingest_vcf(vcf, name, store, genes=genes, regions=regions)
    _say(f"tabular/{res['name']} -> {res['store']}: {res['patients']} patients x {res['features']} columns from "
         f"{res['files']} VCF(s), {100 * res['missing_fraction']:.1f}% missing genotypes (kept as NaN)")
    raise typer.Exit(0)


def _extract_table(table: Path | None, name: str | None, store: Path, id_column: str,
                   categorical: list[str] | None, manifest: Path | None) -> None:
    """``extract --modality tabular``: validate, ingest, report; always ends the command."""
    from mmcli.stages.extract import ingest_table

    if manifest is not None or table is None or not name:
        raise InputError("--modality tabular takes --table CSV and --name NAME (not --manifest): "
                         "mmcli extract --modality tabular --table genes.csv --name genes --store STORE")
    res = ingest_table(table, name, store, id_column=id_column, categorical=categorical or None)
    _say(f"tabular/{res.name} -> {res.store}: {res.patients} patients x {res.features} features, "
               f"{100 * res.missing_fraction:.1f}% missing (kept as NaN)")
    for col, enc in res.encodings.items():
        _say(f"  encoded {col} ({enc['type']}): {', '.join(enc['columns'])}")
    for w in res.warnings:
        _say(f"  warning: {w}")
    raise typer.Exit(0)


@app.command("import")
@handled(log=lambda kw: _runs_log(kw["store"], "import"))
def import_cmd(
    fmt: str = typer.Option(..., "--format", help="Layout of the files: clam | trident | stamp."),
    source: Path = typer.Option(..., "--from", help="Folder searched (recursively) for <slide stem>.h5 or "
                                "<item_id>.h5 of every slide in the manifest, e.g. CLAM's output dir, a TRIDENT "
                                "job dir, a STAMP output dir."),
    manifest: Path = typer.Option(..., "--manifest", help="Cohort manifest CSV: maps slides to patients (the "
                                  "slide files themselves need not exist)."),
    store: Path = typer.Option(..., "--store", help="Feature store (.zarr or .h5); created if missing."),
    encoder_id: str | None = typer.Option(None, "--encoder-id", help="Store key of these features  (default: "
                                          "FORMAT_ENCODER-HASH from the files, e.g. stamp_ctranspath-1a2b3c4d5e)"),
    modality: str = typer.Option("wsi", "--modality", help="Manifest modality of the slides."),
    mpp: float | None = typer.Option(None, "--mpp", help="stamp: level-0 µm/px of the slides, to turn STAMP's "
                                     "micrometre coords into level-0 pixels  (default: read from each slide "
                                     "when reachable; otherwise coords are dropped with a warning)"),
    force: bool = typer.Option(False, "--force", help="Re-import files that are already in the store."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="local | ADDRESS: import as dask tasks."),
    workers: int | None = typer.Option(None, "--workers", help="Worker processes of --scheduler local."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bars."),
) -> None:
    """Import CLAM / TRIDENT / STAMP tile-feature h5 files (features + level-0 coords + provenance)."""
    from mmcli.stages.extract import summary_lines
    from mmcli.stages.import_ import import_features

    summary = import_features(fmt, source, manifest, store, encoder_id=encoder_id, modality=modality, mpp=mpp,
                              force=force, scheduler=scheduler, workers=workers, progress=not no_progress)
    for line in summary_lines(summary):
        _say(line)
    raise typer.Exit(summary.exit_code)


@app.command("export")
@handled()
def export_cmd(
    fmt: str = typer.Option(..., "--format", help="Layout to write: clam (h5_files/, pt_files/, patches/), "
                            "trident (<mag>x_<size>px_0px_overlap/features_<encoder>/), stamp (<encoder>/) or "
                            "geojson (QuPath: <slide>.geojson with tissue outline and tiles)."),
    store: Path = typer.Option(..., "--store", help="Feature store to read."),
    out: Path = typer.Option(..., "--out", help="Output folder (also gets manifest.csv for mmcli import)."),
    modality: str = typer.Option("wsi", "--modality", help="Modality to export."),
    encoder_id: str | None = typer.Option(None, "--encoder-id", help="Encoder to export  (default: the only one)"),
    mpp: float | None = typer.Option(None, "--mpp", help="Level-0 µm/px of the slides where items do not record "
                                     "it (STAMP's micrometre coords, TRIDENT's level0_magnification)."),
    extractor_name: str | None = typer.Option(None, "--extractor-name", help="Encoder name the files state "
                                              "(STAMP's extractor, TRIDENT's features_<name> folder)  (default: "
                                              "the store's, mapped to STAMP's names, e.g. uni_v1 -> uni)"),
    scores: Path | None = typer.Option(None, "--scores", help="geojson: per-tile scores CSV (patient_id,item_id,"
                                       "index + numeric columns, e.g. attention.csv of a fit run) written as "
                                       "tile measurements."),
) -> None:
    """Export stored tile features as CLAM / TRIDENT / STAMP h5 files, one per slide; an item the target tool
    could not read (no coords, unknown tile size or magnification) is refused by name (exit 1)."""
    from mmcli.features.interop.exporter import n_files
    from mmcli.stages.export import export

    res = export(fmt, store, out, modality=modality, encoder_id=encoder_id, mpp=mpp, extractor_name=extractor_name,
                 scores=scores)
    _say(f"{res.format}: {n_files(res)} file(s) of {res.modality}/{res.encoder_id} -> {res.out}"
         + (f" (manifest {res.manifest})" if res.manifest else ""))
    for item, reason in res.failed:
        _say(f"  failed: {item}: {reason}")
    for w in res.warnings:
        _say(f"  warning: {w}")
    raise typer.Exit(res.exit_code)



@app.command()
@handled()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check this machine: slide readers, devices (CUDA, CPU bf16/VNNI), runtimes, store backends, the Hugging
    Face cache and which presets have weights locally. Exit 1 (with a fix for each) when something is wrong."""
    from mmcli.stages.doctor import doctor as run_doctor

    report = run_doctor()
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            _say(line)
    raise typer.Exit(report.exit_code)


# ---- fit / predict / report -------------------------------------------------------------------------------
# (stage-2 commands are defined below this line)
def _csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _fit_log(kw: dict[str, Any]) -> Path:
    """fit.log is written into the run's staging folder, which becomes ``--out`` when the fit succeeds (until
    then the previous run's fit.log is left alone)."""
    from mmcli.pipeline.rundir import LOG_NAME, staging_path

    return staging_path(kw["out"]) / LOG_NAME


@app.command()
@handled(log=_fit_log)
def fit(
    head: str = typer.Option(..., "--head", help="attention_mil | fusion_mlp | xgboost | cox"),
    store: Path = typer.Option(..., "--store", help="Feature store written by `mmcli extract`."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV: patient_id + target columns."),
    out: Path = typer.Option(..., "--out", help="Run folder (config, metrics.json, predictions.csv, model/)."),
    target: str | None = typer.Option(None, "--target", help="Classification target column (binary or multiclass)."),
    time: str | None = typer.Option(None, "--time", help="Survival time column (any unit; > 0)."),
    event: str | None = typer.Option(None, "--event", help="Survival event column: 1 = observed, 0 = censored."),
    modalities: str | None = typer.Option(None, "--modalities", help="Comma list of store modalities and table "
                                          "names, e.g. wsi,mri,text,genes  (default: all the head can use)"),
    encoder: list[str] = typer.Option([], "--encoder", help="MODALITY=ENCODER_ID where a modality has several "
                                      "encoders in the store (repeatable)."),
    fusion: str | None = typer.Option(None, "--fusion", help="fusion_mlp operator: concat | gated | attention | "
                                      "cross_attention | bilinear  (default: concat)"),
    param: list[str] = typer.Option([], "--param", help="Head parameter KEY=VALUE (JSON value), repeatable, "
                                    "e.g. --param epochs=30 --param loss=focal."),
    folds: int = typer.Option(5, "--folds", help="Patient-level cross-validation folds."),
    seed: int = typer.Option(0, "--seed"),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% CIs."),
    drop_unmatched: bool = typer.Option(False, "--drop-unmatched", help="Leave out rows with a missing label value "
                                        "instead of stopping with an error. (Patients only in the labels or only "
                                        "in the store are always left out, with a note.)"),
    impute: str | None = typer.Option(None, "--impute", help="In-fold imputation with a missingness indicator "
                                      "per feature: mean | median | knn | iterative (vector heads)."),
    batch_correct: str | None = typer.Option(None, "--batch-correct", help="In-fold batch correction: combat "
                                             "(needs --batch-column)."),
    batch_column: str | None = typer.Option(None, "--batch-column", help="Labels column (or store table column) "
                                            "holding each patient's batch: site, scanner, sequencing run."),
    batch_keep: str | None = typer.Option(None, "--batch-keep", help="Comma list of covariate columns whose effect "
                                          "batch correction protects, e.g. age,sex."),
    init: Path | None = typer.Option(None, "--init", help="fusion_mlp: start the per-modality projections from "
                                     "the encoders of `mmcli pretrain --out DIR`."),
    calibrate: str = typer.Option("none", "--calibrate", help="Recalibrate probabilities: none | platt | isotonic, "
                                  "fitted inside each training fold on its inner cross-validated probabilities; "
                                  "saved with the model and applied by predict."),
    operating_point: str | None = typer.Option(None, "--operating-point", help="Binary: sens=RATE or spec=RATE; "
                                               "the threshold is chosen on the training folds only (nested), "
                                               "stored in the model; predict adds a decision column."),
    subgroups: str | None = typer.Option(None, "--subgroups", help="Columns of the labels or a store table, "
                                         "e.g. site,age or age:edges=40,60 (numeric: quartiles by default)."),
    min_subgroup: int = typer.Option(10, "--min-subgroup", help="Groups smaller than this are reported as too "
                                     "small, without metrics."),
    dca_thresholds: str = typer.Option("0.01:0.99:0.01", "--dca-thresholds", help="Decision-curve threshold "
                                       "probabilities: START:STOP:STEP or a comma list."),
    horizon: float | None = typer.Option(None, "--horizon", help="Survival decision curve: the event probability "
                                         "by time T (labels' time unit)."),
    inner_folds: int = typer.Option(5, "--inner-folds", help="Inner folds (per training fold) for --calibrate and "
                                    "--operating-point."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out (whole: no file "
                                   "of it is kept). Without it an existing, non-empty --out is refused."),
) -> None:
    """Stage 2: cross-validate a head on cached features, then refit on all patients for `predict`.

    --out is locked while the fit runs and replaced only at the end: an error, a full disk, Ctrl-C or SIGTERM
    leave the previous run there as it was.
    """
    from mmcli.heads.evaluation.evidence import EvidenceOptions
    from mmcli.stages.fit import fit as run_fit
    from mmcli.stages.fit import parse_encoders, parse_params

    evidence = EvidenceOptions.build(dict(calibrate=calibrate, operating_point=operating_point, subgroups=subgroups,
                                          min_subgroup=min_subgroup, dca_thresholds=dca_thresholds, horizon=horizon,
                                          inner_folds=inner_folds)).check()
    params = parse_params(param, head)
    if fusion:
        params["fusion"] = fusion
    if init is not None:
        params["init"] = str(init.resolve())
    res = run_fit(head, store, labels, out, target=target, time=time, event=event,
                  modalities=_csv_list(modalities), encoders=parse_encoders(encoder) or None, folds=folds,
                  seed=seed, params=params or None, n_boot=n_boot, drop_unmatched=drop_unmatched,
                  log=get_logger().info, impute=impute, batch_correct=batch_correct, batch_column=batch_column,
                  batch_keep=_csv_list(batch_keep), evidence=evidence, overwrite=overwrite)
    _say(f"{head} ({res['task']}, {res['n_patients']} patients, {res['folds']} folds) -> {out}")
    for name, m in res["metrics"].items():
        _say(f"  {name:18s} {_num(m['mean'])}  [{_num(m['ci_low'])}, {_num(m['ci_high'])}]")
    _say_evidence(res)


def _say_evidence(res: dict) -> None:
    """Console lines for the calibration / operating point / drift blocks of a metrics.json."""
    for cls, c in ((res.get("calibration") or {}).get("classes") or {}).items():
        a, b = c["intercept"], c["slope"]
        _say(f"  calibration {cls}: intercept {_num(a['value'])} [{_num(a['ci_low'])}, {_num(a['ci_high'])}], "
             f"slope {_num(b['value'])} [{_num(b['ci_low'])}, {_num(b['ci_high'])}]")
    op = res.get("operating_point")
    if op:
        thr = op.get("final_threshold", op.get("threshold"))
        parts = [f"{k} {_num(v['value'])} [{_num(v['ci_low'])}, {_num(v['ci_high'])}]"
                 for k, v in op["metrics"].items() if k != "counts"]
        _say(f"  operating point (threshold {_num(thr)}): " + ", ".join(parts))
    for name, d in ((res.get("drift") or {}).get("modalities") or {}).items():
        _say(f"  drift {name}: AUROC {_num(d.get('auroc'))}, p {_num(d.get('p_value'))}, "
             f"mean SMD {_num(d.get('mean_smd'))}{' (shift)' if d.get('shift_detected') else ''}")


def _num(v: float | None) -> str:
    """A metric for the console; None (undefined, e.g. a fold without events) prints as n/a."""
    return "n/a" if v is None else f"{v:.3f}"


@app.command()
@handled(log=lambda kw: kw["out"] / "pretrain.log")
def pretrain(
    store: Path = typer.Option(..., "--store", help="Feature store (labels are not needed)."),
    modalities: str = typer.Option(..., "--modalities", help="Comma list of >= 2 store modalities / tables, "
                                   "e.g. wsi,text,genes."),
    out: Path = typer.Option(..., "--out", help="Folder for the encoders (safetensors + pretrain.json)."),
    encoder: list[str] = typer.Option([], "--encoder", help="MODALITY=ENCODER_ID (repeatable)."),
    hidden: int = typer.Option(32, "--hidden", help="Encoder size; equal to fusion_mlp's hidden (default 32)."),
    epochs: int = typer.Option(100, "--epochs"),
    temperature: float = typer.Option(0.1, "--temperature", help="InfoNCE temperature, > 0."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Contrastive (CLIP-style) pretraining of per-modality encoders on cached modality pairs."""
    from mmcli.stages.fit import parse_encoders
    from mmcli.stages.pretrain import pretrain as run_pretrain

    res = run_pretrain(store, _csv_list(modalities) or [], out, encoders=parse_encoders(encoder) or None,
                       hidden=hidden, epochs=epochs, temperature=temperature, seed=seed, log=get_logger().info)
    _say(f"pretrained on {res['patients']} patients {res['pairs']}: InfoNCE {res['loss_first']:.3f} -> "
         f"{res['loss_last']:.3f} -> {out}")


@app.command()
@handled(log=lambda kw: kw["out"].with_name(kw["out"].stem + ".predict.log"))
def predict(
    model: Path = typer.Option(..., "--model", help="Run folder of `mmcli fit` (or its model/ folder)."),
    store: Path = typer.Option(..., "--store", help="Feature store holding the patients to score."),
    out: Path = typer.Option(..., "--out", help="Predictions CSV to write."),
    attention: bool = typer.Option(False, "--attention", help="Also write <out stem>.attention.csv "
                                   "(patient_id,item_id,index,attention) for attention heads."),
    covariates: Path | None = typer.Option(None, "--covariates", help="CSV with patient_id and the batch column "
                                           "(and protected covariates) of a batch-corrected model."),
) -> None:
    """Score every patient of a store with a fitted model (CPU is fine)."""
    from mmcli.stages.predict import predict as run_predict

    df = run_predict(model, store, out, attention=attention, covariates=covariates)
    if "batch_corrected" in df and not df["batch_corrected"].all():
        _warn(f"{int((~df['batch_corrected']).sum())} patient(s) left without batch correction (batch missing or "
              "not seen in training); see the batch_corrected column.")
    _say(f"scored {len(df)} patients -> {out}")


@app.command()
@handled(log=lambda kw: kw["out"] / "evaluate.log")
def evaluate(
    model: Path = typer.Option(..., "--model", help="Run folder of `mmcli fit` (or its model/ folder)."),
    store: Path = typer.Option(..., "--store", help="Feature store of the new (external) cohort."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV of the new cohort."),
    out: Path = typer.Option(..., "--out", help="Folder: metrics.json, predictions.csv, report.html."),
    target: str | None = typer.Option(None, "--target", help="Classification column  (default: the run's)"),
    time: str | None = typer.Option(None, "--time", help="Survival time column  (default: the run's)"),
    event: str | None = typer.Option(None, "--event", help="Survival event column  (default: the run's)"),
    train_store: Path | None = typer.Option(None, "--train-store", help="Store the model was fitted on, for the "
                                            "drift section  (default: the one recorded in the run)"),
    subgroups: str | None = typer.Option(None, "--subgroups", help="Columns of the labels or a store table, "
                                         "e.g. site,age or age:edges=40,60."),
    min_subgroup: int = typer.Option(10, "--min-subgroup", help="Groups smaller than this are reported as too "
                                     "small."),
    dca_thresholds: str = typer.Option("0.01:0.99:0.01", "--dca-thresholds", help="START:STOP:STEP or a comma "
                                       "list."),
    horizon: float | None = typer.Option(None, "--horizon", help="Survival decision curve horizon (time unit of "
                                         "the labels)."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% CIs."),
    n_permutations: int = typer.Option(200, "--n-permutations", help="Permutations of the drift test."),
    seed: int = typer.Option(0, "--seed"),
    drop_unmatched: bool = typer.Option(False, "--drop-unmatched", help="Leave out rows with a missing label."),
) -> None:
    """External validation: score another cohort with a fitted model; metrics, calibration, decision curve,
    subgroups, drift against the training store, and a report."""
    from mmcli.heads.evaluation.evidence import EvidenceOptions
    from mmcli.stages.evaluate import evaluate as run_evaluate

    evidence = EvidenceOptions.build(dict(subgroups=subgroups, min_subgroup=min_subgroup,
                                          dca_thresholds=dca_thresholds, horizon=horizon)).check()
    res = run_evaluate(model, store, labels, out, target=target, time=time, event=event, train_store=train_store,
                       evidence=evidence, n_boot=n_boot, seed=seed, n_permutations=n_permutations,
                       drop_unmatched=drop_unmatched, log=get_logger().info)
    _say(f"evaluated {res['head']} ({res['task']}) on {res['n_patients']} patients -> {out}")
    for name, m in res["metrics"].items():
        _say(f"  {name:18s} {_num(m['mean'])}  [{_num(m['ci_low'])}, {_num(m['ci_high'])}]")
    _say_evidence(res)
    _say(f"wrote {out / 'metrics.json'}, {out / 'predictions.csv'} and {out / 'report.html'}")


@app.command()
@handled(log=lambda kw: (kw["out"].parent if kw["out"] else kw["run"]) / "report.log")
def report(
    run: Path = typer.Option(..., "--run", help="Run folder of `mmcli fit`."),
    out: Path | None = typer.Option(None, "--out", help="HTML file  (default: RUN/report.html)"),
    attention_patients: int = typer.Option(3, "--attention-patients", help="Patients with attention heatmaps."),
    top_tiles: int = typer.Option(8, "--top-tiles", help="Top-attention tiles shown per patient."),
    card: bool = typer.Option(False, "--card", help="Also write RUN/model_card.md and RUN/model_card.json."),
) -> None:
    """Write a self-contained HTML report (metrics with CIs, curves, calibration, KM, attention, SHAP)."""
    from mmcli.stages.report import report as run_report

    path = run_report(run, out=out, attention_patients=attention_patients, top_tiles=top_tiles)
    _say(str(path))
    if card:
        from mmcli.stages.card import write_card

        for p in write_card(run):
            _say(str(p))


@app.command()
@handled()
def compare(
    run_a: Path = typer.Argument(..., help="First run folder."),
    run_b: Path = typer.Argument(..., help="Second run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    n_boot: int = typer.Option(2000, "--n-boot"),
    seed: int = typer.Option(0, "--seed"),
    alpha: float = typer.Option(0.05, "--alpha"),
) -> None:
    """Is run A better than run B on the same patients? DeLong (AUROC) or paired bootstrap (c-index)."""
    from mmcli.stages.compare import compare as run_compare
    from mmcli.stages.compare import format_comparison

    res = run_compare(run_a, run_b, n_boot=n_boot, seed=seed, alpha=alpha)
    _say(json.dumps(res, indent=2, default=str) if as_json else format_comparison(res))


@app.command()
@handled(log=lambda kw: kw["out"] / "ablate.log")
def ablate(
    store: Path = typer.Option(..., "--store"),
    labels: Path = typer.Option(..., "--labels"),
    out: Path = typer.Option(..., "--out", help="Folder: one run per fit, ablation.csv, ablation.png."),
    target: str | None = typer.Option(None, "--target"),
    time: str | None = typer.Option(None, "--time"),
    event: str | None = typer.Option(None, "--event"),
    modalities: str | None = typer.Option(None, "--modalities", help="Comma list  (default: all in the store)"),
    fusions: str = typer.Option("concat,gated,attention,cross_attention,bilinear", "--fusions"),
    heads: str = typer.Option("fusion_mlp", "--heads"),
    max_subset_size: int | None = typer.Option(None, "--max-subset-size", help="Every subset up to K modalities "
                                               "(default: singles, pairs and the full set)"),
    subsets: str | None = typer.Option(None, "--subsets", help='Exactly these subsets, e.g. "wsi+genes,wsi"'),
    encoder: list[str] = typer.Option([], "--encoder", help="MODALITY=ENCODER_ID (repeatable)."),
    param: list[str] = typer.Option([], "--param", help="Head parameter KEY=VALUE (repeatable)."),
    folds: int = typer.Option(5, "--folds"),
    seed: int = typer.Option(0, "--seed"),
    metric: str | None = typer.Option(None, "--metric", help="Metric of the table  (default: auroc for "
                                      "classification, c_index for survival)"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    keep_unmatched: bool = typer.Option(False, "--keep-unmatched", help="Stop instead of dropping patients "
                                        "that lack a subset's modalities."),
    force: bool = typer.Option(False, "--force", help="Refit runs that already exist."),
    no_compare: bool = typer.Option(False, "--no-compare", help="Skip best-fused vs best-single test."),
) -> None:
    """Fit modality subsets x fusion operators; write a table and a bar chart with CIs."""
    from mmcli.stages.ablate import ablate as run_ablate
    from mmcli.stages.ablate import format_ablation, parse_subsets
    from mmcli.stages.fit import parse_encoders, parse_params

    table = run_ablate(
        store, labels, out, target=target, time=time, event=event, modalities=_csv_list(modalities),
        fusions=tuple(_csv_list(fusions) or ()), heads=tuple(_csv_list(heads) or ()),
        encoders=parse_encoders(encoder) or None, folds=folds, seed=seed,
        params=parse_params(param, _csv_list(heads) or ()) or None,
        max_subset_size=max_subset_size, subsets=parse_subsets(subsets) if subsets else None, metric=metric,
        force=force, compare_best=not no_compare, n_boot=n_boot, drop_unmatched=not keep_unmatched,
        echo=_say)
    _say(format_ablation(table))
    _say(f"wrote {out / 'ablation.csv'}, {out / 'ablation.png'} and {out / 'ablation_summary.json'}")
    failed = table["status"].astype(str).str.startswith("failed").any() if "status" in table else False
    raise typer.Exit(1 if failed else 0)




# ---- demo -----------------------------------------------------------------------------------------------
@app.command()
@handled(log=lambda kw: kw["out"] / "demo.log")
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the demo cohort, store and runs."),
    patients: int = typer.Option(120, "--patients", help="Patients in the synthetic cohort."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """synth -> extract every modality -> fit every head -> report, then print a heads x metrics table."""
    from mmcli.stages.demo import run_demo

    code = run_demo(out, patients=patients, seed=seed)
    raise typer.Exit(code)


# ---- serve / audit ----------------------------------------------------------------------------------------
audit_app = typer.Typer(no_args_is_help=True, help="Check the audit log of `mmcli serve`.", rich_markup_mode=None)
app.add_typer(audit_app, name="audit")


def _serve_log(kw: dict[str, Any]) -> Path:
    from mmcli.stages.serve.app import default_audit_log

    audit = kw["audit_log"] or default_audit_log(kw["model"])
    return audit.parent / f"serve-{stamp()}.log"


@app.command()
@handled(log=_serve_log)
def serve(
    model: Path = typer.Option(..., "--model", help="Run folder of `mmcli fit` (or its model/ folder)."),
    token_file: Path = typer.Option(..., "--token-file", help="File holding the bearer token clients must send "
                                    "(Authorization: Bearer TOKEN); must exist and be non-empty."),
    store: Path | None = typer.Option(None, "--store", help="Feature store whose patients may be scored by id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (no TLS: put a TLS proxy in front "
                             "before listening beyond this machine)."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free port, printed)."),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="Audit log file  (default: RUN/audit/audit.log)"),
    audit_max_mb: float = typer.Option(64.0, "--audit-max-mb", help="Rotate the audit log at this size (MB)."),
    max_instances: int = typer.Option(20000, "--max-instances", help="Most instances (tiles) in one bag."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body (MB); larger: 413."),
    top_k: int = typer.Option(10, "--top-k", help="Top-attention tiles returned per bag modality by default."),
) -> None:
    """Serve a fitted run over HTTP: GET /health, GET /model (model card), POST /predict, /docs."""
    from mmcli.stages.serve.app import serve as run_serve
    from mmcli.stages.serve.schemas import Limits

    if audit_max_mb <= 0 or max_body_mb <= 0:
        flag = "--audit-max-mb" if audit_max_mb <= 0 else "--max-body-mb"
        raise InputError(f"{flag} must be above 0.", flag=flag)
    if host not in ("127.0.0.1", "localhost", "::1"):
        _warn(f"listening on {host}: mmcli serve speaks plain HTTP; put a TLS-terminating proxy in front.")
    if token_file.is_file() and token_file.stat().st_mode & 0o077:
        _warn(f"{token_file} is readable by other users; `chmod 600 {token_file}`.")
    limits = Limits(max_instances=max_instances, max_body_bytes=int(max_body_mb * 1024 * 1024),
                    default_top_k=top_k, max_top_k=max(100, top_k))
    run_serve(model, token_file, store=store, host=host, port=port, audit_log=audit_log,
              audit_max_bytes=int(audit_max_mb * 1024 * 1024), limits=limits, say=_say)


@audit_app.command("verify")
@handled()
def audit_verify(
    log: Path = typer.Argument(..., help="Audit log of `mmcli serve` (its rotated LOG.NNNNNN files are read too)."),
) -> None:
    """Check the hash chain of an audit log; exit 1 naming the first edited, missing or reordered line."""
    from mmcli.stages.serve.audit import verify_log

    res = verify_log(log)
    for note in res.notes:
        _warn(note)
    _say(f"ok: {res.lines} lines in {len(res.files)} file(s), chain intact (last hash {res.last_hash[:16]}...)")


def main() -> None:
    try:
        app()
    except MmcliError as e:  # raised outside a command's own handler
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()


# ---- federate -------------------------------------------------------------------------------------------
@app.command()
@handled(log=lambda kw: kw["out"] / "federate.log")
def federate(
    head: str = typer.Option("fusion_mlp", "--head", help="A torch head: fusion_mlp | attention_mil."),
    sites: str = typer.Option(..., "--sites", help="Comma list of site feature stores, e.g. "
                              "site_a.zarr,site_b.zarr (patient ids unique across sites)."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV covering every site's patients."),
    target: str | None = typer.Option(None, "--target", help="Classification target column."),
    time: str | None = typer.Option(None, "--time", help="Survival: follow-up time column (with --event)."),
    event: str | None = typer.Option(None, "--event", help="Survival: event column, 1 = observed, 0 = censored."),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, predictions.csv, models/<site>/."),
    rounds: int = typer.Option(10, "--rounds", help="Federated rounds."),
    local_epochs: int = typer.Option(2, "--local-epochs", help="Epochs each site trains per round."),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg | fedprox"),
    proximal_mu: float = typer.Option(0.01, "--proximal-mu", help="FedProx proximal term weight mu (>= 0)."),
    test_size: float = typer.Option(0.3, "--test-size", help="Share of each site's patients held out for testing."),
    modalities: str | None = typer.Option(None, "--modalities", help="Comma list of modalities and tables "
                                          "(default: all the head can use)."),
    param: list[str] = typer.Option([], "--param", help="Head parameter KEY=VALUE (JSON value), repeatable."),
    engine: str = typer.Option("simulation", "--engine", help="simulation (Flower's simulation engine, Ray) | "
                               "local (the same Flower strategy and clients driven in this process)."),
    seed: int = typer.Option(0, "--seed"),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% CIs."),
) -> None:
    """Federated training across site stores with Flower (only weights move), evaluated per site and pooled
    against centralised training on the same patients."""
    from mmcli.stages.federate import federate as run_federate
    from mmcli.stages.fit import parse_params

    res = run_federate(head, _csv_list(sites) or [], labels, out, target=target, time=time, event=event, rounds=rounds,
                       local_epochs=local_epochs, strategy=strategy, proximal_mu=proximal_mu, test_size=test_size,
                       modalities=_csv_list(modalities), seed=seed, params=parse_params(param, head) or None,
                       n_boot=n_boot, engine=engine, log=get_logger().info)
    _say(f"{head} federated ({res['strategy']}, {len(res['sites'])} sites, {res['rounds']} rounds) -> {out}")
    metric = res["comparison"]["metric"]
    for name, s in [*res["sites"].items(), ("pooled", res["pooled"])]:
        f, c = s["federated"][metric], s["centralised"][metric]
        _say(f"  {name:12s} {metric} federated {_num(f['mean'])} [{_num(f['ci_low'])}, {_num(f['ci_high'])}]  "
             f"centralised {_num(c['mean'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]")
