"""Stage-1 and store commands: synth, store info / verify / share, import, export, doctor (extract is in
:mod:`mmcli.cli.extract`, loaded only when invoked)."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from mmcli.cli.app import app, handled, runs_log, say, store_app
from mmcli.cli.flags import JsonOpt, SchedulerOpt, StoreOpt, WorkersOpt, model_options
from mmcli.pipeline.errors import InputError
from mmcli.stages.heatmap import HeatmapOptions


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
    say(f"wrote synthetic cohort of {patients} patients to {out}")
    say(f"  manifest: {res.manifest}\n  labels:   {res.labels}")


@store_app.command("info")
@handled()
def store_info(
    path: Path = typer.Argument(..., help="Store path (.zarr directory or .h5 file)."),
    as_json: JsonOpt = False,
) -> None:
    """Modalities, encoders, patients, items, feature dims and size of a store."""
    from mmcli.pipeline.store import open_store

    info = open_store(path, "r").info()
    if as_json:
        say(json.dumps(info, indent=2))
        return
    say(f"{info['path']} ({info['backend']}, schema {info['schema_version']}, "
               f"{info['size_bytes'] / 1e6:.1f} MB)")
    for m, encs in info["modalities"].items():
        for e, d in encs.items():
            say(f"  {m}/{e}: encoder={d['encoder']} patients={d['patients']} items={d['items']} "
                       f"rows={d['rows']} dims={d['dims']} incomplete={d['incomplete_items']}")
    for t, d in info["tables"].items():
        say(f"  tabular/{t}: patients={d['patients']} features={d['features']}")


@store_app.command("verify")
@handled()
def store_verify(
    path: Path = typer.Argument(..., help="Store path (.zarr directory or .h5 file)."),
    repair: bool = typer.Option(False, "--repair", help="Remove incomplete/corrupt items so a re-run redoes them."),
    as_json: JsonOpt = False,
) -> None:
    """Check every item (complete flag, shapes, chunks, checksums, finite values); exit 1 listing each problem."""
    from mmcli.pipeline.store import open_store

    store = open_store(path, "a" if repair else "r", check_root=False)  # a broken root is reported, not refused
    notes: list[str] = []
    problems = store.verify(notes=notes)
    removed = store.repair(problems) if repair and problems else []
    if as_json:
        say(json.dumps({"problems": [str(p) for p in problems], "removed": removed, "notes": notes}, indent=2))
    else:
        for p in problems:
            say(f"problem: {p}")
        for r in removed:
            say(f"removed: {r}")
        if notes:  # valid items that cannot be fully checked: reported, not counted as problems
            say(f"note: {len(notes)} item(s) unverified, e.g. {notes[0]}")
        say(f"{len(problems)} problem(s) in {path}" if problems else f"{path}: ok")
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
    say(f"shared store {dst}: {res['items']} items, {res['patients']} patients, {res['tables']} tables"
               + (", ids pseudonymised" if res["pseudonymized"] else ""))


@app.command("import")
@handled(log=lambda kw: runs_log(kw["store"], "import"))
def import_cmd(
    store: StoreOpt,
    fmt: str = typer.Option(..., "--format", help="Layout of the files: clam | trident | stamp."),
    source: Path = typer.Option(..., "--from", help="Folder searched (recursively) for <slide stem>.h5 or "
                                "<item_id>.h5 of every slide in the manifest, e.g. CLAM's output dir, a TRIDENT "
                                "job dir, a STAMP output dir."),
    manifest: Path = typer.Option(..., "--manifest", help="Cohort manifest CSV: maps slides to patients (the "
                                  "slide files themselves need not exist)."),
    encoder_id: str | None = typer.Option(None, "--encoder-id", help="Store key of these features  (default: "
                                          "FORMAT_ENCODER-HASH from the files, e.g. stamp_ctranspath-1a2b3c4d5e)"),
    modality: str = typer.Option("wsi", "--modality", help="Manifest modality of the slides."),
    mpp: float | None = typer.Option(None, "--mpp", help="stamp: level-0 µm/px of the slides, to turn STAMP's "
                                     "micrometre coords into level-0 pixels  (default: read from each slide "
                                     "when reachable; otherwise coords are dropped with a warning)"),
    patch_size: int | None = typer.Option(None, "--patch-size", help="clam: tile side in px at --patch-level "
                                          "where the files do not state it (no patches/ beside h5_files/)  "
                                          "(default: derived from the coords stride, as STAMP does)"),
    patch_level: int = typer.Option(0, "--patch-level", help="clam: pyramid level --patch-size is given at (>0 "
                                    "needs the slides reachable for their downsamples)"),
    force: bool = typer.Option(False, "--force", help="Re-import files that are already in the store."),
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bars."),
) -> None:
    """Import CLAM / TRIDENT / STAMP tile-feature h5 files (features + level-0 coords + provenance), or their slide
    embeddings (TRIDENT slide_features_<encoder>/, STAMP slide encodings) as the 'slide' modality."""
    from mmcli.stages.import_ import import_features

    summary = import_features(fmt, source, manifest, store, encoder_id=encoder_id, modality=modality, mpp=mpp,
                              force=force, scheduler=scheduler, workers=workers, progress=not no_progress,
                              patch_size=patch_size, patch_level=patch_level)
    for line in summary.lines():
        say(line)
    raise typer.Exit(summary.exit_code)


HEATMAPS = "Heatmaps (--format heatmap)"


@app.command("export")
@handled()
@model_options((HeatmapOptions, HEATMAPS))
def export_cmd(
    fmt: str = typer.Option(..., "--format", help="Layout to write: clam (h5_files/, pt_files/, patches/), "
                            "trident (<mag>x_<size>px_0px_overlap/features_<encoder>/), stamp (<encoder>/), "
                            "geojson (QuPath: <slide>.geojson with tissue outline and tiles) or heatmap "
                            "(high-resolution attention heatmaps of --run: PNG, pyramidal OME-TIFF, scores)."),
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
    run: Path | None = typer.Option(None, "--run", help="heatmap: the fit run whose model scores the tiles "
                                    "(attention_mil, or fusion_mlp with pool=attention).", rich_help_panel=HEATMAPS),
    patients: str | None = typer.Option(None, "--patients", help="heatmap: comma list of patients, every slide of "
                                        "each  (default: the 3 with the highest out-of-fold score)",
                                        rich_help_panel=HEATMAPS),
    items: str | None = typer.Option(None, "--items", help="heatmap: comma list of PATIENT_ID/ITEM_ID slides.",
                                     rich_help_panel=HEATMAPS),
    **options: object,
) -> None:
    """Export stored tile features (CLAM / TRIDENT / STAMP h5, QuPath GeoJSON), or a fitted run's
    high-resolution attention heatmaps (--format heatmap).

    Feature files: one per slide; an item the target tool could not read (no coords, unknown tile size or
    magnification) is refused by name (exit 1). Heatmaps: overlapping tiles re-encoded, scored by the run's model
    and averaged per pixel, as CLAM's create_heatmaps (PNG, pyramidal OME-TIFF, scores).
    """
    from mmcli.cli.flags import csv_list

    if fmt.lower() == "heatmap":
        from mmcli.stages.heatmap import export_heatmaps

        if run is None:
            raise InputError("--format heatmap needs --run RUN_DIR (a fit with attention).")
        res = export_heatmaps(run, out, patients=csv_list(patients), items=csv_list(items),
                              options=HeatmapOptions.build(options), store=store, log=say)
        say(f"heatmaps of {len(res.slides)} slide(s) -> {out}")
        for item, reason in res.failed:
            say(f"  failed: {item}: {reason}")
        raise typer.Exit(res.exit_code)
    heatmap_only = [f for f, v in (("--run", run), ("--patients", patients), ("--items", items)) if v is not None]
    heatmap_only += [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
    if heatmap_only:
        raise InputError(f"{', '.join(heatmap_only)} go(es) with --format heatmap.")
    from mmcli.features.interop.exporter import n_files
    from mmcli.stages.export import export

    res = export(fmt, store, out, modality=modality, encoder_id=encoder_id, mpp=mpp, extractor_name=extractor_name,
                 scores=scores)
    say(f"{res.format}: {n_files(res)} file(s) of {res.modality}/{res.encoder_id} -> {res.out}"
         + (f" (manifest {res.manifest})" if res.manifest else ""))
    for item, reason in res.failed:
        say(f"  failed: {item}: {reason}")
    for w in res.warnings:
        say(f"  warning: {w}")
    raise typer.Exit(res.exit_code)


@app.command()
@handled()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check this machine: slide readers, devices (CUDA, CPU bf16/VNNI), runtimes, store backends, whether the
    default encoders find pretrained weights (a warning when not), the Hugging Face cache and which presets have
    weights locally. Exit 1 (with a fix for each) when something is wrong."""
    from mmcli.stages.doctor import doctor as run_doctor

    report = run_doctor()
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            say(line)
    raise typer.Exit(report.exit_code)
