"""mmcli compare on hand-written run dirs: DeLong (binary), paired bootstrap (multiclass macro AUROC, c-index),
patient matching, and clear refusals of runs that cannot be compared."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from helpers.fake_runs import classification_run, patient_ids, survival_data, survival_run
from mmcli.heads.evaluation.compare import compare, format_comparison
from mmcli.heads.evaluation.stats import delong_test
from mmcli.pipeline.errors import InputError


def test_binary_runs_use_delong_on_matched_patients(tmp_path: Path) -> None:
    a = classification_run(tmp_path / "a", signal=2.0, seed=1, head="fusion_mlp")
    b = classification_run(tmp_path / "b", signal=0.8, seed=2, head="xgboost", modalities=("omics",))
    pb = pd.read_csv(b / "predictions.csv").iloc[::-1]  # order must not matter
    pb.iloc[:100].to_csv(b / "predictions.csv", index=False)  # B scored 100 of A's 120 patients
    res = compare(a, b)
    json.dumps(res, allow_nan=False)
    assert (res["task"], res["metric"], res["method"]) == ("classification", "auroc", "delong")
    assert (res["n_matched"], res["n_only_a"], res["n_only_b"]) == (100, 20, 0)
    pa = pd.read_csv(a / "predictions.csv").set_index("patient_id")
    pb = pb.iloc[:100].set_index("patient_id")
    shared = sorted(pb.index)
    y = (pa.loc[shared, "y_true"] == "pos").astype(int)
    ref = delong_test(y, pa.loc[shared, "prob_pos"], pb.loc[shared, "prob_pos"])
    assert res["run_a"]["value"] == pytest.approx(roc_auc_score(y, pa.loc[shared, "prob_pos"]))
    assert (res["difference"], res["p_value"], res["ci_low"]) == pytest.approx((ref.difference, ref.p_value,
                                                                                 ref.ci_low))
    assert res["difference"] > 0 and res["p_value"] < 0.05 and res["positive_class"] == "pos"
    assert res["run_a"]["head"] == "fusion_mlp" and res["run_b"]["modalities"] == ["omics"]
    text = format_comparison(res)
    assert f"{res['difference']:+.4f}" in text and "delong" in text and "20 only in A" in text


def test_run_against_itself_shows_no_difference(tmp_path: Path) -> None:
    a = classification_run(tmp_path / "a")
    res = compare(a, a)
    assert res["difference"] == 0 and res["p_value"] == 1.0


def test_multiclass_macro_auroc_bootstrap_and_per_class_delong(tmp_path: Path) -> None:
    classes = ("LumA", "LumB", "HER2", "TNBC")
    a = classification_run(tmp_path / "a", classes=classes, n=160, signal=2.5, seed=1)
    b = classification_run(tmp_path / "b", classes=classes, n=160, signal=1.0, seed=2)
    res = compare(a, b, n_boot=300, seed=3)
    assert (res["metric"], res["method"]) == ("auroc_macro_ovr", "paired_bootstrap")
    pa = pd.read_csv(a / "predictions.csv")
    probs = pa[[f"prob_{c}" for c in classes]].to_numpy()
    assert res["run_a"]["value"] == pytest.approx(
        roc_auc_score(pa["y_true"].map(classes.index), probs, multi_class="ovr", average="macro"))
    assert res["difference"] > 0 and res["ci_low"] > 0 and res["p_value"] < 0.01
    assert [r["class"] for r in res["per_class"]] == list(classes)
    assert compare(a, b, n_boot=300, seed=3) == res  # deterministic for a seed
    # B listing its classes (and columns) in another order gives the same answer
    cfg = json.loads((b / "config.json").read_text())
    cfg["classes"] = list(reversed(classes))
    (b / "config.json").write_text(json.dumps(cfg))
    pb = pd.read_csv(b / "predictions.csv")
    pb[["patient_id", "fold", "y_true", "y_pred"] + [f"prob_{c}" for c in reversed(classes)]].to_csv(
        b / "predictions.csv", index=False)
    again = compare(a, b, n_boot=300, seed=3)
    assert again["difference"] == pytest.approx(res["difference"]) and again["p_value"] == res["p_value"]
    assert "per class" in format_comparison(res)


def _centred(pred: pd.DataFrame) -> pd.Series:
    """Each fold's risks minus that fold's mean, computed here independently of mmcli."""
    return pred["risk"] - pred.groupby("fold")["risk"].transform("mean")


def test_survival_cindex_paired_bootstrap(tmp_path: Path) -> None:
    """Changed with issue 12: the reference c-index is now that of the risks centred per fold (compare centres
    them, since each fold model's offset is arbitrary), computed independently with pandas and lifelines."""
    data = survival_data(150)
    a = survival_run(tmp_path / "a", data=data, noise=0.3, n=150)
    b = survival_run(tmp_path / "b", data=data, noise=1.5, n=150, head="attention_mil")
    res = compare(a, b, n_boot=300, seed=0)
    pa, pb = pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv")
    assert res["run_a"]["value"] == pytest.approx(concordance_index(pa["time"], -_centred(pa), pa["event"]))
    assert res["run_b"]["value"] == pytest.approx(concordance_index(pb["time"], -_centred(pb), pb["event"]))
    assert (res["metric"], res["method"], res["n_events"]) == ("c_index", "paired_bootstrap", int(data[2].sum()))
    assert res["difference"] > 0 and res["ci_low"] > 0 and res["p_value"] < 0.01
    assert compare(a, b, n_boot=300, seed=0) == res


def test_compare_refuses_runs_that_do_not_match(tmp_path: Path) -> None:
    cls = classification_run(tmp_path / "cls")
    surv = survival_run(tmp_path / "surv")
    with pytest.raises(InputError, match="classification run .* survival run"):
        compare(cls, surv)
    other_target = classification_run(tmp_path / "t2", target="grade")
    with pytest.raises(InputError, match="different endpoints: target='subtype'"):
        compare(cls, other_target)
    other_time = survival_run(tmp_path / "s2", time_col="pfs_months")
    with pytest.raises(InputError, match="different endpoints: time="):
        compare(surv, other_time)
    other_classes = classification_run(tmp_path / "c3", classes=("low", "high"))
    with pytest.raises(InputError, match="different classes"):
        compare(cls, other_classes)
    disjoint = classification_run(tmp_path / "c4", ids=[f"X{i}" for i in range(120)])
    with pytest.raises(InputError, match="no patient appears in both"):
        compare(cls, disjoint)
    y = np.zeros(120, int)
    y[:60] = 1
    relabelled = classification_run(tmp_path / "c5", y=y, ids=patient_ids(120))
    with pytest.raises(InputError, match="disagree on y_true"):
        compare(cls, relabelled)
    with pytest.raises(InputError, match="not a run directory"):
        compare(cls, tmp_path / "missing")
    (surv / "predictions.csv").unlink()
    with pytest.raises(InputError, match="no predictions.csv"):
        compare(surv, surv)


def test_survival_compare_centres_each_fold_models_offset(tmp_path: Path) -> None:
    """Run A's fold models carry large arbitrary offsets (the Cox loss cannot pin them): compared on raw pooled
    risks A would look much worse than B with the same ranking; centred, the two are identical."""
    data = survival_data(150)
    a = survival_run(tmp_path / "a", data=data, noise=0.3, n=150)
    b = survival_run(tmp_path / "b", data=data, noise=0.3, n=150)
    pred = pd.read_csv(a / "predictions.csv")
    pred["risk"] += pred["fold"].map({0: -4.0, 1: 6.0, 2: 0.0, 3: 11.0, 4: -9.0})
    pred.to_csv(a / "predictions.csv", index=False)
    raw = concordance_index(pred["time"], -pred["risk"], pred["event"])
    res = compare(a, b, n_boot=200, seed=0)
    assert res["difference"] == pytest.approx(0.0, abs=1e-12) and res["run_a"]["value"] > raw + 0.05
    assert res["p_value"] == 1.0 and res["ci_low"] <= 0 <= res["ci_high"] and "risk_centring" in res
    assert "centred per fold" in format_comparison(res)


def test_compare_interval_and_p_agree_over_random_cases(tmp_path: Path) -> None:
    """Binary (DeLong), multiclass and survival (bootstrap) comparisons of random runs: p < alpha exactly when
    the printed (1 - alpha) interval excludes 0."""
    rng = np.random.default_rng(0)
    seen = {"delong": 0, "paired_bootstrap": 0}
    for i in range(12):
        alpha = float(rng.choice([0.05, 0.1, 0.2]))
        kind = i % 3
        if kind == 0:
            n = int(rng.integers(20, 80))
            a = classification_run(tmp_path / f"a{i}", n=n, signal=float(rng.uniform(0.3, 2)), seed=i)
            b = classification_run(tmp_path / f"b{i}", n=n, signal=float(rng.uniform(0.3, 2)), seed=i + 50)
        elif kind == 1:
            cl = ("x", "y", "z")
            a = classification_run(tmp_path / f"a{i}", classes=cl, n=60, signal=float(rng.uniform(0.5, 2)), seed=i)
            b = classification_run(tmp_path / f"b{i}", classes=cl, n=60, signal=float(rng.uniform(0.5, 2)), seed=i + 9)
        else:
            data = survival_data(60, seed=i)
            a = survival_run(tmp_path / f"a{i}", data=data, n=60, noise=float(rng.uniform(0.2, 1.5)), seed=i)
            b = survival_run(tmp_path / f"b{i}", data=data, n=60, noise=float(rng.uniform(0.2, 1.5)), seed=i + 7)
        res = compare(a, b, n_boot=150, seed=i, alpha=alpha)
        excludes = res["ci_low"] > 0 or res["ci_high"] < 0
        assert (res["p_value"] < alpha) == excludes, res
        seen[res["method"]] += 1
        json.dumps(res, allow_nan=False)
    assert seen["delong"] == 4 and seen["paired_bootstrap"] == 8


def test_binary_compare_with_one_shared_positive_is_refused(tmp_path: Path) -> None:
    y = np.zeros(40, int)
    y[0] = 1
    a = classification_run(tmp_path / "a", n=40, y=y, seed=1)
    b = classification_run(tmp_path / "b", n=40, y=y, seed=2)
    with pytest.raises(InputError, match="at least 2 positives and 2 negatives"):
        compare(a, b)


def test_per_class_delong_of_a_tiny_class_is_null_with_a_message(tmp_path: Path) -> None:
    classes = ("big", "mid", "rare")
    y = np.r_[np.zeros(30, int), np.ones(29, int), [2]]
    a = classification_run(tmp_path / "a", classes=classes, n=60, y=y, seed=1)
    b = classification_run(tmp_path / "b", classes=classes, n=60, y=y, seed=2)
    res = compare(a, b, n_boot=100)
    rare = res["per_class"][2]
    assert rare["p_value"] is None and rare["ci_low"] is None and "at least 2 positives" in rare["message"]
    assert res["per_class"][0]["p_value"] is not None
    json.dumps(res, allow_nan=False)
    assert "n/a" in format_comparison(res)


def test_procedures_are_compared_by_the_corrected_paired_t_over_the_shared_folds(tmp_path: Path) -> None:
    """Issue 24 item 3: the headline for "is procedure A better" is Nadeau-Bengio's corrected paired t over the
    per-fold differences, recomputed here by hand from the predictions; each run's pooled out-of-fold value and
    its metrics.json fold mean are both reported and labelled (issue 29 item 13)."""
    from scipy.stats import t as student_t

    a = classification_run(tmp_path / "a", signal=2.0, seed=1, head="fusion_mlp")
    b = classification_run(tmp_path / "b", signal=1.2, seed=2)
    res = compare(a, b)
    proc = res["procedure"]
    assert res["headline"] == "procedure" and proc["method"] == "corrected_resampled_t" and proc["folds"] == 5
    pa, pb = pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv")
    d, sizes = [], []
    for f in range(5):
        m = pa["fold"] == f
        y = (pa.loc[m, "y_true"] == "pos").astype(int)
        d.append(roc_auc_score(y, pa.loc[m, "prob_pos"]) - roc_auc_score(y, pb.loc[m, "prob_pos"]))
        sizes.append(int(m.sum()))
    d = np.array(d)
    se = np.sqrt((1 / 5 + np.mean([s / (120 - s) for s in sizes])) * d.var(ddof=1))
    q = student_t.ppf(0.975, 4)
    assert (proc["difference"], proc["ci_low"], proc["ci_high"], proc["p_value"]) == pytest.approx(
        (d.mean(), d.mean() - q * se, d.mean() + q * se, 2 * student_t.sf(abs(d.mean()) / se, 4)))
    assert proc["per_fold"] == pytest.approx(d.tolist())
    fold_mean = json.loads((a / "metrics.json").read_text())["metrics"]["auroc"]["mean"]
    assert res["run_a"]["fold_mean"] == pytest.approx(fold_mean)
    text = format_comparison(res)
    assert "pooled out-of-fold" in text and "fold mean" in text and f"{fold_mean:.4f}" in text
    assert f"{res['run_a']['value']:.4f}" in text and "the procedures (corrected paired t over 5 folds" in text
    assert text.index("the procedures") < text.index("these fitted models")  # the headline first


def test_procedures_are_not_compared_when_the_folds_differ(tmp_path: Path) -> None:
    a = classification_run(tmp_path / "a", signal=2.0, seed=1)
    b = classification_run(tmp_path / "b", signal=1.2, seed=2, folds=4)
    res = compare(a, b)
    assert res["headline"] == "models" and "folds differ" in res["procedure"]["skipped"]
    json.dumps(res, allow_nan=False)
    assert "the procedures: not computed" in format_comparison(res)
