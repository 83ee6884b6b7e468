"""Contrastive pretraining: the InfoNCE loss falls, the encoders are saved without pickle and start fusion_mlp."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.planted_data import make_store
from mmcli.heads import create_head
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.pretrain import load_pretrained
from mmcli.heads.targets import build_target
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.pretrain import pretrain


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    p = make_store(d / "s.zarr", n=48, task="binary", seed=5, mri_missing=0.25)
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    return p, d


def test_loss_falls_and_saved_encoders_start_fusion_mlp(planted):
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
    names = [s.name for s in head.spec_]
    for k, name in enumerate(names):
        layer = head.module_.embed[k].linear if name == "wsi" else head.module_.embed[k][0]
        torch.testing.assert_close(layer.weight.detach(), enc[name]["weight"], atol=1e-6, rtol=0)
    cold = create_head("fusion_mlp", task="binary", n_classes=2, hidden=16, epochs=1, lr=1e-12).fit(cohort, target.y)
    assert not torch.allclose(cold.module_.embed[names.index("mri")][0].weight, enc["mri"]["weight"])
    with pytest.raises(InputError, match="hidden=16"):
        create_head("fusion_mlp", task="binary", n_classes=2, init=str(d / "pre")).fit(cohort, target.y)
    with pytest.raises(InputError, match="not a pretraining folder"):
        create_head("fusion_mlp", task="binary", n_classes=2, init=str(d)).fit(cohort, target.y)


def test_cli_pretrain_then_fit_with_init(planted, tmp_path):
    p, d = planted
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    mmcli = str(Path(sys.executable).with_name("mmcli"))
    pre = subprocess.run([mmcli, "pretrain", "--store", str(p.store), "--modalities", "mri,genes", "--out",
                          str(tmp_path / "pre"), "--epochs", "5"], capture_output=True, text=True, env=env)
    assert pre.returncode == 0, pre.stderr
    fit = subprocess.run([mmcli, "fit", "--head", "fusion_mlp", "--store", str(p.store), "--labels",
                          str(d / "labels.csv"), "--target", "label", "--modalities", "mri,genes", "--out",
                          str(tmp_path / "run"), "--folds", "3", "--n-boot", "5", "--param", "epochs=2",
                          "--init", str(tmp_path / "pre")], capture_output=True, text=True, env=env)
    assert fit.returncode == 0, fit.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["params"]["init"] == str((tmp_path / "pre").resolve())
    one = subprocess.run([mmcli, "pretrain", "--store", str(p.store), "--modalities", "mri", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert one.returncode == 2 and "at least two" in one.stderr + one.stdout
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["auroc"]["mean"])
