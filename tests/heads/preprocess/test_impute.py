"""Imputation with missingness indicators: the scikit-learn result, fit in-fold only (a fold's imputer does not
change when only its test patients do), saved without pickle."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from helpers.cohorts import binary_target, table_cohort
from helpers.perturb import hold_splits, preprocessor_state, states_equal
from mmcli.heads import create_head, load_head
from mmcli.heads.preprocess.vector import VectorPreprocessor, _sk_imputer, load_preprocessors, save_preprocessors
from mmcli.heads.training.cv import cross_validate, make_splits
from mmcli.pipeline.errors import InputError

STRATEGIES = ["mean", "median", "knn", "iterative"]


def _data(n=40, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) + np.arange(d)
    X[:, :3][rng.random((n, 3)) < 0.25] = np.nan  # features 3, 4 complete: no indicator for them
    return X


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_indicators_are_added_for_features_with_missing_values_and_match_sklearn(strategy):
    X = _data()
    pids = [f"P{i}" for i in range(len(X))]
    prep = VectorPreprocessor(impute=strategy).fit(X, pids)
    np.testing.assert_array_equal(prep.indicator_, [0, 1, 2])
    assert prep.out_dim == 5 + 3
    assert prep.feature_names([f"t:f{i}" for i in range(5)])[5:] == ["t:f0__missing", "t:f1__missing",
                                                                     "t:f2__missing"]
    Xn = _data(seed=1)
    unscaled = prep.transform(Xn) * prep.scale_ + prep.mean_
    ref = _sk_imputer(strategy).fit(X).transform(Xn)  # values then indicator columns (add_indicator=True)
    np.testing.assert_allclose(unscaled, ref, atol=1e-8)
    np.testing.assert_allclose(unscaled[:, 5:], np.isnan(Xn[:, :3]), atol=1e-8)
    assert prep.fitted_patients == pids


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_imputing_preprocessor_round_trips_without_pickle(tmp_path, strategy):
    X = _data()
    prep = VectorPreprocessor(n_components=4, impute=strategy).fit(X, [f"P{i}" for i in range(len(X))])
    save_preprocessors(tmp_path, {"prot": prep})
    assert not list(tmp_path.glob("*.pkl"))
    back = load_preprocessors(tmp_path)["prot"]
    Xn = _data(seed=2)
    np.testing.assert_array_equal(back.transform(Xn), prep.transform(Xn))
    assert back.impute == strategy


def test_default_preprocessing_has_no_indicators():
    prep = VectorPreprocessor().fit(_data(), [f"P{i}" for i in range(40)])
    assert prep.indicator_ is None and prep.out_dim == 5


@pytest.mark.parametrize("head", ["xgboost", "fusion_mlp"])
def test_imputation_is_fit_inside_each_training_fold_and_saved_with_the_model(tmp_path, monkeypatch, head):
    """Perturbation (issue 24 item 9): replace one fold's test patients' values and missingness and flip their
    labels; that fold's imputer (knn: its training matrix), indicators, scaler and model are bit-identical, the
    other folds' (which train on those patients) are not."""
    X = _data(n=48)
    pids = [f"P{i:02d}" for i in range(48)]
    y = (np.nan_to_num(X[:, 3]) > 3).astype(int)
    target = binary_target(y, pids)
    splits = make_splits(target, 3, 0)
    hold_splits(monkeypatch, pids, splits)
    params = {"impute": "knn", **({"n_estimators": 20} if head == "xgboost" else {"epochs": 5})}

    def run(X, y):
        return cross_validate(head, table_cohort(X, pids), binary_target(y, pids), folds=3, seed=0, params=params,
                              explain=False)

    base = run(X, y)
    assert all(r.head.preprocessors_["prot"].n_indicators == 3 for r in base)
    for k, (tr, te) in enumerate(splits):
        rng = np.random.default_rng(k)
        X2, y2 = X.copy(), y.copy()
        X2[te] = rng.normal(20, 5, X2[te].shape)
        X2[te, 4] = np.nan  # a missingness pattern the training patients never had
        y2[te] = 1 - y2[te]
        again = run(X2, y2)
        assert states_equal(preprocessor_state(again[k].head), preprocessor_state(base[k].head)), k
        train = table_cohort(X, pids).subset(tr)
        np.testing.assert_array_equal(again[k].head.predict(train), base[k].head.predict(train))
        assert all(not states_equal(preprocessor_state(again[j].head), preprocessor_state(base[j].head))
                   for j in range(3) if j != k)
    cohort = table_cohort(X, pids)
    model = create_head(head, task="binary", n_classes=2, **params).fit(cohort, target.y)
    back = load_head(model.save(tmp_path / "m"))
    assert back.get_params()["impute"] == "knn"
    np.testing.assert_allclose(back.predict(cohort), model.predict(cohort), atol=1e-6)


def test_indicator_carries_signal_of_values_missing_not_at_random():
    """Proteomics-style MNAR: a protein is unmeasured (below detection) mostly in cases. Median imputation
    alone hides that; the indicator keeps it."""
    rng = np.random.default_rng(3)
    n = 120
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 4))
    X[(rng.random(n) < np.where(y == 1, 0.8, 0.1)), 0] = np.nan
    pids = [f"P{i:03d}" for i in range(n)]
    cohort, target = table_cohort(X, pids), binary_target(y, pids)

    def auroc(params):
        res = cross_validate("fusion_mlp", cohort, target, folds=3, seed=0, explain=False,
                             params={"epochs": 30, **params})
        return roc_auc_score(np.concatenate([target.y[r.test_idx] for r in res]),
                             np.concatenate([r.pred[:, 1] for r in res]))

    assert auroc({"impute": "median"}) > 0.75 > auroc({}) + 0.1


def test_unknown_imputation_is_an_input_error_naming_the_parameter():
    with pytest.raises(InputError, match="impute"):
        create_head("xgboost", impute="zero")
