"""Tests that fail when the science of ``mmcli fit`` is wrong (issue 12 part G): leakage-free in-fold PCA in the
run record, out-of-fold SHAP, and multimodal complementarity on the synthetic cohort's tables."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import mmcli.heads.training.fitting as fit_stage
from helpers.planted_data import make_store
from mmcli.heads import load_head
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.targets import build_target
from mmcli.heads.training.cv import cross_validate
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit


def _capture_cv(monkeypatch) -> dict:
    """Wrap the fit procedure's ``cross_validate`` so the test sees the fold results and the cohort it used."""
    seen: dict = {}

    def wrapped(head, cohort, tgt, *a, **k):
        seen["results"] = cross_validate(head, cohort, tgt, *a, **k)
        seen["cohort"], seen["target"] = cohort, tgt
        return seen["results"]

    monkeypatch.setattr(fit_stage, "cross_validate", wrapped)
    return seen


# ---- 2. in-fold PCA, as recorded in the run folder -------------------------------------------------------------

def test_fit_run_records_pca_fit_on_training_patients_only(tmp_path, monkeypatch):
    """A 64-column table with ``n_components=8``: every fold's preprocessing is recorded in cv_audit.json as
    fit on exactly the patients outside that fold's test set (folds.json), overlap 0, and the fold heads'
    preprocessors really reduce to 8 columns.

    Fails if the PCA is fit once on the whole cohort before splitting, if the audit reports a different set
    than the one the preprocessor saw, or if the PCA is silently skipped."""
    rng = np.random.default_rng(0)
    ids = [f"P{i:03d}" for i in range(45)]
    y = np.arange(45) % 2
    X = rng.normal(size=(45, 64))
    X[:, :3] += 1.5 * y[:, None]
    open_store(tmp_path / "s.zarr", "a").write_table(
        "wide", pd.DataFrame(X, index=pd.Index(ids, name="patient_id"), columns=[f"w{j}" for j in range(64)]))
    labels = pd.DataFrame({"label": np.where(y == 1, "pos", "neg")}, index=pd.Index(ids, name="patient_id"))
    seen = _capture_cv(monkeypatch)
    out = tmp_path / "run"
    fit("fusion_mlp", tmp_path / "s.zarr", labels, out, target="label", folds=3, n_boot=5,
        params={"epochs": 3, "n_components": 8}, explain=False)
    audit = json.loads((out / "cv_audit.json").read_text())
    folds = json.loads((out / "folds.json").read_text())
    assert len(audit["folds"]) == 3
    for f, r in zip(audit["folds"], seen["results"]):
        test = {p for p, k in folds.items() if k == f["fold"]}
        assert f["overlap_with_test"] == {"wide": 0}
        assert set(f["preprocessing_fit_on"]["wide"]) == set(ids) - test
        prep = r.head.preprocessors_["wide"]
        assert prep.out_dim == 8 and set(prep.fitted_patients) == set(ids) - test
    final = load_head(out / "model")
    assert final.preprocessors_["wide"].out_dim == 8  # saved models keep no patient ids, only the fitted PCA
    assert final.preprocessors_["wide"].components_ is not None


# ---- 3. xgboost's SHAP values are out-of-fold ------------------------------------------------------------------

def test_xgboost_shap_csv_comes_from_the_fold_model_that_did_not_see_the_patient(tmp_path, monkeypatch):
    """Each shap.csv row equals ``pred_contribs`` of the fold model whose test set holds the patient, and
    differs from the contributions of the final model refit on everyone (which saw the patient).

    Fails if shap.csv is computed with the final model (in-sample explanations), with the wrong fold's
    model, or if rows are assigned to the wrong patients."""
    p = make_store(tmp_path / "s.zarr", n=45, task="binary", seed=0, modalities=("mri", "genes"))
    seen = _capture_cv(monkeypatch)
    out = tmp_path / "run"
    fit("xgboost", p.store, p.labels, out, target="label", folds=3, n_boot=5, params={"n_estimators": 20})
    shap = pd.read_csv(out / "shap.csv").set_index("patient_id")
    cohort = seen["cohort"]
    assert sorted(shap.index) == sorted(cohort.patients)
    final = load_head(out / "model").contributions(cohort)
    for r in seen["results"]:
        sub = cohort.subset(r.test_idx)
        fold = r.head.contributions(sub)
        got = shap.loc[sub.patients, fold.columns].to_numpy()
        np.testing.assert_allclose(got, fold.to_numpy(), rtol=1e-4, atol=1e-6)
        refit = final.loc[sub.patients, fold.columns].to_numpy()
        assert (np.abs(got - refit).max(axis=1) > 1e-4).all(), "a held-out patient's SHAP equals the refit model's"


# ---- 6. complementarity of the synthetic cohort's tables -------------------------------------------------------

def _mmcli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(fit_stage.__file__).parents[2])}
    exe = str(Path(sys.executable).with_name("mmcli"))
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_synthetic_cohort_tables_together_beat_each_table_alone(tmp_path):
    """``mmcli synth`` (120 patients, seed 0) then ``mmcli extract --modality tabular`` for genes, proteomics
    and clinical: xgboost's out-of-fold macro AUROC of the subtype on all three tables beats each table alone
    by at least 0.02.

    Fails if the generator plants the same axes in every table (no complementarity), if a table loses its
    signal in extraction, or if the head cannot combine several tables."""
    d, store = tmp_path / "cohort", tmp_path / "s.zarr"
    _mmcli("synth", "--out", str(d), "--patients", "120", "--seed", "0")
    for t in ("genes", "proteomics", "clinical"):
        _mmcli("extract", "--modality", "tabular", "--table", str(d / "tables" / f"{t}.csv"), "--name", t,
               "--store", str(store))
    labels = pd.read_csv(d / "labels.csv").set_index("patient_id")
    fs = open_store(store, "r")
    target = build_target(labels, target="subtype")

    def oof_auroc(names: list[str]) -> float:
        cohort = load_cohort(fs, resolve_sources(fs, names), target.patients)
        res = cross_validate("xgboost", cohort, target, folds=5, seed=0, params={"n_estimators": 100},
                             explain=False)
        y = np.concatenate([target.y[r.test_idx] for r in res])
        prob = np.concatenate([r.pred for r in res])
        return float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))

    single = {t: oof_auroc([t]) for t in ("genes", "proteomics", "clinical")}
    together = oof_auroc(["genes", "proteomics", "clinical"])
    assert together >= max(single.values()) + 0.02, (together, single)
