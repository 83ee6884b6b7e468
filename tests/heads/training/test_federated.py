"""Federated training's site side without Flower (these run in CI, where the optional extra is not installed):
per-site preprocessing fit on the site's training patients only, :class:`SiteTrainer` (what Flower's client
delegates to) with its FedAvg weight, the FedProx proximal term, and the survival (Cox) local objective.

Flower's aggregation (FedAvg / FedProx ``aggregate_fit``), mmcli's recording strategy, the round loop and the
Ray simulation need Flower: tests/stages/test_federate.py covers them where ``mmcli[federated]`` is installed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.federated import site_store, survival_site_store
from mmcli.heads.models.fusion_mlp import FusionMLPHead
from mmcli.heads.targets import build_target, read_labels
from mmcli.heads.training.federated import SiteTrainer
from mmcli.pipeline.store import open_store
from mmcli.stages.federate import prepare_sites

FAST = {"batch_size": 16, "lr": 5e-3, "modality_dropout": 0.0, "n_components": None}


SPECS = [("a", 60, 1, 0.0), ("b", 50, 2, 0.5), ("c", 40, 3, -0.5)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Three classification and three survival site stores, written once (store writes dominate the time)."""
    out = {}
    for kind, make in (("classification", site_store), ("survival", survival_site_store)):
        d = tmp_path_factory.mktemp(kind)
        frames = [make(d / f"site_{s}.zarr", s, n, seed, off) for s, n, seed, off in SPECS]
        out[kind] = ([d / f"site_{s}.zarr" for s, *_ in SPECS], read_labels(pd.concat(frames)))
    return out


def _sites(stores, kind: str, n_sites: int = 2):
    paths, labels = stores[kind]
    tgt = (build_target(labels, target="label") if kind == "classification"
           else build_target(labels, time="os_months", event="os_event"))
    hp = FusionMLPHead.user_params(FAST).for_run(task=tgt.task, n_classes=tgt.n_classes, seed=0)
    return prepare_sites(FusionMLPHead, paths[:n_sites], tgt, None, 0.3, 0, "fusion_mlp", hp), paths[:n_sites]


def test_preprocessing_is_fit_per_site_on_its_training_patients(stores):
    sites, paths = _sites(stores, "classification")
    for s, path in zip(sites, paths):
        genes = open_store(path, "r").read_table("genes")
        m = s.model()
        assert set(m.X.patients) == set(s.train) and not set(s.train) & set(s.test)
        np.testing.assert_allclose(m.head.preprocessors_["genes"].mean_, genes.loc[s.train].mean().to_numpy(),
                                   atol=1e-6)
        assert not np.allclose(m.head.preprocessors_["genes"].mean_, genes.mean().to_numpy(), atol=1e-6)
    a, b = sites[0].model(), sites[1].model()
    assert (b.head.preprocessors_["genes"].mean_ - a.head.preprocessors_["genes"].mean_).mean() > 0.25  # offset
    for wa, wb in zip(a.get_weights(), b.get_weights()):  # every site starts from the same network
        assert np.array_equal(wa, wb)


def test_site_trainer_fit_returns_trained_weights_and_training_size(stores):
    sites, _ = _sites(stores, "classification")
    s = sites[0]
    start = s.model().get_weights()
    cfg = {"server_round": 1, "local_epochs": 3}
    t1, t2 = SiteTrainer(s.model(), 1), SiteTrainer(s.model(), 1)
    w1, n, metrics = t1.fit(start, cfg)
    w2, _, _ = t2.fit(start, cfg)
    assert n == len(s.train) and metrics == {"site": s.index}  # FedAvg weighs the site by n
    assert [w.shape for w in w1] == [w.shape for w in start]
    assert any(not np.array_equal(a, b) for a, b in zip(w1, start))
    for a, b in zip(w1, w2):  # the same round at the same site: the same local training
        assert np.array_equal(a, b)
    w3, _, _ = t2.fit(start, {**cfg, "server_round": 2})  # another round draws other batches
    assert any(not np.array_equal(a, b) for a, b in zip(w1, w3))
    assert t1.evaluate(w1, {})[0] < t1.evaluate(start, {})[0]  # local training lowers the site's loss


def test_fedprox_term_keeps_local_weights_near_the_global_ones(stores):
    sites, _ = _sites(stores, "classification")
    start = sites[1].model().get_weights()

    def drift(mu: float) -> float:
        w, _, _ = SiteTrainer(sites[1].model(), 4).fit(start, {"server_round": 1, "proximal_mu": mu})
        return float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(w, start))))

    free, prox = drift(0.0), drift(5.0)
    assert prox < 0.8 * free, (prox, free)


def test_survival_site_trains_on_its_cox_partial_likelihood(stores):
    sites, _ = _sites(stores, "survival")
    s = sites[0]
    assert s.params.task == "survival" and s.y_train["event"].sum() >= 2 and s.y_test["event"].sum() >= 1
    trainer = SiteTrainer(s.model(), 6)
    start = trainer.get_parameters({})
    before = trainer.evaluate(start, {})[0]
    w, n, _ = trainer.fit(start, {"server_round": 1})
    after = trainer.evaluate(w, {})[0]
    assert n == len(s.train) and after < before - 0.05, (before, after)
    from lifelines.utils import concordance_index

    risk = trainer.model.predict(trainer.model.X)
    assert risk.shape == (len(s.train),)
    assert concordance_index(s.y_train["time"], -risk, s.y_train["event"]) > 0.65  # risk follows the hazard


@pytest.mark.parametrize("kind", ["classification", "survival"])
def test_site_needs_both_outcomes_to_split(tmp_path, kind):
    from mmcli.pipeline.errors import InputError

    make = site_store if kind == "classification" else survival_site_store
    df = make(tmp_path / "site_a.zarr", "a", 12, 1)
    df2 = make(tmp_path / "site_b.zarr", "b", 40, 2)
    col = "label" if kind == "classification" else "os_event"
    df[col] = "neg" if kind == "classification" else 0
    if kind == "classification":
        df.loc[0, col] = "pos"  # one positive: cannot be on both sides of the split
    else:
        df.loc[0, col] = 1
    labels = read_labels(pd.concat([df, df2]))
    tgt = (build_target(labels, target="label") if kind == "classification"
           else build_target(labels, time="os_months", event="os_event"))
    hp = FusionMLPHead.user_params(FAST).for_run(task=tgt.task, n_classes=tgt.n_classes, seed=0)
    with pytest.raises(InputError, match="site_a.zarr"):
        prepare_sites(FusionMLPHead, [tmp_path / "site_a.zarr", tmp_path / "site_b.zarr"], tgt, None, 0.3, 0,
                      "fusion_mlp", hp)
