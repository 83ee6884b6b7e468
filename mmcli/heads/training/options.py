"""``FitOptions``: one fit, validated once (by the CLI or an API call) and carried whole to the end.

STAMP-style: one typed model per command. The head's parameters are validated here, once, into the head's own
:class:`~mmcli.heads.base.HeadParams` model and carried as that model: cross-validation hands each fold's head
the same model with the run's task, classes and seed (:meth:`HeadParams.for_run`), never a dict to re-check.
The resolved options are written into the run's ``config.json`` (``options``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_serializer, field_validator, model_validator

from mmcli.heads.base import HeadParams
from mmcli.heads.evaluation.evidence import EvidenceOptions
from mmcli.heads.registry import head_class
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.options import Options

EXPLAIN = ("none", "default", "full")


class FitOptions(Options):
    """Everything ``mmcli fit`` needs, validated once (errors name the flag)."""

    head: str = Field(..., description="the head (`mmcli heads` lists them with their parameters)")
    params: HeadParams | None = Field(None, description="the head's parameters (--param KEY=VALUE), validated by "
                                      "its Params model")
    store: Path = Field(..., description="feature store written by `mmcli extract` / `mmcli import`")
    labels: Any = Field(..., description="labels CSV: patient_id + target columns (or a DataFrame in the API)")
    out: Path = Field(..., description="run folder (config, metrics.json, predictions.csv, model/)")
    target: str | None = Field(None, description="classification target column (binary or multiclass)")
    time: str | None = Field(None, description="survival time column (any unit; > 0)")
    event: str | None = Field(None, description="survival event column: 1 = observed, 0 = censored")
    modalities: list[str] | None = Field(None, description="store modalities and table names, e.g. wsi,genes "
                                         "(default: all the head can use)")
    encoders: dict[str, str] = Field(default_factory=dict, description="MODALITY=ENCODER_ID where a modality "
                                     "has features of several encoders")
    folds: int = Field(5, ge=2, le=100, description="patient-level cross-validation folds, 2..100")
    seed: int = Field(0, ge=0, description="seed of the splits, the models and the resamples, >= 0")
    n_boot: int = Field(1000, ge=1, le=100_000, description="bootstrap resamples of the 95% CIs, 1..100000 "
                        "(use >= 1000 for reported intervals)")
    drop_unmatched: bool = Field(False, description="leave out rows with a missing label value instead of "
                                 "stopping (patients only in the labels or only in the store are always left "
                                 "out, with a note)")
    strict_match: bool = Field(False, description="refuse patients that are only in the labels or only in the "
                               "store instead of leaving them out")
    explain: Literal["none", "default", "full"] = Field(
        "default", description="none | default (attention, SHAP, modality weights, attributions the head has) "
        "| full")
    overwrite: bool = Field(False, description="replace an existing run in --out (whole)")
    evidence: EvidenceOptions = Field(default_factory=EvidenceOptions, description="calibration, operating "
                                      "point, decision curve and subgroups")

    @field_validator("head")
    @classmethod
    def _known_head(cls, v: str) -> str:
        head_class(v)  # InputError listing the heads
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if isinstance(v, pd.DataFrame):
            return v
        if isinstance(v, (str, Path)):
            return Path(v)
        raise ValueError("a labels CSV path (or a pandas DataFrame)")

    @field_validator("store", "out")
    @classmethod
    def _path(cls, v: Path) -> Path:
        if not str(v).strip():
            raise ValueError("an empty path")
        return v

    @model_validator(mode="before")
    @classmethod
    def _head_params(cls, data: Any) -> Any:
        """Validate ``params`` (a dict of --param values) against the head's Params model, once."""
        if not isinstance(data, dict) or isinstance(data.get("params"), HeadParams):
            return data
        head = data.get("head")
        if not isinstance(head, str):
            return data
        params = head_class(head).user_params(dict(data.get("params") or {}))
        return {**data, "params": params}

    @model_validator(mode="after")
    def _params_of_head(self) -> FitOptions:
        want = head_class(self.head).Params
        if type(self.params) is not want:
            raise InputError(f"params are a {type(self.params).__name__}, head {self.head!r} takes {want.__name__}")
        return self

    @field_serializer("labels")
    def _labels_json(self, v: Any) -> str:
        return str(Path(v).resolve()) if isinstance(v, (str, Path)) else "<DataFrame>"

    @field_serializer("params")
    def _params_json(self, v: HeadParams | None) -> dict[str, Any] | None:
        return None if v is None else v.to_json()

    @property
    def head_params(self) -> HeadParams:
        assert self.params is not None
        return self.params

    def covariate_columns(self) -> list[str]:
        """Label columns the head reads per patient besides the features (its own declaration)."""
        return head_class(self.head).needs_covariates(self.head_params)


def build_fit_options(given: dict[str, Any]) -> FitOptions:
    """:class:`FitOptions` from keyword values (``None`` = not given); head-level flags (``impute``,
    ``batch_correct``, ``batch_column``, ``batch_keep``, ``fusion``, ``init``) go into the head's parameters."""
    given = {k: v for k, v in given.items() if v is not None}
    params = dict(given.pop("params", None) or {})
    flags = [k for k in HEAD_FLAGS if k in given]
    for key in flags:
        value = given.pop(key)
        params[key] = [*value] if key == "batch_keep" else (str(Path(value).resolve()) if key == "init" else value)
    if isinstance(given.get("evidence"), dict):
        given["evidence"] = EvidenceOptions.build(given["evidence"]).check()
    if isinstance(given.get("explain"), bool):
        given["explain"] = "default" if given["explain"] else "none"
    try:
        return FitOptions.build({**given, "params": params})
    except InputError as e:  # a head flag's bad value is named by its flag, not as a --param
        text = str(e)
        for key in flags:
            text = text.replace(f"--param {key}=", f"--{key.replace('_', '-')} ")
        raise InputError(text) from None


# flags of `mmcli fit` that set head parameters (each head's Params model says whether it takes them)
HEAD_FLAGS = ("impute", "batch_correct", "batch_column", "batch_keep", "fusion", "init")
