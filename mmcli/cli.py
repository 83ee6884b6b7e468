"""The ``mmcli`` command: parses, validates, calls ``mmcli.stages``. Exit codes: 0 ok, 1 per-item failures,
2 bad usage or input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from mmcli.pipeline.errors import MmcliError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mmcli: multimodal disease prediction as a two-stage feature-caching pipeline "
    "(stage 1 `extract` once, stage 2 `fit` as often as you like).",
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature store.")
app.add_typer(store_app, name="store")


def _fail(e: MmcliError) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(e.exit_code)


# ---- synth ----------------------------------------------------------------------------------------------
@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Output folder for the synthetic cohort."),
    patients: int = typer.Option(120, "--patients", help="Number of patients (>= 8)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
) -> None:
    """Write a synthetic multimodal breast-cancer cohort (slides, MRI, notes, tables, manifest, labels)."""
    from mmcli.stages.synth import synth as run_synth

    try:
        res = run_synth(out, patients=patients, seed=seed)
    except (MmcliError, ValueError) as e:
        _fail(e if isinstance(e, MmcliError) else MmcliError(str(e)))
    typer.echo(f"wrote synthetic cohort of {patients} patients to {out}")
    typer.echo(f"  manifest: {res.manifest}\n  labels:   {res.labels}")


# ---- store ----------------------------------------------------------------------------------------------
@store_app.command("info")
def store_info(
    path: Path = typer.Argument(..., help="Store path (.zarr directory or .h5 file)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Modalities, encoders, patients, items, feature dims and size of a store."""
    from mmcli.features.store import open_store

    try:
        info = open_store(path, "r").info()
    except MmcliError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{info['path']} ({info['backend']}, schema {info['schema_version']}, "
               f"{info['size_bytes'] / 1e6:.1f} MB)")
    for m, encs in info["modalities"].items():
        for e, d in encs.items():
            typer.echo(f"  {m}/{e}: encoder={d['encoder']} patients={d['patients']} items={d['items']} "
                       f"rows={d['rows']} dims={d['dims']} incomplete={d['incomplete_items']}")
    for t, d in info["tables"].items():
        typer.echo(f"  tabular/{t}: patients={d['patients']} features={d['features']}")


@store_app.command("verify")
def store_verify(
    path: Path = typer.Argument(..., help="Store path (.zarr directory or .h5 file)."),
    repair: bool = typer.Option(False, "--repair", help="Remove incomplete/corrupt items so a re-run redoes them."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check every item (complete flag, shapes, finite values); exit 1 listing each problem."""
    from mmcli.features.store import open_store

    try:
        store = open_store(path, "a" if repair else "r")
        problems = store.verify()
        removed = store.repair(problems) if repair and problems else []
    except MmcliError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"problems": [str(p) for p in problems], "removed": removed}, indent=2))
    else:
        for p in problems:
            typer.echo(f"problem: {p}")
        for r in removed:
            typer.echo(f"removed: {r}")
        typer.echo(f"{len(problems)} problem(s) in {path}" if problems else f"{path}: ok")
    raise typer.Exit(1 if problems and not repair else 0)


@store_app.command("share")
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

    try:
        res = share_store(src, dst, pseudonymize, labels, labels_out, mapping)
    except MmcliError as e:
        _fail(e)
    if res["key_created"]:
        typer.secho(f"created a new secret key in {pseudonymize}: keep it private, it maps the pseudonyms",
                    fg=typer.colors.YELLOW, err=True)
    typer.echo(f"shared store {dst}: {res['items']} items, {res['patients']} patients, {res['tables']} tables"
               + (", ids pseudonymised" if res["pseudonymized"] else ""))


# ---- extract --------------------------------------------------------------------------------------------
# (extract, import and export commands are defined below this line)


# ---- fit / predict / report -------------------------------------------------------------------------------
# (stage-2 commands are defined below this line)


# ---- demo -----------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the demo cohort, store and runs."),
    patients: int = typer.Option(120, "--patients", help="Patients in the synthetic cohort."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """synth -> extract every modality -> fit every head -> report, then print a heads x metrics table."""
    from mmcli.stages.demo import run_demo

    try:
        code = run_demo(out, patients=patients, seed=seed)
    except MmcliError as e:
        _fail(e)
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except MmcliError as e:  # raised outside a command's own handler
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
