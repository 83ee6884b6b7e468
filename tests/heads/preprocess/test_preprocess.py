"""In-fold preprocessing: same result as the scikit-learn pipeline, saved without pickle, records its rows."""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmcli.heads.preprocess.vector import (
    InstanceScaler,
    VectorPreprocessor,
    load_preprocessors,
    save_preprocessors,
)


def _data(n=30, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * np.arange(1, d + 1) + 5
    X[rng.random(X.shape) < 0.1] = np.nan
    return X


def test_vector_preprocessor_equals_sklearn_pipeline_and_records_patients():
    X = _data()
    pids = [f"P{i}" for i in range(len(X))]
    prep = VectorPreprocessor(n_components=3).fit(X, pids)
    ref = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), PCA(3, svd_solver="full")).fit(X)
    Xn = _data(seed=1)
    np.testing.assert_allclose(prep.transform(Xn), ref.transform(Xn), atol=1e-10)
    assert prep.fitted_patients == pids and prep.out_dim == 3


def test_pca_components_are_capped_by_training_rows():
    X = _data(n=5, d=10)
    assert VectorPreprocessor(n_components=8).fit(X, list("abcde")).out_dim == 4


def test_preprocessors_round_trip_through_json_and_safetensors(tmp_path):
    X = _data()
    bags = [np.random.default_rng(i).normal(size=(400 if i == 0 else 7, 6)).astype(np.float16) for i in range(5)]
    preps = {"genes": VectorPreprocessor(2).fit(X, [str(i) for i in range(len(X))]),
             "wsi": InstanceScaler(max_per_bag=50).fit(bags + [None], list("abcdef"))}
    assert preps["wsi"].fitted_patients == list("abcde")  # the patient without a bag contributed nothing
    save_preprocessors(tmp_path, preps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocess.json", "preprocess.safetensors"]
    back = load_preprocessors(tmp_path)
    np.testing.assert_array_equal(back["genes"].transform(X), preps["genes"].transform(X))
    np.testing.assert_array_equal(back["wsi"].mean_, preps["wsi"].mean_)
    np.testing.assert_array_equal(back["wsi"].scale_, preps["wsi"].scale_)


def test_instance_scaler_matches_standard_scaler_on_small_bags():
    bags = [np.random.default_rng(i).normal(loc=i, size=(9, 4)) for i in range(4)]
    s = InstanceScaler(max_per_bag=100).fit(bags, list("abcd"))
    ref = StandardScaler().fit(np.concatenate(bags))
    np.testing.assert_allclose(s.mean_, ref.mean_, rtol=1e-5)
    np.testing.assert_allclose(s.scale_, ref.scale_, rtol=1e-5)
