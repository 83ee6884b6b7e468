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
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

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
        """JSON-safe dict of every field (paths as strings)."""
        return json.loads(self.model_dump_json(exclude={"flag_prefix"}))

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

