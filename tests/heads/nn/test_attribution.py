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
    fit("fusion_mlp", p.store, p.labels, tmp_path / "default", target="label", folds=3, n_boot=5,
        params={"epochs": 3})
    # IG through bags costs ~64 passes per bag: only with --explain full (attention and weights by default)
    assert not (tmp_path / "default" / "attributions.csv").exists()
    assert (tmp_path / "default" / "modality_weights.json").exists()
    fit("fusion_mlp", p.store, p.labels, tmp_path / "run", target="label", folds=3, n_boot=5,
        params={"epochs": 3}, explain="full")
    ig = pd.read_csv(tmp_path / "run" / "attributions.csv")
    folds = json.loads((tmp_path / "run" / "folds.json").read_text())
    assert list(ig.columns[:2]) == ["patient_id", "fold"]
    assert set(ig.modality) == {"wsi", "mri", "genes"}
    assert all(folds[pid] == f for pid, f in zip(ig.patient_id, ig.fold))
    assert set(ig[ig.modality == "wsi"].feature) == {"(sum)"}
    total = ig.groupby("patient_id").agg(t=("attribution", "sum"), o=("output", "first"),
                                         b=("baseline_output", "first"))
    np.testing.assert_allclose(total.t, total.o - total.b, atol=1e-2, rtol=2e-2)


def _bag_cohort(n=24, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    pids = [f"P{i:03d}" for i in range(n)]
    bags = []
    for i in range(n):
        bag = rng.normal(size=(int(rng.integers(3, 9)), 6)).astype(np.float32)
        bag[0, :2] += 2.0 * y[i]  # one informative tile
        bags.append(bag)
    spec = ModalitySpec("wsi", "bag", "store", "enc", 6)
    m = ModalityData(spec, np.ones(n, bool), bags=bags, items=[[("s", len(b))] for b in bags])
    from mmcli.heads.data import Cohort

    return Cohort(pids, {"wsi": m}), y


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_attention_mil_tile_attributions_find_the_informative_tile(task):
    """Per-tile IG (--explain full): one row per tile with its item and index, the tiles of a bag add up to the
    output minus the baseline output (completeness), and in positive bags the planted tile (index 0) carries the
    largest attribution: a per-bag sum, or a constant spread over the tiles, fails the last check."""
    cohort, y = _bag_cohort(n=40)
    y = y if task == "binary" else (y + (np.arange(len(y)) % 3 == 0)).astype(int)
    head = create_head("attention_mil", task=task, n_classes=int(y.max()) + 1, epochs=40).fit(cohort, y)
    tiles = head.tile_attributions(cohort)
    bags = cohort.modalities["wsi"].bags
    assert len(tiles) == sum(bags.lengths()) and list(tiles.columns[:3]) == ["patient_id", "item_id", "index"]
    per = tiles.groupby("patient_id", sort=False).agg(a=("attribution", "sum"), o=("output", "first"),
                                                    b=("baseline_output", "first"))
    np.testing.assert_allclose(per.a, per.o - per.b, atol=2e-2, rtol=2e-2)
    assert (per.o - per.b).abs().max() > 0.1
    if task == "binary":
        p = head.predict(cohort)
        np.testing.assert_allclose(per.o.to_numpy(), np.log(p[:, 1] / p[:, 0]), atol=1e-4)
        top = tiles.loc[tiles.groupby("patient_id").attribution.idxmax()].set_index("patient_id")["index"]
        positives = [pid for pid, lab in zip(cohort.patients, y) if lab == 1]
        assert (top.loc[positives] == 0).mean() >= 0.7


def test_window_ig_sums_to_the_pooled_modality_row():
    """Per-window IG of a note modality: windows pooled with their token weights give the cohort's vector, and
    the windows' attributions add up to that modality's (sum) row, which equals the pooled IG."""
    from mmcli.heads.nn.attribution import Windows, integrated_gradients, window_integrated_gradients

    cohort, target = _cohort(n=40)
    rng = np.random.default_rng(3)
    text = cohort.modalities["text"]
    windows = {}
    for i, pid in enumerate(cohort.patients):
        if not text.present[i] or i % 4 == 0:  # every 4th patient: an old pooled item, no windows
            continue
        n = int(rng.integers(1, 5))
        tokens = rng.integers(20, 256, n).astype(float)
        feats = text.vectors[i] + rng.normal(scale=0.5, size=(n, 40)).astype(np.float32)
        coef = tokens / tokens.sum()
        text.vectors[i] = (feats * coef[:, None]).sum(0)  # the cohort's vector is the windows' weighted mean
        windows[pid] = Windows(feats, coef, ["note"] * n, np.arange(n), np.stack([np.arange(n) * 10,
                               np.arange(n) * 10 + 15], 1), tokens.astype(np.int64))
    head = create_head("fusion_mlp", task="binary", n_classes=2, epochs=8, n_components=8).fit(cohort, target.y)
    ig, wig = window_integrated_gradients(head, cohort, {"text": windows})
    plain = integrated_gradients(head, cohort)
    pd.testing.assert_frame_equal(ig.drop(columns="attribution"), plain.drop(columns="attribution"))
    np.testing.assert_allclose(ig.attribution, plain.attribution, atol=1e-4)
    assert set(wig.patient_id) == set(windows) and len(wig) == sum(len(w.coef) for w in windows.values())
    summed = wig.groupby("patient_id").attribution.sum()
    rows = ig[(ig.modality == "text")].set_index("patient_id").attribution
    np.testing.assert_allclose(summed, rows.loc[summed.index], atol=1e-5)
    assert wig.attribution.abs().max() > 1e-3
    assert list(wig.columns) == ["patient_id", "modality", "item_id", "window", "char_start", "char_end", "tokens",
                                 "attribution"]
