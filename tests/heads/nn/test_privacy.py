"""DP-SGD for the torch heads (Opacus): the spent epsilon recomputed independently (numerical RDP of the sampled
Gaussian mechanism) from the recorded sigma, q and steps; each update is the clipped per-patient gradient sum plus
Gaussian noise of the recorded scale; the privacy record says what epsilon covers; nothing that stores training
rows ships with a DP model (knn / iterative imputation, isotonic calibration refused); training still learns at a
loose budget; bad values exit 2."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from helpers.planted_data import make_store
from mmcli.cli import app
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.nn.modules import StandardisedEmbed
from mmcli.heads.nn.privacy import UnfoldedStandardisedEmbed, dp_train, unfolded
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


ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # the RDP orders Opacus minimises over


def sampled_gaussian_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP at order ``alpha`` of one step of the Poisson-subsampled Gaussian mechanism (sensitivity 1, noise
    sigma, rate q), by numerical integration of its definition (Mironov, Talwar & Zhang 2019, sec. 3.3):
    ``log E_{z~N(0, s^2)}[((1 - q) + q exp((2z - 1) / (2 s^2)))^alpha] / (alpha - 1)``, with no closed form
    and no code of Opacus: a trapezoid rule in log space over a grid wide enough for the integrand's mass."""
    from scipy.special import logsumexp

    z = np.linspace(-40 * sigma, 40 * sigma + alpha, 100_001)
    log_ratio = np.logaddexp(np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * sigma ** 2))
    log_f = -z ** 2 / (2 * sigma ** 2) - np.log(sigma * np.sqrt(2 * np.pi)) + alpha * log_ratio
    w = np.full(z.size, z[1] - z[0])
    w[[0, -1]] /= 2
    return float(logsumexp(log_f, b=w) / (alpha - 1))


def hand_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """(epsilon, delta) from RDP composed over ``steps`` (RDP adds up), converted with Balle et al. 2020, Thm 21:
    ``eps = rdp - (log delta + log a) / (a - 1) + log((a - 1) / a)``, minimised over the orders."""
    return min(steps * sampled_gaussian_rdp(q, sigma, a) - (math.log(delta) + math.log(a)) / (a - 1)
               + math.log((a - 1) / a) for a in ORDERS)


def test_hand_rdp_matches_the_closed_form_at_integer_orders():
    """The integration itself checked against Mironov et al.'s binomial expansion for integer alpha."""
    q, sigma = 0.1, 1.3
    for alpha in (2, 5, 17):
        closed = math.log(sum(math.comb(alpha, k) * (1 - q) ** (alpha - k) * q ** k * math.exp((k * k - k) /
                                                                                             (2 * sigma ** 2))
                              for k in range(alpha + 1))) / (alpha - 1)
        assert sampled_gaussian_rdp(q, sigma, alpha) == pytest.approx(closed, rel=1e-9)


def test_each_update_is_the_clipped_gradient_sum_plus_noise_of_the_recorded_scale():
    """One DP-SGD epoch of a linear model whose per-patient gradients are known in closed form: every update,
    times the expected batch size, minus the sum of the batch's clipped gradients, is Gaussian noise with
    sd = noise_multiplier * max_grad_norm (chi-square over all coordinates and steps). Without clipping the
    same residual is far larger; without noise it is zero."""
    rng = np.random.default_rng(0)
    n, d, clip = 40, 50, 0.5
    X = torch.as_tensor(rng.normal(0, 3, (n, d)), dtype=torch.float32)  # gradient norms ~ 21 >> clip
    c = torch.as_tensor(rng.choice([-1.0, 1.0], n), dtype=torch.float32)
    torch.manual_seed(0)
    lin = torch.nn.Linear(d, 1)
    snapshots, batches = [], []

    def step_loss(idx):
        snapshots.append(torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).clone())
        batches.append(np.asarray(idx))
        t = torch.as_tensor(idx)
        return (lin(X[t])[:, 0] * c[t]).mean()  # per-patient loss c_i * (w.x_i + b): gradient c_i * [x_i, 1]

    rec = dp_train(lin, torch.optim.SGD(lin.parameters(), lr=1.0), n, batch_size=10, epochs=1,
                   target_epsilon=5.0, delta=1e-5, max_grad_norm=clip, seed=1, step_loss=step_loss)
    snapshots.append(torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]))
    assert rec["steps"] == len(batches) == 4  # no empty Poisson batch at this seed
    expected_batch = int(n * rec["sample_rate"])
    noise_sd = rec["noise_multiplier"] * clip
    clipped_res, raw_res = [], []
    for t, idx in enumerate(batches):
        g = torch.cat([X[idx] * c[idx, None], c[idx, None]], 1).double()  # (B, d + 1) per-patient gradients
        factor = (clip / (g.norm(dim=1) + 1e-6)).clamp(max=1.0)
        update = (snapshots[t] - snapshots[t + 1]).double() * expected_batch  # lr = 1
        clipped_res.append((update - (g * factor[:, None]).sum(0)).numpy())
        raw_res.append((update - g.sum(0)).numpy())
    r = np.concatenate(clipped_res)
    ratio = float(np.mean(r ** 2) / noise_sd ** 2)  # chi-square / dof: 1 +- 0.07 here
    assert 0.7 < ratio < 1.3 and abs(r.mean()) < 4 * noise_sd / np.sqrt(r.size)
    assert np.mean(np.concatenate(raw_res) ** 2) / noise_sd ** 2 > 10


@pytest.mark.parametrize("head,names", [("fusion_mlp", None), ("attention_mil", ["wsi"])])
def test_spent_epsilon_within_target_and_saved_with_the_model(binary, tmp_path, head, names):
    p, _ = binary
    cohort, y = _cohort(p, names), build_target(p.labels, target="label").y
    h = create_head(head, task="binary", n_classes=2, epochs=4, batch_size=16, dp_epsilon=2.0, dp_delta=1e-4,
                    dp_max_grad_norm=0.5, seed=3).fit(cohort, y)
    priv = h.privacy_
    assert 0 < priv["epsilon"] <= 2.0 and priv["delta"] == 1e-4 and priv["max_grad_norm"] == 0.5
    assert priv["accountant"] == "rdp" and priv["noise_multiplier"] > 0
    # q and steps as DP-SGD's Poisson loader makes them: 48 patients in batches of 16, 4 epochs
    assert priv["sample_rate"] == 1 / 3 and priv["steps"] == 4 * 3
    # epsilon recomputed without Opacus from (sigma, q, steps, delta); sigma is the smallest the budget allows
    sigma = priv["noise_multiplier"]
    assert hand_epsilon(sigma, 1 / 3, 12, 1e-4) == pytest.approx(priv["epsilon"], rel=1e-4)
    assert hand_epsilon(0.95 * sigma, 1 / 3, 12, 1e-4) > 2.0
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


def _saved_arrays(model_dir: Path) -> list[np.ndarray]:
    """Every array of a saved model: safetensors tensors and the numeric lists of its JSON files."""
    from safetensors.numpy import load_file

    out = [v for f in model_dir.glob("*.safetensors") for v in load_file(str(f)).values()]

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list) and x and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
            out.append(np.asarray(x, dtype=float))
        elif isinstance(x, list):
            for v in x:
                walk(v)
    for f in model_dir.glob("*.json"):
        walk(json.loads(f.read_text()))
    return out


def training_rows_in(model_dir: Path, cohort) -> int:
    """How many rows of the saved arrays equal a training patient's feature row (a vector modality's vector or
    a bag's tile), NaN matching NaN."""
    hits = 0
    for m in cohort.modalities.values():
        rows = np.vstack([b for b in m.bags if b is not None]) if m.bags is not None else m.vectors[m.present]
        rows = np.asarray(rows, dtype=np.float64)
        for a in _saved_arrays(model_dir):
            a = np.asarray(a, dtype=np.float64)
            if a.ndim == 0 or a.shape[-1] != rows.shape[1]:
                continue
            for r in a.reshape(-1, rows.shape[1]):
                hits += bool(np.all(np.isclose(rows, r, rtol=1e-6, atol=1e-9, equal_nan=True), axis=1).any())
    return hits


def test_dp_model_files_hold_no_training_row_and_knn_with_dp_is_refused(binary, tmp_path):
    """Issue 24 item 2: knn imputation saves its training matrix (element-wise the patients' features); with
    dp_epsilon it is refused, and a DP model with the default imputation holds no training row in any file."""
    p, _ = binary
    cohort, y = _cohort(p), build_target(p.labels, target="label").y
    common = {"task": "binary", "n_classes": 2, "epochs": 2, "batch_size": 16}
    plain = create_head("fusion_mlp", impute="knn", **common).fit(cohort, y).save(tmp_path / "knn")
    assert training_rows_in(plain, cohort) >= len(cohort) // 2  # the check sees rows where there are some
    for impute in ("knn", "iterative"):
        with pytest.raises(InputError, match=f"--impute {impute} saves the training patients' feature rows"):
            create_head("fusion_mlp", impute=impute, dp_epsilon=2.0, **common)
    for impute in (None, "median"):
        dp = create_head("fusion_mlp", impute=impute, dp_epsilon=2.0, **common).fit(cohort, y)
        assert training_rows_in(dp.save(tmp_path / f"dp_{impute}"), cohort) == 0
        scope = dp.privacy_
        assert scope["covers"].startswith("weights.safetensors")
        prep = [r for r in scope["not_covered"] if r.startswith("preprocess.safetensors")]
        assert sorted(r.split(":")[0].split()[1] for r in prep) == sorted(cohort.modalities)
        assert any("medians" in r for r in prep) and any("tiles" in r for r in prep)


def test_cli_fit_writes_privacy_per_fold_and_bad_value_exits_2(binary, tmp_path):
    p, labels = binary
    out = tmp_path / "run"
    base = ["fit", "--head", "fusion_mlp", "--store", str(p.store), "--labels", str(labels), "--target", "label",
            "--folds", "3", "--n-boot", "20", "--param", "epochs=3", "--param", "batch_size=16"]
    r = CliRunner().invoke(app, [*base, "--out", str(out), "--param", "dp_epsilon=3", "--param", "dp_delta=1e-4",
                                 "--calibrate", "platt", "--inner-folds", "2"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    priv = metrics["privacy"]
    assert priv["epsilon"] <= 3 and priv["delta"] == 1e-4 and priv["accountant"] == "rdp"
    assert len(priv["per_fold"]) == 3 and all(0 < f["epsilon"] <= 3 for f in priv["per_fold"])
    model_priv = json.loads((out / "model" / "config.json").read_text())["privacy"]
    assert model_priv["epsilon"] == priv["epsilon"] and model_priv["not_covered"] == priv["not_covered"]
    assert any(r.startswith("postprocess.json calibrator (platt)") for r in priv["not_covered"])
    assert training_rows_in(out / "model", _cohort(p)) == 0
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--param", "dp_epsilon=0"])
    assert bad.exit_code == 2 and "dp_epsilon=0" in bad.output and not (tmp_path / "bad").exists()
    for extra, match in ((["--impute", "knn"], "--impute knn saves"), (["--calibrate", "isotonic"],
                                                                      "--calibrate isotonic with")):
        bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--param", "dp_epsilon=3", *extra])
        assert bad.exit_code == 2 and match in " ".join(bad.output.split()), bad.output
        assert not (tmp_path / "bad").exists()
