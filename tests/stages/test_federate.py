"""``federate``: Flower FedAvg / FedProx over 2 and 3 planted site stores (classification and survival);
metrics per site and pooled, the federated AUROC / c-index within the CI of centralised training, per-site
models loadable, bad input exits 2.

Flower is the optional extra ``mmcli[federated]`` (it caps typer, rich, packaging and, from 1.33, fastapi below
the versions mmcli installs), so CI has no Flower: the tests marked ``needs_flwr`` are skipped there and run
where the extra is installed. The rest run everywhere: bad input, the missing-Flower message, and the
Flower-free evaluation (:func:`evaluate_federated`) of global weights on 2 and 3 survival sites."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers.federated import site_store, survival_site_store
from mmcli.cli import app
from mmcli.heads.models.fusion_mlp import FusionMLPHead
from mmcli.heads.registry import load_head
from mmcli.heads.targets import build_target, read_labels
from mmcli.heads.training.federated import SiteTrainer
from mmcli.pipeline.errors import InputError
from mmcli.stages.federate import evaluate_federated, federate, prepare_sites

HAS_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAS_FLWR, reason="Flower is the optional extra mmcli[federated]")

FAST = {"batch_size": 16, "lr": 5e-3, "modality_dropout": 0.0}
SURV = ("os_months", "os_event")


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    frames = [site_store(d / f"site_{s}.zarr", s, n, seed, off)
              for s, n, seed, off in (("a", 60, 1, 0.0), ("b", 50, 2, 0.5), ("c", 40, 3, -0.5))]
    pd.concat(frames).to_csv(d / "labels.csv", index=False)
    return [d / f"site_{s}.zarr" for s in "abc"], d / "labels.csv"


@pytest.fixture(scope="module")
def survival_sites(tmp_path_factory):
    d = tmp_path_factory.mktemp("fedsurv")
    frames = [survival_site_store(d / f"site_{s}.zarr", s, n, seed, off)
              for s, n, seed, off in (("a", 90, 11, 0.0), ("b", 80, 12, 0.5), ("c", 70, 13, -0.5))]
    pd.concat(frames).to_csv(d / "labels.csv", index=False)
    return [d / f"site_{s}.zarr" for s in "abc"], d / "labels.csv"


def _check_doc(doc: dict, out: Path, sites: list[Path]) -> None:
    assert json.loads((out / "metrics.json").read_text()) == doc
    names = [p.name.removesuffix(".zarr") for p in sites]
    assert list(doc["sites"]) == names
    for name in names:
        s = doc["sites"][name]
        assert s["n_train"] > s["n_test"] > 0
        for kind in ("federated", "centralised"):
            auc = s[kind]["auroc"]
            assert auc["ci_low"] <= auc["mean"] <= auc["ci_high"]
    assert doc["pooled"]["n_test"] == sum(doc["sites"][n]["n_test"] for n in names)
    cmp = doc["comparison"]
    assert cmp["federated"] > 0.8, cmp  # the planted signal is learnt
    lo, hi = cmp["centralised_ci"]
    assert lo <= cmp["federated"] <= hi and cmp["federated_within_centralised_ci"] is True, cmp
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == doc["pooled"]["n_test"] and set(pred["site"]) == set(names)
    np.testing.assert_allclose(pred[["prob_neg", "prob_pos"]].sum(1), 1.0, atol=1e-6)


@needs_flwr
@pytest.mark.slow  # Ray start-up and actors: minutes on 2 cores
def test_two_sites_in_flowers_simulation_engine(three_sites, tmp_path):
    sites, labels = three_sites
    out = tmp_path / "fed2"
    doc = federate("fusion_mlp", sites[:2], labels, out, target="label", rounds=4, local_epochs=2, seed=0,
                   params=FAST, n_boot=200, engine="simulation")
    assert doc["engine"] == "simulation" and doc["strategy"] == "fedavg"
    _check_doc(doc, out, sites[:2])
    # each site's model: the global weights with that site's own preprocessing
    a, b = load_head(out / "models" / "site_a"), load_head(out / "models" / "site_b")
    for (ka, va), vb in zip(a.module_.state_dict().items(), b.module_.state_dict().values()):
        assert np.array_equal(va.numpy(), vb.numpy()), ka
    # fit on each site's own training patients: site_b's features sit 0.5 higher
    assert (b.preprocessors_["genes"].mean_ - a.preprocessors_["genes"].mean_).mean() > 0.25


@needs_flwr
@pytest.mark.slow
def test_three_sites_fedprox_in_process_and_cli(three_sites, tmp_path):
    sites, labels = three_sites
    out = tmp_path / "fed3"
    r = CliRunner().invoke(app, [
        "federate", "--head", "fusion_mlp", "--sites", ",".join(map(str, sites)), "--labels", str(labels),
        "--target", "label", "--rounds", "4", "--local-epochs", "2", "--strategy", "fedprox", "--proximal-mu",
        "0.01", "--engine", "local", "--n-boot", "200", "--out", str(out),
        *[a for k, v in FAST.items() for a in ("--param", f"{k}={v}")]])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["strategy"] == "fedprox" and doc["proximal_mu"] == 0.01 and doc["engine"] == "local"
    _check_doc(doc, out, sites)
    assert "per site" in doc["preprocessing"]


def test_bad_federate_input(three_sites, tmp_path):
    sites, labels = three_sites
    with pytest.raises(InputError, match="at least 2 site"):
        federate("fusion_mlp", sites[:1], labels, tmp_path / "o", target="label")
    with pytest.raises(InputError, match="torch head"):
        federate("xgboost", sites, labels, tmp_path / "o", target="label")
    with pytest.raises(InputError, match="n_components"):
        federate("fusion_mlp", sites, labels, tmp_path / "o", target="label", params={"n_components": 4})
    with pytest.raises(InputError, match="strategy"):
        federate("fusion_mlp", sites, labels, tmp_path / "o", target="label", strategy="fedsgd")
    with pytest.raises(InputError, match="also in"):
        federate("fusion_mlp", [sites[0], sites[0]], labels, tmp_path / "o", target="label", engine="local",
                 rounds=1)
    r = CliRunner().invoke(app, ["federate", "--head", "fusion_mlp", "--sites", ",".join(map(str, sites)),
                                 "--labels", str(labels), "--target", "label", "--rounds", "0", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "--rounds" in r.output
    with pytest.raises(InputError, match="not both"):
        federate("fusion_mlp", sites, labels, tmp_path / "o", target="label", time="t", event="e")


def test_without_flower_the_message_names_the_extra(three_sites, tmp_path, monkeypatch):
    sites, labels = three_sites
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr -> ImportError, as where it is not installed
    with pytest.raises(InputError, match=r"mmcli\[federated\]"):
        federate("fusion_mlp", sites[:2], labels, tmp_path / "o", target="label", engine="local", rounds=1)


def _survival_doc_checks(doc: dict, out: Path, names: list[str]) -> None:
    assert doc["task"] == "survival" and doc["comparison"]["metric"] == "c_index"
    assert list(doc["sites"]) == names
    for name in names:
        s = doc["sites"][name]
        for kind in ("federated", "centralised"):
            c = s[kind]["c_index"]
            assert c["ci_low"] <= c["mean"] <= c["ci_high"], (name, kind, c)
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == doc["pooled"]["n_test"] == sum(doc["sites"][n]["n_test"] for n in names)
    assert {"site", "patient_id", "time", "event", "risk", "central_risk"} <= set(pred.columns)
    from lifelines.utils import concordance_index

    c = doc["pooled"]["federated"]["c_index"]["mean"]  # the reported pooled c-index is lifelines' Harrell's c
    assert c == pytest.approx(concordance_index(pred["time"], -pred["risk"], pred["event"]), abs=1e-9)
    for name in names:  # each site's saved model (global weights, the site's preprocessing and baseline)
        model = load_head(out / "models" / name)
        assert model.is_survival and model.baseline_.times is not None
    assert doc["comparison"]["centralised"] > 0.6  # the planted hazard is learnt


@pytest.mark.slow
@pytest.mark.parametrize("n_sites", [2, 3])
def test_survival_evaluation_of_global_weights_without_flower(survival_sites, tmp_path, n_sites):
    """The Flower-free half of ``federate`` on survival sites: site splits, per-site preprocessing and
    baseline, per-site / pooled c-index with CIs, the centralised comparison and the output files. The global
    weights here are one site's locally trained ones (aggregating them is Flower's part)."""
    paths, labels = survival_sites
    tgt = build_target(read_labels(labels), time=SURV[0], event=SURV[1])
    hp = FusionMLPHead.user_params({**FAST, "n_components": None}).for_run(task="survival", n_classes=0, seed=0)
    sites = prepare_sites(FusionMLPHead, paths[:n_sites], tgt, None, 0.3, 0, "fusion_mlp", hp)
    trainer = SiteTrainer(sites[0].model(), 8)
    weights, _, _ = trainer.fit(trainer.get_parameters({}), {"server_round": 1})
    out = tmp_path / "eval"
    doc = evaluate_federated(sites, weights, out, epochs=8, n_boot=200, meta={"head": "fusion_mlp"})
    names = [p.name.removesuffix(".zarr") for p in paths[:n_sites]]
    _survival_doc_checks(doc, out, names)
    saved = load_head(out / "models" / names[-1])  # the site's model predicts what predictions.csv holds
    pred = pd.read_csv(out / "predictions.csv").query("site == @names[-1]")
    np.testing.assert_allclose(saved.predict(sites[-1].cohort(sites[-1].test)), pred["risk"], atol=1e-6)


@needs_flwr
@pytest.mark.slow
@pytest.mark.parametrize(("n_sites", "strategy"), [(2, "fedavg"), (3, "fedprox")])
def test_federated_survival_within_centralised_ci(survival_sites, tmp_path, n_sites, strategy):
    paths, labels = survival_sites
    out = tmp_path / f"surv{n_sites}"
    r = CliRunner().invoke(app, [
        "federate", "--head", "fusion_mlp", "--sites", ",".join(map(str, paths[:n_sites])), "--labels", str(labels),
        "--time", SURV[0], "--event", SURV[1], "--rounds", "4", "--local-epochs", "2", "--strategy", strategy,
        "--engine", "local", "--n-boot", "200", "--out", str(out),
        *[a for k, v in FAST.items() for a in ("--param", f"{k}={v}")]])
    assert r.exit_code == 0, r.output
    assert "c_index federated" in r.output
    doc = json.loads((out / "metrics.json").read_text())
    _survival_doc_checks(doc, out, [p.name.removesuffix(".zarr") for p in paths[:n_sites]])
    cmp = doc["comparison"]
    assert cmp["federated"] > 0.6 and cmp["federated_within_centralised_ci"] is True, cmp


@needs_flwr
def test_flower_fedavg_is_the_training_size_weighted_mean_of_site_updates(survival_sites):
    """What the strategy does with SiteTrainer's (weights, n): Flower's FedAvg gives n-weighted means."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from mmcli.heads.training.federated import make_strategy

    paths, labels = survival_sites
    tgt = build_target(read_labels(labels), time=SURV[0], event=SURV[1])
    hp = FusionMLPHead.user_params({**FAST, "n_components": None}).for_run(task="survival", n_classes=0, seed=0)
    sites = prepare_sites(FusionMLPHead, paths[:2], tgt, None, 0.3, 0, "fusion_mlp", hp)
    trainers = [SiteTrainer(s.model(), 1) for s in sites]
    start = trainers[0].get_parameters({})
    fits = [t.fit(start, {"server_round": 1}) for t in trainers]
    strat = make_strategy("fedavg", 2, 1, 0.0)
    res = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), n, m)) for w, n, m in fits]
    params, _ = strat.aggregate_fit(1, res, [])
    agg = parameters_to_ndarrays(params)
    n = np.array([f[1] for f in fits], dtype=np.float64)
    for k, w in enumerate(agg):
        want = (n[0] * fits[0][0][k] + n[1] * fits[1][0][k]) / n.sum()
        np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
    assert strat.final_weights is not None and len(strat.final_weights) == len(start)
