"""Heads on planted stores: learn the signal, chance on shuffled labels, attention, missing modalities, reload."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from helpers.planted_data import make_store, shuffled
from mmcli.heads import create_head, list_heads, load_head
from mmcli.heads.data import Cohort, load_cohort, resolve_sources
from mmcli.heads.evaluation.metrics import survival_metrics
from mmcli.heads.nn.fusion import FUSIONS
from mmcli.heads.targets import build_target
from mmcli.heads.training.cv import cross_validate
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store

FAST = {"attention_mil": {"epochs": 15}, "fusion_mlp": {"epochs": 40}, "xgboost": {"n_estimators": 60}, "cox": {},
        "clam_sb": {"epochs": 15}, "clam_mb": {"epochs": 15}, "dsmil": {"epochs": 15}, "transmil": {"epochs": 10}}
BAG_HEADS = ("attention_mil", "clam_sb", "clam_mb", "dsmil", "transmil")
SLOW = pytest.mark.slow


def _cohort(planted, names=None):
    fs = open_store(planted.store, "r")
    return load_cohort(fs, resolve_sources(fs, names), list(planted.labels.index))


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("bin") / "s.zarr", n=60, task="binary", seed=1)


@pytest.fixture(scope="module")
def survival(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("surv") / "s.zarr", n=90, task="survival", seed=2, key_frac=0.3)


def _oof_auroc(head, cohort, target):
    res = cross_validate(head, cohort, target, folds=3, seed=0, params=FAST[head], explain=False)
    y = np.concatenate([target.y[r.test_idx] for r in res])
    p = np.concatenate([r.pred[:, 1] for r in res])
    return roc_auc_score(y, p)


def test_registry_lists_heads_and_refuses_unknown_names_and_params():
    assert list_heads() == ["attention_mil", "clam_mb", "clam_sb", "cox", "dsmil", "fusion_mlp", "transmil",
                            "xgboost"]
    with pytest.raises(InputError, match="unknown head 'nope'"):
        create_head("nope")
    with pytest.raises(InputError, match="no parameter.*'hiden'"):
        create_head("fusion_mlp", hiden=3)
    assert create_head("fusion_mlp", fusion="bilinear").get_params()["fusion"] == "bilinear"


@pytest.mark.parametrize("head", ["attention_mil", "fusion_mlp", "xgboost", "clam_sb", "clam_mb", "dsmil",
                                  pytest.param("transmil", marks=SLOW)])
def test_classification_heads_learn_planted_signal_and_sit_at_chance_on_shuffled_labels(binary, head):
    names = ["wsi"] if head in BAG_HEADS else None
    cohort = _cohort(binary, names)
    real = build_target(binary.labels, target="label")
    noise = build_target(shuffled(binary.labels), target="label")
    assert _oof_auroc(head, cohort, real) > 0.85
    assert 0.2 < _oof_auroc(head, cohort, noise) < 0.8


@pytest.mark.parametrize("head", ["cox", "xgboost", "fusion_mlp", "attention_mil", "clam_sb", "clam_mb", "dsmil",
                                  pytest.param("transmil", marks=SLOW)])
def test_survival_heads_rank_planted_risk_and_not_shuffled_times(survival, head):
    names = ["wsi"] if head in BAG_HEADS else None
    cohort = _cohort(survival, names)

    def c_index(labels):
        t = build_target(labels, time="time", event="event")
        res = cross_validate(head, cohort, t, folds=3, seed=0, params=FAST[head], explain=False)
        per_fold = []
        for r in res:
            y = t.y[r.test_idx]
            assert np.isfinite(r.pred).all() and r.eval.surv is not None
            assert ((r.eval.surv >= 0) & (r.eval.surv <= 1)).all()
            per_fold.append(survival_metrics(y["time"], y["event"], r.pred)["c_index"])
        return float(np.mean(per_fold))

    assert c_index(survival.labels) > 0.62
    assert 0.35 < c_index(shuffled(survival.labels)) < 0.65


@pytest.mark.parametrize("head", ["attention_mil", "clam_sb", "clam_mb", "dsmil", pytest.param("transmil", marks=SLOW)])
def test_attention_concentrates_on_planted_key_instances(binary, head):
    cohort = _cohort(binary, ["wsi"])
    target = build_target(binary.labels, target="label")
    epochs = 60 if head == "clam_mb" else 30  # one branch per class: each learns from fewer gradient steps
    head = create_head(head, task="binary", n_classes=2, epochs=epochs).fit(cohort, target.y)
    att = head.attention(cohort)["wsi"]
    items = cohort.modalities["wsi"].items
    mass, frac = [], []
    for pid, a, its in zip(cohort.patients, att, items):
        if pid not in binary.key:
            continue
        keys = binary.key[pid]
        flags = np.array([(iid, j) in keys for iid, n in its for j in range(n)])
        assert a.shape == flags.shape and abs(a.sum() - 1) < 1e-6
        mass.append(a[flags].sum())
        frac.append(flags.mean())
    assert np.mean(frac) < 0.2  # key instances are a small minority of each positive bag ...
    assert np.mean(mass) > 0.6  # ... but take most of the attention


@pytest.mark.parametrize("fusion", FUSIONS.names())  # the fusion registry
def test_every_fusion_operator_predicts_patients_missing_modalities(tmp_path, fusion):
    planted = make_store(tmp_path / "s.zarr", n=48, task="binary", seed=3, mri_missing=0.4, wsi_missing=0.25)
    cohort = _cohort(planted)
    pres = cohort.presence()
    assert (~pres).any(axis=0)[:2].all()  # some patients lack wsi, some lack mri
    target = build_target(planted.labels, target="label")
    head = create_head("fusion_mlp", task="binary", n_classes=2, fusion=fusion, epochs=25).fit(cohort, target.y)
    p = head.predict(cohort)
    assert p.shape == (48, 2) and np.isfinite(p).all() and np.allclose(p.sum(1), 1)
    assert roc_auc_score(target.y, p[:, 1]) > 0.8
    sub = cohort.subset(np.flatnonzero(~pres[:, 0]))  # patients without any slide still get a prediction
    assert np.isfinite(head.predict(sub)).all()
    w = head.modality_weights(cohort)
    assert set(w) == {"wsi", "mri", "genes"} and abs(sum(w.values()) - 1) < 1e-6
    assert all(v >= 0 for v in w.values())


@pytest.mark.parametrize("head,task", [("attention_mil", "binary"), ("fusion_mlp", "multiclass"),
                                       ("xgboost", "multiclass"), ("xgboost", "survival"), ("cox", "survival"),
                                       ("fusion_mlp", "survival"), ("clam_sb", "multiclass"), ("clam_mb", "survival"),
                                       ("clam_mb", "multiclass"), ("dsmil", "binary"), ("dsmil", "survival"),
                                       ("transmil", "multiclass"), ("transmil", "survival")])
def test_saved_head_reloads_with_identical_predictions(tmp_path, head, task):
    planted = make_store(tmp_path / "s.zarr", n=36, task=task, seed=4)
    cohort = _cohort(planted, ["wsi"] if head in BAG_HEADS else None)
    kw = {"time": "time", "event": "event"} if task == "survival" else {"target": "label"}
    target = build_target(planted.labels, **kw)
    h = create_head(head, task=target.task, n_classes=target.n_classes, **FAST[head]).fit(cohort, target.y)
    h.save(tmp_path / "model")
    files = {f.name for f in (tmp_path / "model").iterdir()}
    assert "config.json" in files and not any(f.endswith((".pkl", ".pickle", ".pt")) for f in files)
    h2 = load_head(tmp_path / "model")
    np.testing.assert_array_equal(h.predict(cohort), h2.predict(cohort))
    if task == "survival":
        times = np.array([5.0, 10.0, 20.0])
        np.testing.assert_array_equal(h.predict_survival(cohort, times), h2.predict_survival(cohort, times))
    if head in BAG_HEADS:
        for a, b in zip(h.attention(cohort)["wsi"], h2.attention(cohort)["wsi"]):
            np.testing.assert_array_equal(a, b)


def test_same_seed_same_model_and_other_seed_differs(binary):
    cohort = _cohort(binary)
    target = build_target(binary.labels, target="label")
    runs = [create_head("fusion_mlp", task="binary", n_classes=2, epochs=5, seed=s).fit(cohort, target.y)
            .predict(cohort) for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_head_refuses_unsuitable_inputs(binary):
    cohort = _cohort(binary)
    target = build_target(binary.labels, target="label")
    for head in BAG_HEADS:
        with pytest.raises(InputError, match=f"{head} works on exactly one bag modality"):
            create_head(head).fit(cohort, target.y)
    with pytest.raises(InputError, match="survival"):
        create_head("cox", task="binary", n_classes=2).fit(cohort, target.y)
    with pytest.raises(InputError, match="unknown fusion"):
        create_head("fusion_mlp", fusion="sum").fit(cohort, target.y)
    h = create_head("xgboost", n_estimators=5).fit(_only(cohort, "genes", "mri"), target.y)
    with pytest.raises(InputError, match="needs modality 'genes'"):
        h.predict(_only(cohort, "mri"))


def test_xgboost_shap_contributions_sum_to_margin(binary):
    cohort = _cohort(binary)
    target = build_target(binary.labels, target="label")
    h = create_head("xgboost", task="binary", n_classes=2, n_estimators=30).fit(cohort, target.y)
    c = h.contributions(cohort)
    assert list(c.index) == cohort.patients and c.shape[1] == sum(s.dim for s in cohort.specs())
    p = h.predict(cohort)[:, 1]
    margin = np.log(p / (1 - p))
    bias = margin - c.sum(axis=1).to_numpy()
    np.testing.assert_allclose(bias, bias[0], atol=1e-4)  # contributions + one shared bias = margin


def _only(cohort: Cohort, *names: str) -> Cohort:
    """The same patients with only modalities ``names`` (in that order)."""
    return Cohort(list(cohort.patients), {n: cohort.modalities[n] for n in names}, cohort.features_sha256)
