"""Metric values against scikit-learn / lifelines / scikit-survival on fixed inputs; the bootstrap summary."""
from __future__ import annotations

import json

import numpy as np
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    roc_auc_score,
)
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from mmcli.heads.metrics import (
    CLASSIFICATION_METRICS,
    FoldPredictions,
    classification_metrics,
    eval_times,
    summarise,
    survival_metrics,
)

Y_BIN = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
P_POS = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.55, 0.7, 0.3])


def test_binary_metrics_match_sklearn_and_hand_checked_values():
    m = classification_metrics(Y_BIN, np.stack([1 - P_POS, P_POS], 1))
    assert list(m) == list(CLASSIFICATION_METRICS)
    assert m["auroc"] == pytest.approx(roc_auc_score(Y_BIN, P_POS))
    assert m["auroc"] == pytest.approx(23 / 25)  # 2 of the 25 positive/negative pairs are mis-ordered
    assert m["auprc"] == pytest.approx(average_precision_score(Y_BIN, P_POS))
    pred = (P_POS > 0.5).astype(int)
    assert m["f1_macro"] == pytest.approx(f1_score(Y_BIN, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_BIN, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(Y_BIN, P_POS))
    assert m["brier"] == pytest.approx(np.mean((P_POS - Y_BIN) ** 2))


def test_multiclass_metrics_are_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 2], 8)
    p = rng.dirichlet(np.ones(3), size=len(y)) + np.eye(3)[y] * 0.3
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p)
    onehot = np.eye(3)[y]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["auprc"] == pytest.approx(np.mean([average_precision_score(onehot[:, k], p[:, k]) for k in range(3)]))
    assert m["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    # Stated convention: mean of the one-vs-rest Brier scores (= sum over classes / K).
    assert m["brier"] == pytest.approx(np.mean([brier_score_loss(onehot[:, k], p[:, k]) for k in range(3)]))
    assert m["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)) / 3)


def test_undefined_metric_is_nan_not_an_exception():
    m = classification_metrics(np.zeros(4, int), np.tile([0.7, 0.3], (4, 1)))
    assert np.isnan(m["auroc"]) and np.isfinite(m["brier"])


@pytest.fixture
def surv_data():
    rng = np.random.default_rng(1)
    n = 80
    risk = rng.normal(size=n)
    t = rng.exponential(20 / np.exp(risk))
    c = rng.uniform(5, 40, size=n)
    time, event = np.minimum(t, c), (t <= c).astype(int)
    return time[:50], event[:50], time[50:], event[50:], risk[50:]


def test_survival_metrics_match_lifelines_and_sksurv(surv_data):
    tr_t, tr_e, t, e, r = surv_data
    times = eval_times(tr_t, tr_e, t)
    assert len(times) >= 2 and times.min() > t.min() and times.max() < min(t.max(), tr_t.max())
    surv = np.exp(-np.outer(np.exp(r), times / 20))
    m = survival_metrics(t, e, r, train_time=tr_t, train_event=tr_e, surv=surv, times=times)
    # Harrell: lifelines scores "higher = longer survival", so risk enters with a minus sign.
    assert m["c_index"] == pytest.approx(concordance_index(t, -r, e))
    assert m["c_index"] > 0.6
    y_tr, y_te = Surv.from_arrays(tr_e.astype(bool), tr_t), Surv.from_arrays(e.astype(bool), t)
    assert m["c_index_uno"] == pytest.approx(concordance_index_ipcw(y_tr, y_te, r, tau=times[-1])[0])
    assert m["td_auc"] == pytest.approx(cumulative_dynamic_auc(y_tr, y_te, r, times)[1])
    assert m["ibs"] == pytest.approx(integrated_brier_score(y_tr, y_te, surv, times))
    flipped = survival_metrics(t, e, -r)
    assert flipped["c_index"] == pytest.approx(1 - m["c_index"], abs=0.02)


def test_summarise_reports_fold_mean_bootstrap_ci_and_per_fold():
    rng = np.random.default_rng(2)
    folds = []
    for _ in range(4):
        y = rng.integers(0, 2, 30)
        p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 30), 0.01, 0.99)
        folds.append(FoldPredictions(y=y, probs=np.stack([1 - p, p], 1)))
    s = summarise(folds, n_boot=60, seed=0)
    assert s == summarise(folds, n_boot=60, seed=0)  # seeded
    for name, d in s.items():
        per_fold = [f.metrics()[name] for f in folds]
        assert d["per_fold"] == pytest.approx(per_fold)
        assert d["mean"] == pytest.approx(np.mean(per_fold))
        assert d["ci_low"] < d["mean"] < d["ci_high"], name
    assert s["auroc"]["ci_high"] - s["auroc"]["ci_low"] < 0.3
    json.dumps(s, allow_nan=False)


def test_summarise_turns_undefined_values_into_null():
    folds = [FoldPredictions(y=np.zeros(5, int), probs=np.tile([0.6, 0.4], (5, 1))),
             FoldPredictions(y=np.zeros(5, int), probs=np.tile([0.6, 0.4], (5, 1)))]
    s = summarise(folds, n_boot=10)
    assert s["auroc"] == {"mean": None, "ci_low": None, "ci_high": None, "per_fold": [None, None]}
    json.dumps(s, allow_nan=False)
