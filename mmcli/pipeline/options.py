"""Typed options: one pydantic model per extractor and per head, validated once at the edge.

A model is built from what the user gave (``None`` = not given, so the model's default applies), validated
once, carried as the model (not a kwargs dict), serialised with :meth:`Options.to_json` into store attrs,
run records and config.json, and re-validated with :meth:`Options.from_json` on load. A bad value is an
:class:`~mmcli.pipeline.errors.InputError` that names the flag (``--patch-size``), what it got and what
it accepts.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

from mmcli.pipeline.errors import InputError

OptT = TypeVar("OptT", bound="Options")


def flag_of(field: str, prefix: str = "--") -> str:
    """The CLI spelling of an option field: ``patch_size`` -> ``--patch-size`` (``--param patch_size``: a head
    parameter keeps its key)."""
    return prefix + (field if prefix.endswith(" ") else field.replace("_", "-"))


class Options(BaseModel):
    """Base of every options model: unknown keys refused, values immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, arbitrary_types_allowed=True)

    # how a field is spelled in messages: "--{field}" by default; heads use "--param {field}="
    flag_prefix: str = "--"

    @classmethod
    def build(cls: type[OptT], given: Mapping[str, Any] | None = None, *, context: str = "", **more: Any) -> OptT:
        """Validate ``given`` (entries that are ``None`` count as not given); InputError naming the flag."""
        values = {k: v for k, v in {**(given or {}), **more}.items() if v is not None}
        try:
            return cls(**values)
        except ValidationError as e:
            raise InputError(explain(e, cls, context)) from None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict of every field (paths as strings), nested options included; no ``flag_prefix``
        (a spelling for messages, not a value)."""
        return _without_prefix(json.loads(self.model_dump_json()))

    @classmethod
    def from_json(cls: type[OptT], doc: Mapping[str, Any], *, context: str = "") -> OptT:
        """Re-validate what :meth:`to_json` wrote (e.g. a run's config.json after an edit)."""
        return cls.build(dict(doc), context=context)

    @classmethod
    def fields(cls) -> list[str]:
        return [f for f in cls.model_fields if f != "flag_prefix"]

    @classmethod
    def accepts(cls, field: str) -> str:
        """What a field takes, for messages: its description (units, ranges, choices)."""
        info = cls.model_fields[field]
        return info.description or str(info.annotation)


def _without_prefix(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _without_prefix(v) for k, v in doc.items() if k != "flag_prefix"}
    if isinstance(doc, list):
        return [_without_prefix(v) for v in doc]
    return doc


def explain(e: ValidationError, cls: type[Options], context: str = "") -> str:
    """One line per bad value: the flag, the value given, what it accepts."""
    prefix = cls.model_fields["flag_prefix"].default
    lines = []
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
        field = loc[0] if loc else ""
        flag = flag_of(field, prefix) + ("=" if prefix.endswith(" ") else "") if field else "options"
        if err.get("type") == "extra_forbidden":
            lines.append(f"{flag.rstrip('=')} is not an option here. Fix: use one of "
                         f"{[flag_of(f, prefix).strip() for f in cls.fields()]}.")
            continue
        got = err.get("input")
        accepts = cls.accepts(field) if field in cls.model_fields else ""
        takes = f" (takes: {accepts})" if accepts else ""
        sep = "" if flag.endswith("=") else " "  # --param epochs=0, --patch-size 0
        lines.append(f"{flag.strip()}{sep}{got!r}: {err.get('msg', 'invalid')}{takes}")
    head = f"{context}: " if context else ""
    return head + "; ".join(lines)


class CohortOptions(Options):
    """What a stage-2 command reads: a store, a labels table and which of its columns is the outcome.

    The fields every stage-2 command shares (fit, evaluate, ablate, federate), described once: the CLI's help
    for ``--store``, ``--labels``, ``--target``, ``--time``, ``--event``, ``--seed``, ``--n-boot`` and
    ``--drop-unmatched`` comes from here."""

    store: Path = Field(..., description="feature store written by `mmcli extract` / `mmcli import` (a .zarr "
                        "directory or an .h5 file)")
    labels: Any = Field(..., description="labels CSV: patient_id + outcome columns (or a pandas DataFrame in the "
                        "API)")
    target: str | None = Field(None, description="classification target column (binary or multiclass)")
    time: str | None = Field(None, description="survival time column (any unit; > 0), with --event")
    event: str | None = Field(None, description="survival event column: 1 = observed, 0 = censored")
    seed: int = Field(0, ge=0, description="seed of the splits, the models and the resamples (the same seed gives "
                      "the same numbers), >= 0")
    n_boot: int = Field(1000, ge=1, le=100_000, description="bootstrap resamples of the 95% CIs, 1..100000 (use "
                        ">= 1000 for reported intervals)")
    drop_unmatched: bool = Field(False, description="leave out rows with a missing label value instead of "
                                 "stopping with an error (patients only in the labels or only in the store are "
                                 "always left out, with a note)")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if isinstance(v, (str, Path)):
            if not str(v).strip():
                raise ValueError("an empty path")
            return Path(v)
        if type(v).__name__ == "DataFrame":  # the API may pass a table (pandas is not imported for the CLI)
            return v
        raise ValueError("a labels CSV path (or a pandas DataFrame)")

    @field_validator("store")
    @classmethod
    def _store(cls, v: Path) -> Path:
        if not str(v).strip():
            raise ValueError("an empty path")
        return v

    @field_serializer("labels")
    def _labels_json(self, v: Any) -> str:
        return str(Path(v).resolve()) if isinstance(v, (str, Path)) else "<DataFrame>"
