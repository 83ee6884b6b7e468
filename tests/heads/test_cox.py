"""The cox head: a small table enters whole (no PCA, its columns named), wide modalities are reduced by PCA, and
the coefficients are lifelines' on the standardised columns (issue 24 item 8)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from mmcli.heads import create_head, load_head
from mmcli.heads.data import Cohort, ModalityData, ModalitySpec
from mmcli.heads.targets import build_target


def _survival(n: int, d: int, seed: int = 0) -> tuple[Cohort, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(0, 5, d)
    risk = X[:, 0] / X[:, 0].std() - 0.5 * X[:, 1] / X[:, 1].std()
    t_event, t_cens = rng.exponential(20 * np.exp(-risk)), rng.uniform(5, 60, n)
    pids = [f"P{i:03d}" for i in range(n)]
    labels = pd.DataFrame({"time": np.minimum(t_event, t_cens).round(3) + 0.01,
                           "event": (t_event <= t_cens).astype(int)}, index=pd.Index(pids, name="patient_id"))
    spec = ModalitySpec("clin", "vector", "table", None, d, tuple(f"c{i}" for i in range(d)))
    cohort = Cohort(pids, {"clin": ModalityData(spec, present=np.ones(n, bool), vectors=X.astype(np.float32))},
                    "test")
    return cohort, build_target(labels, time="time", event="event").y, X


def test_a_ten_column_table_enters_whole_with_lifelines_coefficients(tmp_path):
    cohort, y, X = _survival(200, 10)
    head = create_head("cox", task="survival", n_classes=0).fit(cohort, y)  # n_components = 8 < 10 <= 16
    assert head.preprocessors_["clin"].components_ is None
    assert head.covariates_ == [f"clin:c{i}" for i in range(10)]
    Xf = X.astype(np.float32).astype(np.float64)
    Z = (Xf - Xf.mean(0)) / Xf.std(0)
    df = pd.DataFrame(Z, columns=head.covariates_).assign(T=y["time"], E=y["event"].astype(int))
    ref = CoxPHFitter(penalizer=0.1).fit(df, "T", "E").params_.to_numpy()
    np.testing.assert_allclose(head.coef_, ref, rtol=1e-5, atol=1e-7)
    again = load_head(head.save(tmp_path / "m"))
    np.testing.assert_allclose(again.predict(cohort), head.predict(cohort), atol=1e-12)


@pytest.mark.parametrize("d,n_components,k", [(17, 8, 8), (40, 8, 8), (12, 4, 4), (8, 4, 8)])
def test_pca_only_above_twice_n_components(d, n_components, k):
    cohort, y, _ = _survival(120, d, seed=1)
    head = create_head("cox", task="survival", n_classes=0, n_components=n_components).fit(cohort, y)
    assert len(head.covariates_) == k
    pca = d > 2 * n_components
    assert (head.preprocessors_["clin"].components_ is not None) == pca
    assert all(("_pc" in c) == pca for c in head.covariates_)
