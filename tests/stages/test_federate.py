"""``federate``: Flower FedAvg / FedProx over 2 and 3 planted site stores; metrics per site and pooled, the
federated AUROC within the CI of centralised training, per-site models loadable, bad input exits 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.heads.base import load_head
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.federate import federate

pytest.importorskip("flwr")  # the optional extra mmcli[federated]
pytestmark = pytest.mark.slow  # Flower simulations: minutes each on 2 cores

FAST = {"batch_size": 16, "lr": 5e-3, "modality_dropout": 0.0}


def site_store(path: Path, site: str, n: int, seed: int, offset: float = 0.0, shift: float = 1.5) -> pd.DataFrame:
    """A site with a planted class signal (``mri`` vector, ``genes`` table, small ``wsi`` bags); ``offset``
    shifts every feature of the site (a scanner / batch effect the per-site standardisation removes)."""
    rng = np.random.default_rng(seed)
    ids = [f"{site}-{i:03d}" for i in range(n)]
    y = rng.permutation(np.arange(n) % 2)
    fs = open_store(path, "a")
    genes = rng.normal(size=(n, 6)) + offset
    genes[:, :2] += shift * y[:, None]
    for i, pid in enumerate(ids):
        v = rng.normal(size=(1, 6)).astype(np.float32) + offset
        v[0, :2] += shift * y[i]
        fs.write_item("mri", "enc-mri", pid, "T1", v)
        t = rng.normal(size=(5, 4)).astype(np.float32) + offset
        t[:2, :2] += shift * y[i]
        fs.write_item("wsi", "enc-wsi", pid, "s0", t.astype(np.float16),
                      np.stack([np.arange(5) * 224, np.zeros(5)], 1).astype(np.int64))
    fs.write_table("genes", pd.DataFrame(genes, index=pd.Index(ids, name="patient_id"),
                                         columns=[f"g{j}" for j in range(6)]))
    return pd.DataFrame({"patient_id": ids, "label": np.where(y == 1, "pos", "neg")})


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    frames = [site_store(d / f"site_{s}.zarr", s, n, seed, off)
              for s, n, seed, off in (("a", 60, 1, 0.0), ("b", 50, 2, 0.5), ("c", 40, 3, -0.5))]
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
