"""A fitted run's model: head + output policy + classes + modality specs, the one way to load and apply one.

``mmcli predict``, ``mmcli evaluate`` and ``mmcli serve`` all go through :class:`FittedModel`: the same loading
(config, head, ``postprocess.json``), the same reading of a store's patients (the model's sources, the head's
alignment and its policy on missing modalities, the covariates its preprocessing reads) and the same output
columns, so a patient gets the same numbers from each of them.

Output columns (:meth:`FittedModel.predict_frame`): ``patient_id`` + ``y_pred, prob_<class>...``
(classification; recalibrated when the run was fitted with ``--calibrate``), ``risk`` (survival: log hazard
ratio, higher = shorter survival) or ``y_pred`` (regression: the predicted value in the target's unit);
``decision`` (with ``--operating-point``: ``classes[1]`` where P(classes[1]) >= the stored threshold);
``missing_modalities`` (``;``-separated); ``batch_corrected`` (for a batch-corrected model: False where the
patient's batch is missing or unseen in training, left uncorrected).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.heads.base import CONFIG, Head, read_model_config
from mmcli.heads.data import Cohort, ModalitySpec, Source, covariates_for, load_cohort, model_sources
from mmcli.heads.evaluation.evidence import Postprocess
from mmcli.heads.registry import load_head
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.rundir import damaged, prediction_frame, resolve_model_dir


@dataclass
class FittedModel:
    """A head with its output policy and the run facts needed to apply it (see module docstring)."""

    head: Head
    post: Postprocess = field(default_factory=Postprocess)
    classes: list[str] | None = None
    run: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    # ---- loading / saving ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path) -> FittedModel:
        """Load a run folder of ``mmcli fit`` (or its ``model/`` folder); errors name the file and the fix."""
        mdir = resolve_model_dir(model)
        config = read_model_config(mdir)
        head = load_head(mdir)
        run = dict(config.get("run") or {})
        classes = None
        if head.task == "classification":
            classes = [str(c) for c in (run.get("classes") or range(head.n_classes))]
            if len(classes) != head.n_classes:
                raise damaged(mdir / CONFIG, f"its \"run\" block lists {len(classes)} classes {classes[:5]}, the "
                              f"model predicts {head.n_classes}")
        return cls(head, Postprocess.load(mdir), classes, run, mdir, config)

    def save(self, folder: Path) -> None:
        """Write the head and (when it does something) the output policy into ``folder``."""
        self.head.save(folder)
        if self.post.calibrator.active or self.post.threshold is not None:
            self.post.save(folder)

    # ---- facts ----------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.head.name

    @property
    def task(self) -> str:
        return self.head.task

    @property
    def specs(self) -> list[ModalitySpec]:
        return list(self.head.spec_)

    @property
    def needs_every_modality(self) -> bool:
        return type(self.head).needs_every_modality

    def covariate_columns(self) -> list[str]:
        return type(self.head).needs_covariates(self.head.params_)

    # ---- reading patients -------------------------------------------------------------------------------------
    def sources(self, fs: Any) -> list[Source]:
        return model_sources(fs, self.specs)

    def cohort(self, fs: Any, patients: Sequence[str] | None = None, *, covariates: pd.DataFrame | None = None,
               sources: Sequence[Source] | None = None, n_threads: int = 4, memory_budget: int | None = None,
               scan: bool = True) -> tuple[Cohort, list[str]]:
        """``(cohort, left_out)``: the store patients (all, or ``patients``) the model can score, aligned to the
        model (the head checks encoder ids, dims, table columns), with the covariates its preprocessing reads
        (from ``covariates``, a labels-like table, else the store's tables); ``left_out`` are the patients
        lacking what the head's policy requires. ``memory_budget`` / ``scan``: see
        :func:`~mmcli.heads.data.load_cohort` (``scan=False``: bags are read when scored, once)."""
        cohort = self.head.align(load_cohort(fs, sources or self.sources(fs), patients, n_threads=n_threads,
                                             memory_budget=memory_budget, scan=scan))
        ok = type(self.head).usable_patients(cohort.presence())
        left_out = [p for p, good in zip(cohort.patients, ok) if not good]
        cohort = cohort.subset(np.flatnonzero(ok))
        columns = self.covariate_columns()
        if columns:
            table = covariates if covariates is not None else pd.DataFrame(index=pd.Index([], name="patient_id"))
            cohort.covariates = covariates_for(columns, table, fs, flag="--covariates / --labels column")
        return cohort, left_out

    # ---- applying -----------------------------------------------------------------------------------------------
    def predict(self, cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
        """``(raw, output)``: the head's prediction, and after the saved recalibration (classification)."""
        raw = self.head.predict(cohort)
        return raw, (raw if self.head.task != "classification" else self.post.calibrate(raw))

    def decisions(self, output: np.ndarray) -> list[str] | None:
        return None if self.head.task != "classification" else self.post.decisions(output)

    def batch_corrected(self, cohort: Cohort) -> list[bool] | None:
        """Per patient, whether batch correction applied (its batch was seen in training); None without it."""
        columns = self.covariate_columns()
        if not columns or cohort.covariates is None:
            return None
        seen = {b for p in self.head.preprocessors_.values() if getattr(p, "harmoniser", None) is not None
                for b in p.harmoniser.batches_}
        batch = cohort.covariates.reindex(cohort.patients)[columns[0]]
        return [bool(pd.notna(b) and str(b) in seen) for b in batch]

    def predict_frame(self, cohort: Cohort, output: np.ndarray | None = None) -> pd.DataFrame:
        """The prediction columns of ``cohort`` (module docstring); ``output`` when already computed."""
        if output is None:
            output = self.predict(cohort)[1]
        df = prediction_frame(cohort.patients, output, self.head.task, self.classes)
        decisions = self.decisions(output)
        if decisions is not None:
            df["decision"] = decisions
        names = cohort.names
        df["missing_modalities"] = [";".join(n for n, ok in zip(names, row) if not ok) for row in cohort.presence()]
        corrected = self.batch_corrected(cohort)
        if corrected is not None:
            df["batch_corrected"] = corrected
        return df

    def attention(self, cohort: Cohort) -> dict[str, list[np.ndarray | None]]:
        """Per bag modality, each patient's attention over its instances; InputError for heads without it."""
        att = self.head.attention(cohort)
        if not att:
            raise InputError(f"head {self.name!r} has no tile attention. Fix: drop --attention, or use a head "
                             "with attention (attention_mil, or fusion_mlp with pool=attention).")
        return att
