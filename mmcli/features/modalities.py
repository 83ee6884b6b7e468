"""The modalities that ``mmcli extract --modality`` knows, as a registry (one per-item extractor each).

A modality module (:mod:`mmcli.features.wsi`, :mod:`~mmcli.features.mri`, :mod:`~mmcli.features.text`) defines
an options model and a ``make_spec(store, options)`` factory and registers them with :func:`register`::

    @register("wsi", options=WsiOptions, unit="tile")
    def make_spec(store=None, options=None, **given) -> ExtractorSpec: ...

:data:`MODALITIES` ties each name to its module and imports that module only when the name is looked up; no
modality module imports torch at import time, so looking ``wsi`` up is cheap. Adding a modality is one module
with one ``@register("name", ...)``: the name is written only there, and the lazy table (name -> module) is derived
from the decorators by reading the modules' source (:meth:`~mmcli.pipeline.registry.Registry.scan`).

This module also holds the options every extractor shares (:class:`ExtractorOptions`): device, precision and
torch threads, with the choices derived from :mod:`mmcli.features.encoders.runtime`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field

from mmcli.features.encoders.runtime import DEVICE_PATTERN, PRECISIONS
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.options import Options, flag_of
from mmcli.pipeline.registry import Registry

if TYPE_CHECKING:
    from mmcli.features.runner import ExtractorSpec
    from mmcli.pipeline.manifest import Manifest, ManifestRow

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Modality:
    """One registered modality: its spec factory, its options model, what its progress bar counts and (optionally)
    how it selects its rows (default: the manifest rows of its name)."""

    name: str
    make_spec: Callable[..., ExtractorSpec]
    options: type[Options]
    unit: str
    select: Callable[[Manifest, Any, str], tuple[list[ManifestRow], list[ManifestRow]]] | None = None

    def rows(self, manifest: Manifest, options: Options, store: str) -> tuple[list[ManifestRow], list[ManifestRow]]:
        """``(rows to extract, rows whose file is missing)``; a modality that encodes what is already in the store
        (``slide``) selects rows of another modality."""
        if self.select is not None:
            return self.select(manifest, options, store)
        return manifest.for_modality(self.name), manifest.missing_for(self.name)

    def build_options(self, given: Mapping[str, Any]) -> Options:
        """Validate the options the user gave (``None`` = not given), with :meth:`implied_options` filling the
        ones not given; a flag that this modality does not take is refused by name."""
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(self.options.fields()))
        if unknown:
            flags = ", ".join(flag_of(k) for k in unknown)
            raise InputError(f"{flags} does not apply to --modality {self.name}. Fix: remove it.")
        return self.options.build({**self.implied_options(given), **given})

    def implied_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults that follow from other options: a foundation-model preset ``--encoder`` sets its tiling
        (``mpp``, ``patch_size``) in every modality whose options take them; what the user gave wins."""
        from mmcli.features.encoders.presets import tiling_defaults

        fields = set(self.options.fields())
        implied = tiling_defaults(given.get("encoder"), given.get("preset_geometry") or "native")
        return {k: v for k, v in implied.items() if k in fields}


MODALITIES: Registry[Modality] = Registry("modality", flag="--modality")
MODALITIES.scan(Path(__file__).parent, "mmcli.features", "register")


def register(name: str, *, options: type[Options], unit: str, aliases: tuple[str, ...] = (),
             rows: Callable[..., tuple[list[ManifestRow], list[ManifestRow]]] | None = None) -> Callable[[F], F]:
    """Decorator for a modality's ``make_spec(store, options, **given)``: register it under ``name`` with its
    options model, the unit its progress bar counts inside one item (``tile``, ``step``, ``note``), the other
    names users type for it (``aliases``; any case is accepted anyway) and, for a modality that does not read
    manifest rows of its own name, ``rows(manifest, options, store)``."""

    def deco(make_spec: F) -> F:
        MODALITIES.add(name, Modality(name, make_spec, options, unit, rows), unit=unit, aliases=aliases)
        return make_spec

    return deco


# ---- options every extractor shares ------------------------------------------------------------------------
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]


class ExtractorOptions(Options):
    """Where and how the encoder runs; none of these changes the features' ``encoder_id``."""

    device: str = Field("auto", pattern=DEVICE_PATTERN,
                        description="auto | cpu | cuda[:N]; auto = CUDA when torch sees a GPU, else CPU")
    precision: Precision = Field("auto", description=f"one of {' | '.join(PRECISIONS)}; auto = fp16 on CUDA, "
                                 "bf16 on CPUs with native bf16, else fp32")
    torch_threads: int | None = Field(None, ge=0, description="CPU threads of the encoder per process, an "
                                      "integer >= 0 (unset or 0: torch's default)")


def coerce(options: Options | Mapping[str, Any] | None, cls: type[Options], given: Mapping[str, Any]) -> Any:
    """``options`` as a validated ``cls``: a model as is, else built from ``options`` and ``given`` keywords."""
    if isinstance(options, cls):
        if given:
            raise TypeError(f"pass either a {cls.__name__} or keyword options, not both ({sorted(given)})")
        return options
    return cls.build({**dict(options or {}), **given})
