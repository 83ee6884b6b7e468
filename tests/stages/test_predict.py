"""``predict``: scores a store with a saved run, attention export, mismatch errors, partial modalities."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.planted_data import assert_attention_per_tile, make_store
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit
from mmcli.stages.predict import predict


@pytest.fixture(scope="module")
def abmil_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("abmil")
    p = make_store(d / "s.zarr", n=30, task="binary", seed=21, modalities=("wsi",))
    fit("attention_mil", p.store, p.labels, d / "run", target="label", folds=3, n_boot=5, params={"epochs": 30})
    return p, d / "run"


def test_predict_scores_every_patient_like_the_saved_model(abmil_run, tmp_path):
    p, run = abmil_run
    out = tmp_path / "preds" / "new.csv"
    df = predict(run, p.store, out)
    assert list(df.columns) == ["patient_id", "y_pred", "prob_neg", "prob_pos", "missing_modalities"]
    assert sorted(df["patient_id"]) == sorted(p.labels.index)
    np.testing.assert_allclose(df[["prob_neg", "prob_pos"]].sum(axis=1), 1.0, atol=1e-9)
    again = predict(run / "model", p.store, tmp_path / "again.csv")  # the model folder works as well
    pd.testing.assert_frame_equal(df, again)
    on_disk = pd.read_csv(out, keep_default_na=False)
    np.testing.assert_allclose(on_disk["prob_pos"], df["prob_pos"], rtol=1e-7)
    assert (df["y_pred"] == np.where(df["prob_pos"] > df["prob_neg"], "pos", "neg")).all()


def test_attention_csv_maps_to_item_rows(abmil_run, tmp_path):
    p, run = abmil_run
    out = tmp_path / "pred.csv"
    predict(run, p.store, out, attention=True)
    att = assert_attention_per_tile(tmp_path / "pred.attention.csv", p.store)
    is_key = [(r.item_id, r.index) in p.key.get(r.patient_id, set()) for r in att.itertuples()]
    pos = att[att["patient_id"].isin(list(p.key))].assign(key=np.array(is_key)[att["patient_id"].isin(list(p.key))])
    mass = pos.groupby("patient_id").apply(lambda g: g.loc[g["key"], "attention"].sum(), include_groups=False)
    share = pos.groupby("patient_id")["key"].mean()
    assert (mass > share).mean() > 0.8  # planted key tiles take more than their share of attention


def test_feature_dim_and_encoder_mismatch_are_clear_errors(abmil_run, tmp_path):
    p, run = abmil_run
    bad = open_store(tmp_path / "bad.zarr", "a")
    bad.write_item("wsi", "enc-wsi", "X1", "s", np.zeros((4, 7), np.float32), np.zeros((4, 2), np.int64))
    with pytest.raises(InputError, match=r"modality 'wsi': feature dim mismatch, the model expects 16, found 7"):
        predict(run, tmp_path / "bad.zarr", tmp_path / "o.csv")
    other = open_store(tmp_path / "other.zarr", "a")
    other.write_item("wsi", "enc-new", "X1", "s", np.zeros((4, 16), np.float32), np.zeros((4, 2), np.int64))
    with pytest.raises(InputError, match=r"encoder_id 'enc-wsi', the store has \['enc-new'\]"):
        predict(run, tmp_path / "other.zarr", tmp_path / "o.csv")
    with pytest.raises(InputError, match="not a model folder"):
        predict(tmp_path, p.store, tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_fusion_predicts_patients_with_missing_modalities(tmp_path):
    train = make_store(tmp_path / "train.zarr", n=30, task="survival", seed=22)
    fit("fusion_mlp", train.store, train.labels, tmp_path / "run", time="time", event="event", folds=3, n_boot=5,
        params={"epochs": 5})
    new = open_store(tmp_path / "new.zarr", "a")
    rng = np.random.default_rng(0)
    new.write_item("wsi", "enc-wsi", "N1", "s", rng.normal(size=(5, 16)).astype(np.float16),
                   np.zeros((5, 2), np.int64))
    new.write_item("mri", "enc-mri", "N2", "T1", rng.normal(size=(1, 8)).astype(np.float32))
    genes = pd.DataFrame(rng.normal(size=(2, 12)), index=pd.Index(["N1", "N3"], name="patient_id"),
                         columns=[f"g{j}" for j in range(12)])
    new.write_table("genes", genes[list(reversed(genes.columns))])  # column order differs: realigned by name
    df = predict(tmp_path / "run", tmp_path / "new.zarr", tmp_path / "new.csv")
    assert list(df.columns) == ["patient_id", "risk", "missing_modalities"]
    assert list(df["patient_id"]) == ["N1", "N2", "N3"] and np.isfinite(df["risk"]).all()
    assert list(df["missing_modalities"]) == ["mri", "wsi;genes", "mri;wsi"]


def test_attention_needs_a_head_with_tile_attention(tmp_path):
    train = make_store(tmp_path / "s.zarr", n=24, task="binary", seed=23, modalities=("wsi", "genes"))
    fit("xgboost", train.store, train.labels, tmp_path / "xgb", target="label", folds=2, n_boot=5,
        params={"n_estimators": 5})
    with pytest.raises(InputError, match="has no tile attention"):
        predict(tmp_path / "xgb", train.store, tmp_path / "x.csv", attention=True)
