"""Integrated gradients for fusion_mlp: completeness, named table features, out-of-fold attributions.csv."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers.cohorts import binary_target, table_cohort
from helpers.planted_data import make_store
from mmcli.heads import create_head
from mmcli.heads.data import ModalityData, ModalitySpec


def _cohort(n=50, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 4))
    X[:, 0] += 1.5 * y
    X[rng.random(n) < 0.2, 2] = np.nan
    pids = [f"P{i:03d}" for i in range(n)]
    cohort = table_cohort(X, pids)
    emb = rng.normal(size=(n, 40)).astype(np.float32)
    emb[:, :3] += y[:, None]
    emb[:5] = np.nan  # 5 patients without the embedding modality
    spec = ModalitySpec("text", "vector", "store", "minilm-test", 40)
    cohort.modalities["text"] = ModalityData(spec, present=~np.isnan(emb).all(1), vectors=emb)
    return cohort, binary_target(y, pids)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_ig_completeness_and_named_features(task):
    cohort, target = _cohort()
    y = target.y if task == "binary" else (target.y + (np.arange(len(target.y)) % 3 == 0)).astype(int)
    head = create_head("fusion_mlp", task=task, n_classes=int(y.max()) + 1, epochs=8, impute="median",
                       n_components=8).fit(cohort, y)
    ig = head.attributions(cohort)
    per_patient = ig.groupby("patient_id", sort=False).agg(total=("attribution", "sum"), out=("output", "first"),
                                                           base=("baseline_output", "first"))
    # completeness, up to IG's 64-step integral of a ReLU network
    np.testing.assert_allclose(per_patient.total, per_patient.out - per_patient.base, atol=1e-2, rtol=1e-2)
    assert (per_patient.out - per_patient.base).abs().max() > 0.1  # not a trivially zero model
    table = ig[ig.modality == "prot"]
    assert set(table.feature) == {"f0", "f1", "f2", "f3", "f2__missing"}
    text = ig[ig.modality == "text"]
    assert set(text.feature) == {"(sum)"} and len(text) == len(cohort) - 5
    if task == "binary":  # the attributed output is the model's log-odds
        p = head.predict(cohort)
        np.testing.assert_allclose(per_patient.out.to_numpy(), np.log(p[:, 1] / p[:, 0]), atol=1e-4)
        mean_abs = table.assign(a=table.attribution.abs()).groupby("feature").a.mean()
        assert mean_abs.idxmax() == "f0"  # the planted feature


def test_fit_writes_out_of_fold_attributions_with_bags(tmp_path):
    from mmcli.stages.fit import fit

    p = make_store(tmp_path / "s.zarr", n=30, task="binary", seed=4)
    fit("fusion_mlp", p.store, p.labels, tmp_path / "run", target="label", folds=3, n_boot=5,
        params={"epochs": 3})
    ig = pd.read_csv(tmp_path / "run" / "attributions.csv")
    folds = json.loads((tmp_path / "run" / "folds.json").read_text())
    assert list(ig.columns[:2]) == ["patient_id", "fold"]
    assert set(ig.modality) == {"wsi", "mri", "genes"}
    assert all(folds[pid] == f for pid, f in zip(ig.patient_id, ig.fold))
    assert set(ig[ig.modality == "wsi"].feature) == {"(sum)"}
    total = ig.groupby("patient_id").agg(t=("attribution", "sum"), o=("output", "first"),
                                         b=("baseline_output", "first"))
    np.testing.assert_allclose(total.t, total.o - total.b, atol=1e-2, rtol=2e-2)
