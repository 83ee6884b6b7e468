"""Request and response models of ``mmcli serve`` (pydantic). The request model is built per served model,
so the OpenAPI document (``/openapi.json``, behind the token) shows each modality's exact feature dim and
every bad input is a 422 that names the field: a wrong dim, a value that is not finite or beyond the float32
range, too many instances, an unknown modality."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from mmcli.heads.data import TABLE_SOURCE, ModalitySpec
from mmcli.pipeline.ids import id_problem
from mmcli.stages.serve.options import ServeOptions

FLOAT32_MAX = float(np.finfo(np.float32).max)
# a feature value: finite and inside float32 (the heads compute in float32; 1e39 would become inf there)
Value = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


def _ident(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _bag_model(spec: ModalitySpec, limits: ServeOptions) -> type[BaseModel]:
    row = Annotated[list[Value], Field(min_length=spec.dim, max_length=spec.dim)]
    coord = Annotated[list[Value], Field(min_length=2, max_length=2)]

    def check(self: Any) -> Any:
        if self.coords is not None and len(self.coords) != len(self.features):
            raise ValueError(f"{spec.name}: {len(self.coords)} coords for {len(self.features)} instances "
                             "(one (x, y) per instance)")
        _check_encoder(spec, self.encoder_id)
        return self

    return create_model(
        f"Bag_{_ident(spec.name)}",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"A bag of {spec.name} instances (e.g. tiles): features (N, {spec.dim}), optional coords (N, 2).",
        __validators__={"check": model_validator(mode="after")(check)},
        features=(Annotated[list[row], Field(min_length=1, max_length=limits.max_instances,
                                             description=f"(N, {spec.dim}) finite float32 numbers, "
                                             f"1 <= N <= {limits.max_instances}")], ...),
        coords=(Annotated[list[coord], Field(max_length=limits.max_instances)] | None,
                Field(None, description="(N, 2) level-0 pixel (x, y) of each instance, returned with attention")),
        encoder_id=(str | None, Field(None, description=f"if given, must be the model's: {spec.encoder_id}")),
    )


def _vector_model(spec: ModalitySpec) -> type[BaseModel]:
    table = spec.source == TABLE_SOURCE
    value = Value | None if table else Value
    what = (f"{spec.dim} values in the model's column order ({', '.join((spec.columns or ())[:8])}"
            f"{', ...' if len(spec.columns or ()) > 8 else ''}); null = missing (imputed as in training)"
            if table else f"{spec.dim} finite float32 numbers (the pooled feature vector)")

    def check(self: Any) -> Any:
        _check_encoder(spec, self.encoder_id)
        if table and all(v is None for v in self.features):
            raise ValueError(f"{spec.name}: every value is null; leave the table out to mark it missing")
        return self

    return create_model(
        f"Vector_{_ident(spec.name)}",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"{spec.name}: one feature vector of dim {spec.dim}.",
        __validators__={"check": model_validator(mode="after")(check)},
        features=(Annotated[list[value], Field(min_length=spec.dim, max_length=spec.dim, description=what)], ...),
        encoder_id=(str | None, Field(None, description=f"if given, must be the model's: {spec.encoder_id}")),
    )


def _check_encoder(spec: ModalitySpec, given: str | None) -> None:
    if given is not None and given != (spec.encoder_id or "tabular"):
        raise ValueError(f"{spec.name}: features from encoder_id {given!r}, but the model was fit on "
                         f"{spec.encoder_id or 'tabular'!r}")


def request_model(specs: Sequence[ModalitySpec], limits: ServeOptions) -> type[BaseModel]:
    """``PredictRequest`` for a model with modalities ``specs``: ``features`` (one entry per modality given;
    a modality left out is missing) or ``patient_id`` (a patient of the server's ``--store``), and ``top_k``."""
    fields: dict[str, Any] = {}
    for s in specs:
        sub = _bag_model(s, limits) if s.kind == "bag" else _vector_model(s)
        fields[f"m_{_ident(s.name)}"] = (sub | None, Field(None, alias=s.name))
    features = create_model("Features", __config__=ConfigDict(extra="forbid", populate_by_name=False),
                            __doc__="Features per modality; leave a modality out when the patient lacks it.",
                            **fields)
    names = [s.name for s in specs]

    def one_of(self: Any) -> Any:
        if (self.features is None) == (self.patient_id is None):
            raise ValueError("give either 'features' (per modality) or 'patient_id' (a patient of --store), "
                             "not both and not neither")
        if self.features is not None and all(getattr(self.features, f) is None for f in fields):
            raise ValueError(f"'features' holds no modality; the model takes {names}")
        return self

    def safe_id(cls: Any, v: str | None) -> str | None:
        if v is not None and (problem := id_problem(v)):
            raise ValueError(problem)
        return v

    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__="One patient, by features or by id.",
        __validators__={"one_of": model_validator(mode="after")(one_of),
                        "safe_id": field_validator("patient_id")(safe_id)},
        features=(features | None, None),
        patient_id=(str | None, Field(None, description="id of a patient in the server's --store")),
        top_k=(int, Field(limits.top_k, ge=0, le=limits.top_k_limit,
                          description="top-attention instances returned per bag modality (0: none)")),
    )


def payload_of(request: BaseModel, specs: Sequence[ModalitySpec]) -> dict[str, BaseModel]:
    """``{modality: its payload}`` of the modalities a request gives."""
    feats = request.features  # type: ignore[attr-defined]
    out = {}
    for s in specs:
        sub = getattr(feats, f"m_{_ident(s.name)}")
        if sub is not None:
            out[s.name] = sub
    return out


# ---- responses --------------------------------------------------------------------------------------------
class Tile(BaseModel):
    """One instance of a bag with its attention (highest first)."""

    index: int = Field(description="row in the bag as sent, or within the item for a store patient")
    item_id: str | None = Field(None, description="the store item (slide) it belongs to; null for a payload")
    coords: list[float] | None = Field(None, description="level-0 (x, y) when known")
    attention: float


class PredictResponse(BaseModel):
    request_id: str
    model_sha256: str
    input_sha256: str = Field(description="sha256 of the canonical input features (as in the audit log)")
    task: Literal["classification", "survival", "regression"]
    probabilities: dict[str, float] | None = Field(None, description="per class (classification)")
    predicted_class: str | None = None
    risk: float | None = Field(None, description="log hazard ratio; higher = shorter survival (survival)")
    value: float | None = Field(None, description="the predicted value, in the target's unit (regression)")
    missing_modalities: list[str]
    modalities_present: dict[str, bool]
    attention: dict[str, list[Tile]] | None = Field(None, description="top-k tiles per bag modality "
                                                    "(attention heads only)")
    latency_ms: float


class Health(BaseModel):
    status: Literal["ok", "unavailable"] = Field(description="unavailable (HTTP 503): the server cannot write its "
                                                 "audit log, so it answers no prediction")
    mmcli_version: str
    model_sha256: str
    reason: str | None = Field(None, description="why it is unavailable (no paths)")
