"""Command-line flags derived from the typed Options models: help from the fields' descriptions, written once.

* :func:`describe` / :func:`help_of`: a field's description (units, ranges, choices) with its default, the one
  text both ``--help`` and the validation errors use.
* :func:`option`: a ``typer.Option`` for one model field (default ``None``: not given, so the model's default
  applies when the options are built).
* :func:`model_options`: a decorator that adds one flag per field of one or more models to a command, in a help
  panel per model (``extract`` takes the WSI, MRI and note options this way: adding a field to ``WsiOptions``
  adds the flag).
* The flags several commands share, as annotated aliases (``StoreOpt``, ``LabelsOpt``, ...).
"""
from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from mmcli.pipeline.options import Options, flag_of


def help_of(model: type[BaseModel], field: str, *, default: bool = True, extra: str = "") -> str:
    """``field``'s description as help text (first letter upper-cased), its default appended."""
    info = model.model_fields[field]
    text = (info.description or "").strip()
    text = text[:1].upper() + text[1:]
    if extra:
        text = f"{text}; {extra}" if text else extra
    if default and not info.is_required():
        value = info.get_default(call_default_factory=True)
        if value not in (None, [], {}, ()) and not isinstance(value, BaseModel):
            text += f"  (default: {_show(value)})"
    return text


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def option(model: type[BaseModel], field: str, *decls: str, panel: str | None = None, extra: str = "",
           **kw: Any) -> Any:
    """A ``typer.Option`` for ``model.field``: not given = ``None`` (the model's default applies)."""
    return typer.Option(None, *(decls or (flag_of(field),)), help=help_of(model, field, extra=extra),
                        rich_help_panel=panel, show_default=False, **kw)


def cli_type(annotation: Any) -> type:
    """The click-facing type of a model field: bool, int, float, Path or str (lists, tuples, literals and
    other structured values are given as text and parsed by the model)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return cli_type(args[0])
    if annotation in (bool, int, float, Path):
        return annotation
    return str


def model_options(*groups: tuple[type[Options], str], shared: str = "Shared options",
                  label: Callable[[type[Options]], str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: add one keyword flag per field of each ``(model, panel)`` to the command (after its own
    parameters). A field of one model goes into that model's panel; a field several models share goes into the
    ``shared`` panel once, its help listing each model's description and default (``label(model)`` names the
    model there). The command gets them in its ``**options`` (``None`` where not given)."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
                  if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in params}
        owners: dict[str, list[tuple[type[Options], str]]] = {}
        for model, panel in groups:
            for name in model.fields():
                if name not in taken:
                    owners.setdefault(name, []).append((model, panel))
        for name, where in owners.items():
            model, panel = where[0]
            typ = cli_type(model.model_fields[name].annotation)
            decls = (f"{flag_of(name)}/--no-{name.replace('_', '-')}",) if typ is bool else (flag_of(name),)
            if len(where) == 1:
                default = option(model, name, *decls, panel=panel)
            else:
                by_text: dict[str, list[str]] = {}
                for m, _ in where:
                    by_text.setdefault(help_of(m, name), []).append(label(m) if label else m.__name__)
                texts = (list(by_text) if len(by_text) == 1
                         else [f"{', '.join(who)}: {text}" for text, who in by_text.items()])
                default = typer.Option(None, *decls, help="; ".join(texts), rich_help_panel=shared,
                                       show_default=False)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=typ | None,
                                            default=default))
        fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return fn

    return deco


def csv_list(text: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; None / empty -> None."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


# ---- flags shared by several commands (help written once) ------------------------------------------------------
def _fit_help(field: str) -> str:
    from mmcli.heads.training.options import FitOptions

    return help_of(FitOptions, field)


def _evidence_help(field: str) -> str:
    from mmcli.heads.evaluation.evidence import EvidenceOptions

    return help_of(EvidenceOptions, field)


STAGE2 = "Stage 2"
EVIDENCE = "Evidence (calibration, operating point, decision curve, subgroups)"
StoreOpt = Annotated[Path, typer.Option("--store", help="Feature store (.zarr directory or .h5 file).")]
LabelsOpt = Annotated[Path, typer.Option("--labels", help="Labels CSV: patient_id + target columns.")]
TargetOpt = Annotated[str | None, typer.Option("--target", help="Classification target column (binary or "
                                                                "multiclass).")]
TimeOpt = Annotated[str | None, typer.Option("--time", help="Survival time column (any unit; > 0).")]
EventOpt = Annotated[str | None, typer.Option("--event", help="Survival event column: 1 = observed, 0 = "
                                                              "censored.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of splits, models and resamples (the same seed gives "
                                                     "the same numbers).")]
NBootOpt = Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples of the 95% CIs (>= 1; use >= 1000 "
                                                        "for reported intervals).")]
EncoderIdOpt = Annotated[list[str], typer.Option("--encoder", help="MODALITY=ENCODER_ID where a modality has "
                                                                   "features of several encoders (repeatable).")]
ParamOpt = Annotated[list[str], typer.Option("--param", help="Head parameter KEY=VALUE (JSON value), repeatable, "
                                                             "e.g. --param epochs=30; `mmcli heads` lists them.")]
ModalitiesOpt = Annotated[str | None, typer.Option("--modalities", help="Comma list of store modalities and table "
                                                   "names, e.g. wsi,mri,text,genes  (default: all the head can use)")]
SubgroupsOpt = Annotated[str | None, typer.Option("--subgroups", help="Columns of the labels or a store table, "
                                                  "e.g. site,age or age:edges=40,60 (numeric: quartiles by default).",
                                                  rich_help_panel=EVIDENCE)]
MinSubgroupOpt = Annotated[int, typer.Option("--min-subgroup", help="Groups smaller than this are reported as too "
                                             "small, without metrics.", rich_help_panel=EVIDENCE)]
DcaOpt = Annotated[str, typer.Option("--dca-thresholds", help="Decision-curve threshold probabilities: "
                                     "START:STOP:STEP or a comma list.", rich_help_panel=EVIDENCE)]
HorizonOpt = Annotated[float | None, typer.Option("--horizon", help="Survival decision curve: the event probability "
                                                  "by time T (labels' time unit), > 0.", rich_help_panel=EVIDENCE)]
DropUnmatchedOpt = Annotated[bool, typer.Option("--drop-unmatched", help="Leave out rows with a missing label value "
                                                "instead of stopping with an error.")]
SchedulerOpt = Annotated[str | None, typer.Option("--scheduler", help="Run as dask tasks: 'local' (a LocalCluster), "
                                                  "a scheduler address such as tcp://HOST:8786, or the JSON file of "
                                                  "`dask scheduler --scheduler-file`. Default: in this process.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Worker processes of --scheduler local  (default: "
                                                "one per core)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
