"""ComBat batch correction: combatlearn's result, a planted site effect removed with the signal kept, fit inside
each training fold only (the audit lists training patients), saved with the model, unseen batches reported."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from combatlearn.core import ComBatModel
from sklearn.metrics import roc_auc_score

from helpers.cohorts import binary_target, table_cohort
from mmcli.heads import create_head, load_head
from mmcli.heads.preprocess.combat import ComBatHarmoniser
from mmcli.heads.preprocess.vector import VectorPreprocessor, load_preprocessors, save_preprocessors
from mmcli.heads.training.cv import cross_validate
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store


def planted(n=90, d=6, seed=0, shift=3.0):
    """Features = 1.5 * label (first 3 features) + 0.05 * age + site offset + noise (site B: twice the noise
    scale); site C has a
    different label mix than A, so an uncorrected site effect is a confounder."""
    rng = np.random.default_rng(seed)
    pids = [f"P{i:03d}" for i in range(n)]
    site = np.array(["A", "B", "C"])[np.arange(n) % 3]
    y = (rng.random(n) < np.where(site == "C", 0.7, 0.4)).astype(int)
    age = rng.normal(60, 10, n)
    noise = rng.normal(size=(n, d))
    noise[site == "B"] *= 2.0  # site B: twice the noise scale
    X = noise + 0.05 * age[:, None] + np.where(site == "B", shift, np.where(site == "C", -shift, 0.0))[:, None]
    X[:, :3] += 1.5 * y[:, None]
    cov = pd.DataFrame({"site": site, "age": age}, index=pd.Index(pids, name="patient_id"))
    return X, y, pids, cov


def test_harmoniser_equals_combatlearn_and_protects_covariates():
    X, _, pids, cov = planted()
    h = ComBatHarmoniser("site", ["age"]).fit(X[:60], pids[:60], cov)
    model = ComBatModel(method="fortin").fit(
        pd.DataFrame(X[:60]), batch=pd.Series(cov.site.to_numpy()[:60]),
        continuous_covariates=pd.DataFrame({"age": cov.age.to_numpy()[:60]}))
    ref = model.transform(pd.DataFrame(X[60:]), batch=pd.Series(cov.site.to_numpy()[60:]),
                          continuous_covariates=pd.DataFrame({"age": cov.age.to_numpy()[60:]})).to_numpy()
    out, skip = h.transform(X[60:], pids[60:], cov)
    np.testing.assert_allclose(out, ref, atol=1e-9)
    assert not skip.any() and h.fitted_patients == pids[:60]
    # the protected age effect survives correction
    corrected, _ = h.transform(X, pids, cov)
    assert np.corrcoef(corrected[:, 4], cov.age)[0, 1] > 0.3


def test_planted_site_effect_is_removed_and_signal_kept():
    X, y, pids, cov = planted(n=150)
    h = ComBatHarmoniser("site", ["age"]).fit(X, pids, cov)
    Z, _ = h.transform(X, pids, cov)
    site = cov.site.to_numpy()
    for data, far in ((X, True), (Z, False)):
        means = np.array([data[site == s, 3:].mean() for s in "ABC"])  # label-free features: site only
        assert (np.ptp(means) > 2.0) == far
    def scale_ratio(data):
        return np.mean(data[site == "B", 3:].std(0) / data[site == "A", 3:].std(0))

    assert scale_ratio(X) > 1.6 and abs(scale_ratio(Z) - 1) < 0.25
    # the label signal in features 0-2 is kept (within each site, and overall)
    assert roc_auc_score(y, Z[:, :3].mean(1)) > 0.8
    assert roc_auc_score(y, Z[:, :3].mean(1)) > roc_auc_score(y, X[:, :3].mean(1))


def test_unseen_and_missing_batches_are_left_uncorrected_and_reported(tmp_path):
    X, _, pids, cov = planted()
    prep = VectorPreprocessor(impute="median", harmoniser=ComBatHarmoniser("site")).fit(X[:60], pids[:60], cov)
    save_preprocessors(tmp_path, {"prot": prep})
    back = load_preprocessors(tmp_path)["prot"]
    np.testing.assert_array_equal(back.transform(X, pids, cov), prep.transform(X, pids, cov))
    cov2 = cov.copy()
    cov2.loc[pids[60], "site"] = "D"
    cov2.loc[pids[61], "site"] = np.nan
    raw, skip = back.harmoniser.transform(X[60:], pids[60:], cov2)
    assert list(skip[:3]) == [True, True, False]
    np.testing.assert_array_equal(raw[:2], X[60:62])
    back.transform(X[60:], pids[60:], cov2)
    assert back.uncorrected_ == pids[60:62]
    with pytest.raises(InputError, match="site"):
        back.transform(X, pids, None)


@pytest.mark.parametrize("head", ["xgboost", "fusion_mlp"])
def test_combat_is_fit_inside_each_training_fold_only(head):
    X, y, pids, cov = planted(n=60)
    cohort, target = table_cohort(X, pids, covariates=cov), binary_target(y, pids)
    params = {"batch_correct": "combat", "batch_column": "site", "batch_keep": ["age"],
              **({"n_estimators": 20} if head == "xgboost" else {"epochs": 3})}
    for r in cross_validate(head, cohort, target, folds=3, seed=0, params=params, explain=False):
        train, test = {pids[i] for i in r.train_idx}, {pids[i] for i in r.test_idx}
        seen = set(r.preprocessing_patients["prot/combat"])
        assert seen == train and not seen & test


def test_fit_stage_records_combat_in_the_audit_and_predict_applies_it(tmp_path):
    X, y, pids, cov = planted(n=60)
    fs = open_store(tmp_path / "s.zarr", "a")
    fs.write_table("prot", pd.DataFrame(X, index=pd.Index(pids, name="patient_id"),
                                        columns=[f"p{i}" for i in range(X.shape[1])]))
    labels = cov.assign(label=y).reset_index()
    labels.to_csv(tmp_path / "labels.csv", index=False)
    from mmcli.stages.fit import fit
    from mmcli.stages.predict import predict

    fit("xgboost", tmp_path / "s.zarr", tmp_path / "labels.csv", tmp_path / "run", target="label", folds=3,
        n_boot=5, params={"n_estimators": 20}, batch_correct="combat", batch_column="site", batch_keep=["age"])
    run = tmp_path / "run"
    audit = json.loads((run / "cv_audit.json").read_text())
    folds = json.loads((run / "folds.json").read_text())
    for f in audit["folds"]:
        test = {p for p, k in folds.items() if k == f["fold"]}
        assert f["overlap_with_test"]["prot/combat"] == 0
        assert set(f["preprocessing_fit_on"]["prot/combat"]) == set(pids) - test
        assert f["batch_correction"]["training_batches"] == ["A", "B", "C"]
    config = json.loads((run / "config.json").read_text())
    assert config["params"]["batch_correct"] == "combat" and config["params"]["batch_column"] == "site"
    model = load_head(run / "model")
    assert model.preprocessors_["prot"].harmoniser.batches_ == ["A", "B", "C"]
    cov.loc[pids[0], "site"] = "Z"
    cov.reset_index().to_csv(tmp_path / "cov.csv", index=False)
    df = predict(run, tmp_path / "s.zarr", tmp_path / "pred.csv", covariates=tmp_path / "cov.csv")
    assert df.set_index("patient_id")["batch_corrected"].to_dict() == {p: p != pids[0] for p in pids}
    with pytest.raises(InputError, match="site"):
        predict(run, tmp_path / "s.zarr", tmp_path / "pred2.csv")


def test_combat_without_a_batch_column_is_an_input_error():
    with pytest.raises(InputError, match="batch_column"):
        create_head("xgboost", batch_correct="combat")
