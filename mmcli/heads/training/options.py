"""``FitOptions``: one fit, validated once (by the CLI or an API call) and carried whole to the end.

STAMP-style: one typed model per command. The head's parameters are validated here, once, into the head's own
:class:`~mmcli.heads.base.HeadParams` model and carried as that model: cross-validation hands each fold's head
the same model with the run's task, classes and seed (:meth:`HeadParams.for_run`), never a dict to re-check.
The resolved options are written into the run's ``config.json`` (``options``).

Light to import (pydantic only; the head registry is imported when a model is validated): the CLI builds its
help from these field descriptions at start-up.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from mmcli.heads.evaluation.options import EvidenceOptions
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.options import CohortOptions

EXPLAIN = ("none", "default", "full")
# flags of `mmcli fit` that set head parameters (each head's Params model says whether it takes them)
HEAD_FLAGS = ("impute", "batch_correct", "batch_column", "batch_keep", "fusion", "init")


class FitOptions(CohortOptions):
    """Everything ``mmcli fit`` needs, validated once (errors name the flag)."""

    head: str = Field(..., description="the head (`mmcli heads` lists them with their parameters)")
    task: Literal["classification", "survival", "regression"] | None = Field(
        None, description="classification | survival | regression (default: survival with --time/--event, else "
        "classification; a numeric --target with many values needs --task regression)")
    params: Any = Field(None, description="the head's parameters (--param KEY=VALUE), validated by its Params "
                        "model")
    out: Path = Field(..., description="run folder (config, metrics.json, predictions.csv, model/)")
    modalities: list[str] | None = Field(None, description="store modalities and table names, e.g. wsi,genes "
                                         "(default: all the head can use)")
    encoders: dict[str, str] = Field(default_factory=dict, description="MODALITY=ENCODER_ID where a modality "
                                     "has features of several encoders")
    folds: int = Field(5, ge=2, le=100, description="patient-level cross-validation folds, 2..100")
    strict_match: bool = Field(False, description="refuse patients that are only in the labels or only in the "
                               "store instead of leaving them out")
    explain: Literal["none", "default", "full"] = Field(
        "default", description="explanations written with the run: none | default (attention, SHAP, modality "
        "weights, the attributions a head has) | full")
    overwrite: bool = Field(False, description="replace an existing run in --out (whole: no file of it is kept); "
                            "without it an existing, non-empty --out is refused")
    memory_budget: str | None = Field(None, description="memory the bags (WSI tiles) may hold, e.g. 4GB or 512MB "
                                      "(binary units); beyond it bags are read from the store per mini-batch, only "
                                      "the sampled rows; default: half of the memory available at start")
    scheduler: str | None = Field(None, description="run the folds as dask tasks: local (a LocalCluster), a "
                                  "scheduler address tcp://HOST:8786 or a scheduler file; default: in this process")
    workers: int | None = Field(None, ge=1, le=1024, description="worker processes of --scheduler local (default: "
                                "one per core)")
    evidence: EvidenceOptions = Field(default_factory=EvidenceOptions, description="calibration, operating "
                                      "point, decision curve and subgroups")
    init_in_fold: bool = Field(False, description="with --init DIR: rerun DIR's pretraining inside every fold, on "
                               "the store's patients minus that fold's test patients (its training patients and "
                               "the unlabelled ones), so no test patient shaped the encoders; the final model "
                               "starts from DIR")

    @field_validator("head")
    @classmethod
    def _known_head(cls, v: str) -> str:
        from mmcli.heads.registry import head_class

        head_class(v)  # InputError listing the heads
        return v

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        from mmcli.pipeline.scale import parse_size

        parse_size(v)
        return v

    @field_validator("out")
    @classmethod
    def _out(cls, v: Path) -> Path:
        if not str(v).strip():
            raise ValueError("an empty path")
        return v

    @model_validator(mode="before")
    @classmethod
    def _head_params(cls, data: Any) -> Any:
        """Validate ``params`` (a dict of --param values) against the head's Params model, once."""
        from mmcli.heads.base import HeadParams
        from mmcli.heads.registry import head_class

        if not isinstance(data, dict) or isinstance(data.get("params"), HeadParams):
            return data
        head = data.get("head")
        if not isinstance(head, str):
            return data
        return {**data, "params": head_class(head).user_params(dict(data.get("params") or {}))}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, context: str = "") -> FitOptions:
        """Re-validate what :meth:`to_json` wrote: the run-set parameters (task, n_classes, seed) it records in
        ``params`` come from the labels and ``--seed`` again, not from the file."""
        from mmcli.heads.base import RUN_PARAMS

        data = dict(doc)
        if isinstance(data.get("params"), Mapping):
            data["params"] = {k: v for k, v in data["params"].items() if k not in RUN_PARAMS}
        return cls.build(data, context=context)

    @model_validator(mode="after")
    def _params_of_head(self) -> FitOptions:
        from mmcli.heads.registry import head_class

        want = head_class(self.head).Params
        if type(self.params) is not want:
            raise InputError(f"params are a {type(self.params).__name__}, head {self.head!r} takes {want.__name__}")
        self.evidence.check()  # the text options (operating point, thresholds, subgroups) parse now
        self._outcome_not_a_covariate()
        if self.init_in_fold and not getattr(self.params, "init", None):
            raise InputError("--init-in-fold needs the pretraining folder whose settings it reruns: --init DIR "
                             "(fusion_mlp).")
        if getattr(self.params, "dp_epsilon", None) is not None and self.evidence.calibrate == "isotonic":
            raise InputError("--calibrate isotonic with --param dp_epsilon: the isotonic calibrator saves training "
                             "patients' out-of-fold probabilities and labels as its steps, outside the DP guarantee. "
                             "Fix: --calibrate platt (two coefficients, recorded as not covered) or none.")
        return self

    def _outcome_not_a_covariate(self) -> None:
        """``--batch-column`` / ``--batch-keep`` naming --target / --time / --event: InputError (issue 24 item 1;
        columns derived from the outcome are refused by content once the labels are read)."""
        from mmcli.heads.preprocess.leakage import outcome_named

        batch, keep = getattr(self.params, "batch_column", None), getattr(self.params, "batch_keep", None) or []
        named = [("--batch-column", batch)] if batch else []
        outcome_named([*named, *[("--batch-keep", c) for c in keep]], (self.target, self.time, self.event))

    @field_serializer("params")
    def _params_json(self, v: Any) -> dict[str, Any] | None:
        return None if v is None else v.to_json()

    @property
    def head_params(self) -> Any:
        """The head's validated :class:`~mmcli.heads.base.HeadParams` model."""
        return self.params

    def covariate_columns(self) -> list[str]:
        """Label columns the head reads per patient besides the features (its own declaration)."""
        from mmcli.heads.registry import head_class

        return head_class(self.head).needs_covariates(self.params)


def build_fit_options(given: dict[str, Any]) -> FitOptions:
    """:class:`FitOptions` from keyword values (``None`` = not given); head-level flags (``impute``,
    ``batch_correct``, ``batch_column``, ``batch_keep``, ``fusion``, ``init``) go into the head's parameters and
    their errors name them as flags."""
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
