"""The MIL heads (clam_sb, clam_mb, dsmil, transmil) as heads: the auxiliary losses reach training, predictions
do not depend on the batch, DP-SGD refuses what it cannot account for, fit -> predict --attention end to end, and
the issue's done-when on MNIST-bags (real handwritten digits) at a seconds scale.

The networks themselves are checked against their reference code in ``test_mil_reference.py``; the behaviour
every head shares (planted signal, chance on shuffled labels, survival, save/load, attention on planted key
tiles) in ``test_heads.py``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.planted_data import assert_attention_per_tile, make_store
from mmcli.heads import create_head
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.nn.torch_base import torch_env
from mmcli.heads.targets import build_target
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit
from mmcli.stages.predict import predict

NEW = ("clam_sb", "clam_mb", "dsmil", "transmil")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mil_heads.py"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    p = make_store(tmp_path_factory.mktemp("mil") / "s.zarr", n=40, task="multiclass", seed=11, modalities=("wsi",))
    fs = open_store(p.store, "r")
    cohort = load_cohort(fs, resolve_sources(fs, ["wsi"]), list(p.labels.index))
    return p, cohort, build_target(p.labels, target="label")


def _changed(head, part: str) -> bool:
    """Whether the fitted ``head``'s sub-network ``part`` moved from its initial weights (rebuilt with its seed)."""
    with torch_env(head.seed, 1):
        init = head._build()
    before, after = init.get_submodule(part).state_dict(), head.module_.get_submodule(part).state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("head, part, on, off", [
    ("clam_sb", "instance_classifiers", {"bag_weight": 0.7}, {"bag_weight": 1.0}),
    ("clam_mb", "instance_classifiers", {"bag_weight": 0.5, "subtyping": True}, {"bag_weight": 1.0}),
    ("dsmil", "i_classifier", {"max_weight": 0.5}, {"max_weight": 0.0}),
])
def test_auxiliary_losses_train_what_only_they_reach(planted, head, part, on, off):
    """CLAM's instance classifiers learn only from the clustering loss and DSMIL's instance classifier only from
    the max-instance stream's loss (its argmax has no gradient): both move iff the loss is on."""
    _, cohort, target = planted
    kw = {"task": "classification", "n_classes": 3, "epochs": 2, "k_sample": 2} if head != "dsmil" else \
        {"task": "classification", "n_classes": 3, "epochs": 2}
    assert _changed(create_head(head, **kw, **on).fit(cohort, target.y), part)
    assert not _changed(create_head(head, **kw, **off).fit(cohort, target.y), part)
    assert _changed(create_head(head, **kw, **off).fit(cohort, target.y), "attention_a" if "clam" in head else "q")


@pytest.mark.parametrize("head", NEW)
def test_a_patients_prediction_and_attention_do_not_depend_on_its_batch(planted, head):
    _, cohort, target = planted
    h = create_head(head, task="classification", n_classes=3, epochs=2, batch_size=8).fit(cohort, target.y)
    together, att = h.predict(cohort), h.attention(cohort)["wsi"]
    order = np.random.default_rng(0).permutation(len(cohort))
    h.batch_size = 5  # other batches, other padding
    shuffled, att2 = h.predict(cohort.subset(order)), h.attention(cohort.subset(order))["wsi"]
    np.testing.assert_allclose(shuffled, together[order], rtol=1e-5, atol=1e-6)
    for j, i in enumerate(order):
        np.testing.assert_allclose(att2[j], att[i], rtol=1e-5, atol=1e-6)
        assert att[i].min() >= 0 and abs(att[i].sum() - 1) < 1e-5
        assert len(att[i]) == sum(n for _, n in cohort.modalities["wsi"].items[i])


@pytest.mark.parametrize("head", ["clam_sb", "dsmil", "transmil"])
def test_dp_sgd_refuses_what_it_cannot_account_for(planted, head):
    _, cohort, target = planted
    msg = "auxiliary loss" if head != "transmil" else "DP-SGD .*cannot train this network"
    with pytest.raises(InputError, match=msg):
        create_head(head, task="classification", n_classes=3, epochs=1, dp_epsilon=5.0).fit(cohort, target.y)


@pytest.mark.parametrize("head", ["clam_sb", "clam_mb", "dsmil", pytest.param("transmil", marks=pytest.mark.slow)])
def test_fit_writes_attention_and_predict_exports_it_per_tile(tmp_path, head):
    p = make_store(tmp_path / "s.zarr", n=30, task="binary", seed=21, modalities=("wsi",))
    fit(head, p.store, p.labels, tmp_path / "run", target="label", folds=3, n_boot=5,
        params={"epochs": 8 if head == "transmil" else 20}, explain="full")
    oof = pd.read_csv(tmp_path / "run" / "attention.csv")
    assert set(oof["patient_id"]) == set(p.labels.index)
    assert not (tmp_path / "run" / "attributions.csv").exists()  # a bag-level IG sum restates output - baseline
    ig = pd.read_csv(tmp_path / "run" / "attributions_tiles.csv")  # per-tile IG through the same network call
    assert set(ig["patient_id"]) == set(p.labels.index) and np.isfinite(ig["attribution"]).all()
    per = ig.groupby("patient_id").agg(a=("attribution", "sum"), o=("output", "first"), b=("baseline_output", "first"))
    err = (per.a - (per.o - per.b)).abs()
    if head == "dsmil":  # the critical instance is an argmax: the path can jump where it switches, so completeness
        assert (err < 5e-2).mean() >= 0.9  # holds bag by bag only where it does not
    else:
        assert err.max() < 5e-2  # completeness, per bag
    predict(tmp_path / "run", p.store, tmp_path / "pred.csv", attention=True)
    assert_attention_per_tile(tmp_path / "pred.attention.csv", p.store, tol=1e-5)


# ---- issue 26's done-when on MNIST-bags, small ---------------------------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("bench_mil_heads", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digit_bags_follow_the_mnist_bags_protocol():
    bench = _bench()
    bags, y, keys = bench.digit_bags(150, seed=0)
    lengths = np.array([len(b) for b in bags])
    assert 9.0 < lengths.mean() < 10.5 and 1.2 < lengths.std() < 2.8 and lengths.min() >= 1  # int(N(10, 2))
    assert all(b.shape[1] == 64 for b in bags) and all(len(k) == len(b) for k, b in zip(keys, bags))
    assert (y == np.array([k.any() for k in keys])).all() and 0.45 < y.mean() < 0.8  # ~1 - 0.9^10
    from sklearn.datasets import load_digits

    pool = {d.tobytes() for d in load_digits().data.astype(np.float32)}
    rows = np.concatenate(bags)
    assert all(r.tobytes() in pool for r in rows)  # real digits ...
    assert len({r.tobytes() for r in rows}) >= 0.98 * len(rows)  # ... each used once (a few images are duplicates)
    with pytest.raises(ValueError, match="fewer bags"):
        bench.digit_bags(400, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["clam_sb", "clam_mb", "dsmil"])
def test_mil_heads_find_the_nines_in_mnist_bags(tmp_path, head):
    """Issue 26's done-when, smaller: AUROC >= 0.90 and a '9' on top of the attention in >= 70 % of the positive
    bags called positive, out of fold, in 3-fold patient-level CV of 150 bags (the benchmark: 5 folds, 2 seeds).
    transmil is not here: it sits at AUROC ~0.89 on this protocol (benchmarks/bench_mil_heads.py, docs) and one
    run costs minutes."""
    res = _bench().mnist_bags_cv((head,), n_bags=150, folds=3, seed=0, workdir=tmp_path, log=lambda _: None,
                                 params={head: {"epochs": 100}})[head]
    assert res["auroc_fold_mean"] >= 0.90, res
    assert res["key_top_rate"] >= 0.70 and res["positives_called"] >= 60, res
