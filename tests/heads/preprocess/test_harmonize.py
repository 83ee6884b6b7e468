"""ComBat batch correction: combatlearn's result, a planted site effect removed with the signal kept, fit inside
each training fold only (perturbing only a fold's test patients leaves that fold's fit unchanged), saved with the
model, unseen batches reported; protected covariates derived from the outcome are refused (issue 24 item 1)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from combatlearn.core import ComBatModel
from sklearn.metrics import roc_auc_score

from helpers.cohorts import binary_target, table_cohort
from helpers.perturb import hold_splits, preprocessor_state, states_equal
from mmcli.heads import create_head, load_head
from mmcli.heads.preprocess.combat import ComBatHarmoniser
from mmcli.heads.preprocess.vector import VectorPreprocessor, load_preprocessors, save_preprocessors
from mmcli.heads.training.cv import cross_validate, make_splits
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
def test_combat_of_a_fold_is_unchanged_when_only_its_test_patients_change(head, monkeypatch):
    """Perturbation (issue 24 item 9): replace one fold's test patients' features, batch, protected covariate and
    label; that fold's fitted ComBat, imputer, scaler and model must be bit-identical (the other folds, which
    train on those patients, must change: the comparison can see a difference)."""
    X, y, pids, cov = planted(n=60)
    target = binary_target(y, pids)
    splits = make_splits(target, 3, 0)
    hold_splits(monkeypatch, pids, splits)
    params = {"batch_correct": "combat", "batch_column": "site", "batch_keep": ["age"],
              **({"n_estimators": 20} if head == "xgboost" else {"epochs": 3})}

    def run(X, y, cov):
        return cross_validate(head, table_cohort(X, pids, covariates=cov), binary_target(y, pids), folds=3, seed=0,
                              params=params, explain=False)

    base = run(X, y, cov)
    for k, (tr, te) in enumerate(splits):
        rng = np.random.default_rng(k)
        X2, y2, cov2 = X.copy(), y.copy(), cov.copy()
        X2[te] = rng.normal(10, 5, X2[te].shape)
        y2[te] = 1 - y2[te]
        cov2.iloc[te, cov2.columns.get_loc("age")] = rng.normal(30, 5, len(te))
        cov2.iloc[te, cov2.columns.get_loc("site")] = rng.permutation(cov2["site"].to_numpy()[te])
        again = run(X2, y2, cov2)
        assert states_equal(preprocessor_state(again[k].head), preprocessor_state(base[k].head)), k
        train = table_cohort(X, pids, covariates=cov).subset(tr)
        np.testing.assert_array_equal(again[k].head.predict(train), base[k].head.predict(train))
        assert all(not states_equal(preprocessor_state(again[j].head), preprocessor_state(base[j].head))
                   for j in range(3) if j != k)


def _labelled_store(tmp_path, n=90, seed=0):
    X, y, pids, cov = planted(n=n, seed=seed)
    fs = open_store(tmp_path / "s.zarr", "a")
    fs.write_table("prot", pd.DataFrame(X, index=pd.Index(pids, name="patient_id"),
                                        columns=[f"p{i}" for i in range(X.shape[1])]))
    labels = cov.assign(label=np.where(y == 1, "pos", "neg")).reset_index()
    return tmp_path / "s.zarr", labels


@pytest.mark.parametrize("keep,reason", [
    ("label", "is an outcome column"),
    ("dx", "one value per class"),  # a recoding of the target
    ("subtype", "determines the class"),  # a finer diagnosis: the target is a function of it
    ("score", "separates the two classes"),  # the target is a threshold of it
])
def test_batch_keep_derived_from_the_target_exits_2(tmp_path, keep, reason):
    """Issue 24 item 1: ComBat reads protected covariates for the test patients, so a protected copy of the label
    corrects each test patient with its own label. Refused by name and by content, exit 2, before --out exists."""
    from typer.testing import CliRunner

    from mmcli.cli import app

    store, labels = _labelled_store(tmp_path)
    rng = np.random.default_rng(1)
    pos = labels["label"].eq("pos").to_numpy()
    labels["dx"] = np.where(pos, 1, 0)
    labels["subtype"] = np.where(pos, rng.choice(["p1", "p2", "p3"], len(pos)), rng.choice(["n1", "n2"], len(pos)))
    labels["score"] = np.where(pos, rng.uniform(5, 9, len(pos)), rng.uniform(0, 4, len(pos)))
    labels.to_csv(tmp_path / "labels.csv", index=False)
    r = CliRunner().invoke(app, ["fit", "--head", "xgboost", "--store", str(store), "--labels",
                                 str(tmp_path / "labels.csv"), "--target", "label", "--out", str(tmp_path / "run"),
                                 "--batch-correct", "combat", "--batch-column", "site", "--batch-keep", f"age,{keep}"])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert f"--batch-keep {keep}" in text and reason in text and "Fix:" in text
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(app, ["fit", "--head", "xgboost", "--store", str(store), "--labels",
                                 str(tmp_path / "labels.csv"), "--target", "label", "--out", str(tmp_path / "run"),
                                 "--batch-correct", "combat", "--batch-column", "label"])
    assert r.exit_code == 2 and "--batch-column label" in " ".join(r.output.split())


def test_leak_check_refuses_survival_copies_and_not_chance_agreement():
    from mmcli.heads.preprocess.leakage import leak_reason
    from mmcli.heads.targets import build_target

    rng = np.random.default_rng(0)
    n = 60
    time, event = rng.exponential(30, n).round(3) + 0.1, rng.integers(0, 2, n)
    pids = [f"P{i:02d}" for i in range(n)]
    surv = build_target(pd.DataFrame({"t": time, "e": event}, index=pd.Index(pids, name="patient_id")),
                        time="t", event="e")
    col = lambda v: pd.Series(v, index=pids)  # noqa: E731
    assert "monotone function of the survival time" in leak_reason(col(np.log(time) * 2), surv)
    assert "event status" in leak_reason(col(np.where(event == 1, "dead", "alive")), surv)
    for unrelated in (rng.normal(60, 10, n), rng.choice(["A", "B", "C"], n), np.round(rng.normal(60, 10, n))):
        assert leak_reason(col(unrelated), surv) is None
    # ten patients: a 2-valued covariate that happens to match the label is not evidence of a copy
    y10 = np.r_[np.zeros(5, int), np.ones(5, int)]
    small = binary_target(y10, pids[:10])
    assert leak_reason(pd.Series(np.where(y10 == 1, "m", "f"), index=pids[:10]), small) is None
    # unknown values are ignored, not counted as a class
    y = rng.integers(0, 2, n)
    copy = np.where(y == 1, 1.0, 0.0)
    copy[:5] = np.nan
    assert "one value per class" in leak_reason(col(copy), binary_target(y, pids))


def test_changing_only_the_test_patients_label_cannot_move_their_probabilities(tmp_path, monkeypatch):
    """Issue 24 item 1, the perturbation form: for every --batch-keep the fit accepts, flipping the label of one
    fold's test patients (the target and its copy ``dx`` in the labels file) leaves their out-of-fold
    probabilities identical. Before the fix ``--batch-keep dx`` was accepted and moved them."""
    from mmcli.heads.targets import build_target
    from mmcli.stages.fit import fit

    store, labels = _labelled_store(tmp_path, n=90)
    labels["dx"] = labels["label"].map({"pos": 1, "neg": 0})
    pids = list(labels["patient_id"])
    splits = make_splits(build_target(labels.set_index("patient_id"), target="label"), 3, 0)
    hold_splits(monkeypatch, pids, splits)
    test = [pids[i] for i in splits[0][1]]
    flipped = labels.copy()
    rows = flipped["patient_id"].isin(test)
    flipped.loc[rows, "label"] = flipped.loc[rows, "label"].map({"pos": "neg", "neg": "pos"})
    flipped.loc[rows, "dx"] = 1 - flipped.loc[rows, "dx"]
    accepted = 0
    for keep in (["age"], ["age", "dx"]):
        probs = []
        for name, table in (("a", labels), ("b", flipped)):
            try:
                fit("xgboost", store, table, tmp_path / f"{name}{len(keep)}", target="label", folds=3, n_boot=5,
                    params={"n_estimators": 30}, batch_correct="combat", batch_column="site", batch_keep=keep,
                    explain="none")
            except InputError as e:
                assert keep == ["age", "dx"] and "--batch-keep dx" in str(e)
                break
            pred = pd.read_csv(tmp_path / f"{name}{len(keep)}" / "predictions.csv").set_index("patient_id")
            probs.append(pred.loc[test, "prob_pos"].to_numpy())
        else:
            accepted += 1
            np.testing.assert_array_equal(probs[0], probs[1], err_msg=f"--batch-keep {keep}")
    assert accepted >= 1


def test_a_protected_label_copy_would_move_the_test_probabilities():
    """What the refusal prevents, at the preprocessing level (where nothing refuses it): ComBat with the label
    protected gives a test patient other features when only its label is changed."""
    X, y, pids, cov = planted(n=90)
    cov = cov.assign(dx=y)
    prep = VectorPreprocessor(harmoniser=ComBatHarmoniser("site", ["age", "dx"])).fit(X[:60], pids[:60], cov)
    flipped = cov.copy()
    flipped.loc[pids[60:], "dx"] = 1 - flipped.loc[pids[60:], "dx"]
    moved = np.abs(prep.transform(X[60:], pids[60:], cov) - prep.transform(X[60:], pids[60:], flipped))
    assert moved[:, :3].mean() > 0.1


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
