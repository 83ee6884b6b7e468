"""Contrastive pretraining: the InfoNCE loss falls, the encoders are saved without pickle and start fusion_mlp
(as the same function of the raw features, on the fold's own in-fold standardisation), optionally frozen."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.planted_data import make_store
from mmcli.heads import create_head
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.nn.pretrained import load_pretrained, refit_to_standardisation
from mmcli.heads.targets import build_target
from mmcli.heads.training.pretrain import ContrastivePretrainer
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.pretrain import pretrain


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    p = make_store(d / "s.zarr", n=48, task="binary", seed=5, mri_missing=0.25)
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    return p, d


def _first_layer(head, name: str) -> torch.nn.Linear:
    k = [s.name for s in head.spec_].index(name)
    return head.module_.embed[k].linear if name == "wsi" else head.module_.embed[k][0]


def _fold_input(head, cohort, name: str, rows: np.ndarray) -> np.ndarray:
    """Raw features of ``rows`` standardised as the head's fold does (wsi: one tile per patient)."""
    m, prep = cohort.modalities[name], head.preprocessors_[name]
    if name == "wsi":
        return np.stack([(m.bags[i][0] - prep.mean_) / prep.scale_ for i in rows])
    return prep.transform(m.vectors[rows])


def _raw(cohort, name: str, rows: np.ndarray) -> np.ndarray:
    m = cohort.modalities[name]
    return np.stack([m.bags[i][0] for i in rows]) if name == "wsi" else m.vectors[rows]


def test_loss_falls_and_saved_encoders_start_fusion_mlp(planted):
    """Changed from comparing the layer weights with the saved ones: the fold standardises in-fold, so the
    loaded layer is rescaled (``refit_to_standardisation``); what must hold is that it computes the encoder."""
    p, d = planted
    res = pretrain(p.store, ["wsi", "mri", "genes"], d / "pre", hidden=16, epochs=40, seed=0)
    assert res["loss_last"] < 0.7 * res["loss_first"]
    config = json.loads((d / "pre" / "pretrain.json").read_text())
    assert len(config["loss_per_epoch"]) == 40 and config["patients_per_pair"]["wsi+mri"] < res["patients"]
    _, enc = load_pretrained(d / "pre")
    assert set(enc) == {"wsi", "mri", "genes"}
    fs = open_store(p.store, "r")
    target = build_target(p.labels, target="label")
    cohort = load_cohort(fs, resolve_sources(fs), target.patients)
    head = create_head("fusion_mlp", task="binary", n_classes=2, hidden=16, epochs=1, lr=1e-12,
                       init=str(d / "pre")).fit(cohort, target.y)
    complete = cohort.presence().all(axis=1)
    for m in cohort.modalities.values():
        if m.vectors is not None:  # imputation of missing values differs by design (fold vs pretraining median)
            complete &= ~np.isnan(m.vectors).any(axis=1)
    rows = np.flatnonzero(complete)[:10]
    assert len(rows) >= 5
    for name in ("wsi", "mri", "genes"):
        layer = _first_layer(head, name)
        got = layer(torch.as_tensor(_fold_input(head, cohort, name, rows), dtype=torch.float32))
        u = (_raw(cohort, name, rows) - enc[name]["input_mean"].numpy()) / enc[name]["input_scale"].numpy()
        want = torch.as_tensor(u, dtype=torch.float32) @ enc[name]["weight"].T + enc[name]["bias"]
        torch.testing.assert_close(got.detach(), want, atol=1e-3, rtol=1e-3)
    cold = create_head("fusion_mlp", task="binary", n_classes=2, hidden=16, epochs=1, lr=1e-12).fit(cohort, target.y)
    assert not torch.allclose(_first_layer(cold, "mri").weight, _first_layer(head, "mri").weight)
    with pytest.raises(InputError, match="hidden=16"):
        create_head("fusion_mlp", task="binary", n_classes=2, init=str(d / "pre")).fit(cohort, target.y)
    with pytest.raises(InputError, match="not a pretraining folder"):
        create_head("fusion_mlp", task="binary", n_classes=2, init=str(d)).fit(cohort, target.y)


def test_refit_to_standardisation_is_the_same_function():
    rng = np.random.default_rng(0)
    W, b = torch.randn(5, 7), torch.randn(5)
    m_p, s_p, m, s = rng.normal(size=7), rng.uniform(0.5, 2, 7), rng.normal(size=7), rng.uniform(0.5, 2, 7)
    x = rng.normal(size=(20, 7)) * 3 + 1
    w2, b2 = refit_to_standardisation({"weight": W, "bias": b, "input_mean": torch.as_tensor(m_p),
                                       "input_scale": torch.as_tensor(s_p)}, m, s)
    pre = torch.as_tensor((x - m_p) / s_p, dtype=torch.float32) @ W.T + b
    fold = torch.as_tensor((x - m) / s, dtype=torch.float32) @ w2.T + b2
    torch.testing.assert_close(fold, pre, atol=1e-4, rtol=1e-4)


def test_init_keeps_preprocessing_in_fold_and_freeze_init_keeps_the_encoders(planted):
    """The fold's scalers see its training patients only (pretraining adds no other patient to them), and
    freeze_init leaves the pretrained layers exactly as loaded while the layers above them train."""
    p, d = planted
    pretrain(p.store, ["mri", "genes"], d / "pre2", hidden=16, epochs=5, seed=0)
    fs = open_store(p.store, "r")
    target = build_target(p.labels, target="label")
    cohort = load_cohort(fs, resolve_sources(fs, ["mri", "genes"]), target.patients)
    train = np.arange(0, len(cohort), 2)
    sub = cohort.subset(train)

    def fit(**kw):
        return create_head("fusion_mlp", task="binary", n_classes=2, hidden=16, epochs=5, lr=0.05,
                           init=str(d / "pre2"), **kw).fit(sub, target.y[train])

    frozen, tuned = fit(freeze_init=True), fit()
    _, enc = load_pretrained(d / "pre2")
    for name in ("mri", "genes"):
        prep = frozen.preprocessors_[name]
        assert set(prep.fitted_patients) <= set(sub.patients)
        w, b = refit_to_standardisation(enc[name], prep.mean_, prep.scale_)
        torch.testing.assert_close(_first_layer(frozen, name).weight.detach(), w)
        torch.testing.assert_close(_first_layer(frozen, name).bias.detach(), b)
        assert not torch.allclose(_first_layer(tuned, name).weight.detach(), w, atol=1e-3)
    init_head = create_head("fusion_mlp", task="binary", n_classes=2, hidden=16, epochs=1, lr=1e-12,
                            init=str(d / "pre2"), freeze_init=True).fit(sub, target.y[train])
    assert not torch.allclose(frozen.module_.head[0].weight, init_head.module_.head[0].weight, atol=1e-3)
    saved = frozen.save(d / "frozen_model")
    again = type(frozen).load(saved)
    np.testing.assert_allclose(again.predict(cohort), frozen.predict(cohort), atol=1e-6)
    with pytest.raises(InputError, match="freeze_init"):
        create_head("fusion_mlp", task="binary", n_classes=2, freeze_init=True)


def test_pretrainer_reads_no_labels_and_uses_unlabelled_patients(planted):
    """Pretraining takes a cohort of features only; every patient with two modalities is a positive pair."""
    p, _ = planted
    fs = open_store(p.store, "r")
    cohort = load_cohort(fs, resolve_sources(fs, ["mri", "genes"]))
    both = int((cohort.presence().sum(axis=1) == 2).sum())
    model = ContrastivePretrainer(hidden=8, epochs=2).fit(cohort)
    assert model.pairs_ == {"mri+genes": both}
    assert model.preprocessors_["genes"].fitted_patients == list(cohort.patients)


def _pairs_in_store(store, names=("mri", "genes")) -> set[str]:
    """Patients with features of both modalities, read from the store directly (items, table rows)."""
    fs = open_store(store, "r")
    sets = []
    for name in names:
        if name in fs.tables():
            t = fs.read_table(name)
            sets.append({str(p) for p, row in t.iterrows() if row.notna().any()})
        else:
            (enc,) = fs.encoders(name)
            sets.append(set(fs.patients(name, enc)))
    return set.intersection(*sets)


def test_cli_pretrain_then_fit_with_init_audits_the_overlap(planted, tmp_path):
    """Issue 24 item 5: pretrain.json lists the patients it saw; fit --init writes, per fold, how many of the fold's
    test patients they include (cv_audit.json) and a note (metrics.json); --init-in-fold pretrains each fold
    without its test patients. The numbers are recomputed from the store and folds.json."""
    p, d = planted
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    mmcli = str(Path(sys.executable).with_name("mmcli"))
    pre = subprocess.run([mmcli, "pretrain", "--store", str(p.store), "--modalities", "mri,genes", "--out",
                          str(tmp_path / "pre"), "--epochs", "5"], capture_output=True, text=True, env=env)
    assert pre.returncode == 0, pre.stderr
    both = _pairs_in_store(p.store)
    assert 0 < len(both) < 48
    assert set(json.loads((tmp_path / "pre" / "pretrain.json").read_text())["patients"]) == both
    base = [mmcli, "fit", "--head", "fusion_mlp", "--store", str(p.store), "--labels", str(d / "labels.csv"),
            "--target", "label", "--modalities", "mri,genes", "--folds", "3", "--n-boot", "5", "--param",
            "epochs=2", "--init", str(tmp_path / "pre")]
    for name, extra in (("run", []), ("infold", ["--init-in-fold"])):
        fit = subprocess.run([*base, "--out", str(tmp_path / name), *extra], capture_output=True, text=True,
                             env=env)
        assert fit.returncode == 0, fit.stderr
        run = tmp_path / name
        config = json.loads((run / "config.json").read_text())
        assert config["params"]["init"] == str((tmp_path / "pre").resolve())
        folds = json.loads((run / "folds.json").read_text())
        audit = json.loads((run / "cv_audit.json").read_text())["folds"]
        note = json.loads((run / "metrics.json").read_text())["pretraining"]
        for f in audit:
            test = {q for q, k in folds.items() if k == f["fold"]}
            pre_f = f["pretraining"]
            if extra:  # the fold's own pretraining: the store's pairs minus the fold's test patients
                assert set(pre_f["patients"]) == both - test and pre_f["overlap_with_test"] == 0
            else:
                assert pre_f["overlap_with_test"] == len(both & test) > 0
                assert set(pre_f["test_patients_seen"]) == both & test
        assert note["in_fold"] == bool(extra)
        assert note["overlap_with_test_per_fold"] == [f["pretraining"]["overlap_with_test"] for f in audit]
        assert ("transductive" in note["note"]) != bool(extra)
        # the headline AUROC is the mean of the per-fold AUROCs of predictions.csv (recomputed with scikit-learn)
        from sklearn.metrics import roc_auc_score

        pred = pd.read_csv(run / "predictions.csv")
        per_fold = [roc_auc_score(g["y_true"] == "pos", g["prob_pos"]) for _, g in pred.groupby("fold")]
        auroc = json.loads((run / "metrics.json").read_text())["metrics"]["auroc"]
        np.testing.assert_allclose(auroc["per_fold"], per_fold, atol=1e-12)
    one = subprocess.run([mmcli, "pretrain", "--store", str(p.store), "--modalities", "mri", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert one.returncode == 2 and "at least two" in one.stderr + one.stdout
    bad = subprocess.run([*base[:-2], "--out", str(tmp_path / "bad"), "--init-in-fold"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "--init-in-fold needs" in bad.stderr + bad.stdout


def test_in_fold_pretraining_does_not_change_when_only_the_test_patients_do(planted, tmp_path):
    """Perturbation: two stores that differ only in one fold's test patients' genes give that fold bit-identical
    pretrained encoders and standardisation; without leaving the test patients out (whole-store pretraining) they
    differ, so the comparison can see a change."""
    from mmcli.heads.training.pretrain import FoldPretraining

    p, d = planted
    pretrain(p.store, ["mri", "genes"], d / "pre_fold", hidden=8, epochs=3, seed=0)
    other = make_store(tmp_path / "s2.zarr", n=48, task="binary", seed=5, mri_missing=0.25)
    test = sorted(_pairs_in_store(p.store))[::4]
    fs2 = open_store(other.store, "a")
    genes = fs2.read_table("genes")
    genes.loc[test] = np.random.default_rng(0).normal(5, 3, (len(test), genes.shape[1]))
    fs2.write_table("genes", genes)

    def fold_files(store, left_out):
        params = create_head("fusion_mlp", task="binary", n_classes=2).params_
        with FoldPretraining(str(store), str(d / "pre_fold"))(0, left_out, params) as (fold_params, record):
            root = Path(fold_params.init)
            return {f.name: f.read_bytes() for f in root.iterdir() if f.suffix == ".safetensors"}, record

    a, rec = fold_files(p.store, test)
    b, _ = fold_files(other.store, test)
    assert a == b and rec["overlap_with_test"] == 0 and not set(rec["patients"]) & set(test)
    assert fold_files(p.store, [])[0] != fold_files(other.store, [])[0]
