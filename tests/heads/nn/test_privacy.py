"""DP-SGD for the torch heads (Opacus): spent epsilon within the budget, recorded in metrics.json and the model
config, training still learns at a loose budget, the unfolded embedding is the same function, bad values exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from helpers.planted_data import make_store
from mmcli.cli import app
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.nn.modules import StandardisedEmbed
from mmcli.heads.nn.privacy import UnfoldedStandardisedEmbed, unfolded
from mmcli.heads.registry import create_head, load_head
from mmcli.heads.targets import build_target
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    p = make_store(d / "s.zarr", n=48, task="binary", seed=11, tiles=(6, 12))
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    return p, d / "labels.csv"


def _cohort(planted, names=None):
    fs = open_store(planted.store, "r")
    return load_cohort(fs, resolve_sources(fs, names), list(planted.labels.index))


@pytest.mark.parametrize("head,names", [("fusion_mlp", None), ("attention_mil", ["wsi"])])
def test_spent_epsilon_within_target_and_saved_with_the_model(binary, tmp_path, head, names):
    p, _ = binary
    cohort, y = _cohort(p, names), build_target(p.labels, target="label").y
    h = create_head(head, task="binary", n_classes=2, epochs=4, batch_size=16, dp_epsilon=2.0, dp_delta=1e-4,
                    dp_max_grad_norm=0.5, seed=3).fit(cohort, y)
    priv = h.privacy_
    assert 0 < priv["epsilon"] <= 2.0 and priv["delta"] == 1e-4 and priv["max_grad_norm"] == 0.5
    assert priv["accountant"] == "rdp" and priv["noise_multiplier"] > 0 and priv["steps"] >= 4
    assert h.class_weight == "none"  # the DP default: balanced weights would use label counts
    pred = h.predict(cohort)
    assert np.isfinite(pred).all() and np.allclose(pred.sum(1), 1.0)
    h.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["privacy"] == priv and config["params"]["dp_epsilon"] == 2.0
    again = load_head(tmp_path / "m")
    assert again.privacy_ == priv
    np.testing.assert_allclose(again.predict(cohort), pred, atol=1e-6)


def test_tighter_budget_means_more_noise_and_loose_budget_still_learns(binary):
    p, _ = binary
    cohort, y = _cohort(p), build_target(p.labels, target="label").y
    common = {"task": "binary", "n_classes": 2, "epochs": 15, "batch_size": 16, "lr": 1e-2, "seed": 0,
              "modality_dropout": 0.0}
    loose = create_head("fusion_mlp", dp_epsilon=1e4, dp_max_grad_norm=5.0, **common).fit(cohort, y)
    tight = create_head("fusion_mlp", dp_epsilon=0.5, dp_max_grad_norm=5.0, **common).fit(cohort, y)
    assert tight.privacy_["noise_multiplier"] > 10 * loose.privacy_["noise_multiplier"]
    assert tight.privacy_["epsilon"] <= 0.5
    # the planted signal is strong: with almost no noise, clipped SGD still fits it
    assert roc_auc_score(y, loose.predict(cohort)[:, 1]) > 0.85


def test_unfolded_embedding_is_the_same_function():
    torch.manual_seed(0)
    net = torch.nn.Sequential(StandardisedEmbed(5, 4, 0.0))
    x, mean, scale = torch.randn(3, 7, 5), torch.randn(5), torch.rand(5) + 0.5
    folded = net[0](x, mean, scale)
    with unfolded(net):
        assert type(net[0]) is UnfoldedStandardisedEmbed
        torch.testing.assert_close(net[0](x, mean, scale), folded, rtol=1e-5, atol=1e-5)
    assert type(net[0]) is StandardisedEmbed


@pytest.mark.parametrize("params,match", [
    ({"dp_epsilon": 0}, "greater than 0"),
    ({"dp_epsilon": -1}, "greater than 0"),
    ({"dp_epsilon": 1, "dp_delta": 1.5}, "less than 1"),
    ({"dp_epsilon": 1, "dp_max_grad_norm": 0}, "greater than 0"),
    ({"dp_epsilon": 1, "class_weight": "balanced"}, "class_weight=none"),
])
def test_bad_dp_params_are_input_errors(params, match):
    with pytest.raises(InputError, match=match):
        create_head("fusion_mlp", **params)


def test_dp_refuses_survival_and_cross_attention(tmp_path):
    p = make_store(tmp_path / "s.zarr", n=24, task="survival", seed=2, tiles=(4, 6))
    y = build_target(p.labels, time="time", event="event").y
    with pytest.raises(InputError, match="Cox partial"):
        create_head("fusion_mlp", task="survival", n_classes=0, epochs=1, dp_epsilon=1.0).fit(_cohort(p), y)
    y2 = (np.arange(24) % 2).astype(np.int64)
    with pytest.raises(InputError, match="MultiheadAttention|per-sample gradient"):
        create_head("fusion_mlp", task="binary", n_classes=2, epochs=1, dp_epsilon=1.0,
                    fusion="cross_attention").fit(_cohort(p), y2)


def test_cli_fit_writes_privacy_per_fold_and_bad_value_exits_2(binary, tmp_path):
    p, labels = binary
    out = tmp_path / "run"
    base = ["fit", "--head", "fusion_mlp", "--store", str(p.store), "--labels", str(labels), "--target", "label",
            "--folds", "3", "--n-boot", "20", "--param", "epochs=3", "--param", "batch_size=16"]
    r = CliRunner().invoke(app, [*base, "--out", str(out), "--param", "dp_epsilon=3", "--param", "dp_delta=1e-4"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    priv = metrics["privacy"]
    assert priv["epsilon"] <= 3 and priv["delta"] == 1e-4 and priv["accountant"] == "rdp"
    assert len(priv["per_fold"]) == 3 and all(0 < f["epsilon"] <= 3 for f in priv["per_fold"])
    assert json.loads((out / "model" / "config.json").read_text())["privacy"]["epsilon"] == priv["epsilon"]
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--param", "dp_epsilon=0"])
    assert bad.exit_code == 2 and "dp_epsilon=0" in bad.output and not (tmp_path / "bad").exists()
