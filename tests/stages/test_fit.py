"""``fit``: the run-directory contract, no leakage across folds, label validation, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.intervals import assert_run_intervals
from helpers.planted_data import make_store
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.evaluation.metrics import CLASSIFICATION_METRICS, SURVIVAL_METRICS
from mmcli.heads.targets import build_target
from mmcli.heads.training.cv import cross_validate
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit, parse_encoders, parse_params

METRIC_KEYS = {"head", "task", "modalities", "folds", "n_patients", "metrics", "encoder_ids", "seed", "created",
               # issue 12: every classification run also reports calibration and a decision curve (or why not)
               "calibration", "decision_curve"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    p = make_store(d / "s.zarr", n=45, task="multiclass", seed=7, mri_missing=0.3, wsi_missing=0.1)
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    return p, d / "labels.csv"


@pytest.fixture(scope="module")
def surv(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit_surv")
    p = make_store(d / "s.zarr", n=45, task="survival", seed=8)
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    return p, d / "labels.csv"


def test_fusion_run_dir_follows_the_contract(planted, tmp_path):
    p, labels = planted
    out = tmp_path / "run"
    doc = fit("fusion_mlp", p.store, labels, out, target="label", folds=3, seed=0, n_boot=20,
              params={"epochs": 10, "fusion": "bilinear"})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == doc and set(metrics) == METRIC_KEYS
    assert metrics["task"] == "classification" and metrics["folds"] == 3 and metrics["n_patients"] == 45
    assert metrics["modalities"] == ["mri", "wsi", "genes"]
    assert metrics["encoder_ids"] == {"mri": "enc-mri", "wsi": "enc-wsi", "genes": "tabular"}
    assert set(metrics["metrics"]) == set(CLASSIFICATION_METRICS)
    for m in metrics["metrics"].values():
        # issue 12 added n_boot, n_valid, the t-interval and the interval descriptions to the original four keys
        # and issue 24 the headline key (which interval to read first)
        assert set(m) == {"mean", "ci_low", "ci_high", "per_fold", "n_boot", "n_valid", "ci_t_low", "ci_t_high",
                          "interval", "headline"} and len(m["per_fold"]) == 3
        assert m["n_valid"] == m["n_boot"] == 20
    assert_run_intervals(out, n_boot=20, seed=0)  # recomputed independently; fails for a wrong interval
    config = json.loads((out / "config.json").read_text())
    for key in ("head", "params", "task", "target", "classes", "modalities", "encoder_ids", "folds", "seed",
                "store", "labels", "features_sha256", "mmcli_version", "created"):
        assert key in config, key
    assert config["classes"] == ["C0", "C1", "C2"] and config["params"]["fusion"] == "bilinear"
    assert len(config["features_sha256"]) == 64
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["patient_id", "fold", "y_true", "y_pred", "prob_C0", "prob_C1", "prob_C2"]
    assert sorted(pred["patient_id"]) == sorted(p.labels.index) and pred["fold"].between(0, 2).all()
    np.testing.assert_allclose(pred[["prob_C0", "prob_C1", "prob_C2"]].sum(axis=1), 1.0, atol=1e-6)
    folds = json.loads((out / "folds.json").read_text())
    assert folds == dict(zip(pred["patient_id"], pred["fold"].astype(int)))
    weights = json.loads((out / "modality_weights.json").read_text())
    assert set(weights) == {"mri", "wsi", "genes"} and abs(sum(weights.values()) - 1) < 1e-6
    att = pd.read_csv(out / "attention.csv")
    assert list(att.columns) == ["patient_id", "item_id", "index", "attention"]
    model = sorted(f.name for f in (out / "model").iterdir())
    assert model == ["config.json", "preprocess.json", "preprocess.safetensors", "weights.safetensors"]
    mcfg = json.loads((out / "model" / "config.json").read_text())
    assert mcfg["head"] == "fusion_mlp" and mcfg["run"]["classes"] == ["C0", "C1", "C2"]
    assert not list(out.rglob("*.pkl")) and not list(out.rglob(".*.tmp"))


def test_xgboost_run_writes_oof_shap(planted, tmp_path):
    p, labels = planted
    fit("xgboost", p.store, labels, tmp_path, target="label", folds=3, n_boot=10, params={"n_estimators": 20},
        modalities=["genes", "mri"])
    shap = pd.read_csv(tmp_path / "shap.csv")
    assert shap.columns[0] == "patient_id" and len(shap) == 45
    assert list(shap.columns[1:4]) == ["genes:g0", "genes:g1", "genes:g2"] and shap.shape[1] == 1 + 12 + 8
    assert (tmp_path / "model" / "model.json").is_file()


@pytest.mark.parametrize("head", ["cox", "xgboost", "attention_mil"])
def test_survival_runs_report_survival_metrics(surv, tmp_path, head):
    p, labels = surv
    params = {"attention_mil": {"epochs": 5}, "xgboost": {"n_estimators": 20}, "cox": {}}[head]
    doc = fit(head, p.store, labels, tmp_path, time="time", event="event", folds=3, n_boot=10, params=params)
    assert doc["task"] == "survival" and set(doc["metrics"]) == set(SURVIVAL_METRICS)
    assert doc["metrics"]["c_index"]["mean"] is not None and doc["metrics"]["ibs"]["mean"] is not None
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert list(pred.columns) == ["patient_id", "fold", "time", "event", "risk"]
    assert np.allclose(pred.groupby("fold")["risk"].mean(), 0.0, atol=1e-6)  # centred per fold before pooling
    audit = json.loads((tmp_path / "cv_audit.json").read_text())
    assert all(set(f["overlap_with_test"].values()) <= {0} for f in audit["folds"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["time"] == "time" and cfg["event"] == "event" and "higher = shorter" in cfg["risk_convention"]


def test_no_fold_preprocessing_sees_its_test_patients(tmp_path):
    p = make_store(tmp_path / "s.zarr", n=40, task="binary", seed=9, mri_missing=0.2)
    fs = open_store(p.store, "r")
    genes = fs.read_table("genes")
    target = build_target(p.labels, target="label")
    cohort = load_cohort(fs, resolve_sources(fs), target.patients)
    results = cross_validate("fusion_mlp", cohort, target, folds=4, seed=0, params={"epochs": 1}, explain=False)
    for r in results:
        test = {target.patients[i] for i in r.test_idx}
        assert set(r.preprocessing_patients) == {"wsi", "mri", "genes"}
        for seen in r.preprocessing_patients.values():
            assert seen and not test & set(seen)
    # Numerically: each fold's gene scaler equals statistics of its training rows alone.
    values = genes.reindex(cohort.patients).to_numpy()
    for r in results:
        prep = r.head.preprocessors_["genes"]
        train = values[r.train_idx]
        med = np.nanmedian(train, axis=0)
        np.testing.assert_allclose(prep.median_, med)
        np.testing.assert_allclose(prep.mean_, np.where(np.isnan(train), med, train).mean(axis=0), rtol=1e-6)
        everyone = np.where(np.isnan(values), med, values).mean(axis=0)
        assert not np.allclose(prep.mean_, everyone)
    # And the run directory records it.
    fit("fusion_mlp", p.store, p.labels, tmp_path / "run", target="label", folds=4, n_boot=5,
        params={"epochs": 2})
    audit = json.loads((tmp_path / "run" / "cv_audit.json").read_text())
    assert len(audit["folds"]) == 4
    for f in audit["folds"]:
        assert set(f["overlap_with_test"].values()) == {0}
        assert set(f["preprocessing_fit_on"]) == {"wsi", "mri", "genes"}


def test_same_seed_gives_identical_run(planted, tmp_path):
    p, labels = planted
    for name in ("a", "b"):
        fit("fusion_mlp", p.store, labels, tmp_path / name, target="label", folds=3, seed=3, n_boot=10,
            params={"epochs": 3})
    a, b = ((tmp_path / n / "predictions.csv").read_bytes() for n in "ab")
    assert a == b
    ma, mb = (json.loads((tmp_path / n / "metrics.json").read_text())["metrics"] for n in "ab")
    assert ma == mb


# ---- bad input ---------------------------------------------------------------------------------------------
def _labels(tmp_path: Path, rows: list[str], header: str = "patient_id,label") -> Path:
    f = tmp_path / "labels.csv"
    f.write_text(header + "\n" + "\n".join(rows) + "\n")
    return f


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("small") / "s.zarr", n=12, task="binary", seed=11,
                      modalities=("genes",))


def _rows(planted, fn):
    return [fn(i, pid) for i, pid in enumerate(planted.labels.index)]


@pytest.mark.parametrize("case,match", [
    ("nan_target", r"missing value in column\(s\) \['label'\] at line 4 \(P002\)"),
    ("single_class", r"single class"),
    ("unknown_patient", r"1 labelled patient\(s\) without features of \['genes'\] .*\(Q999\)"),
    ("unlabelled_patient", r"1 patient\(s\) of the store without a label \(P011\)"),
    ("no_column", r"no column 'label' for --target"),
    ("no_overlap", r"none of its 12 labelled patient\(s\) .* has features of \['genes'\]"),
    ("class_gone", r"class sizes \{'c': 0\} .* left after leaving out unmatched patients"),
    ("inf_class", r"non-finite value\(s\) \['inf'\] at line 4 \(P002\)"),
])
def test_bad_classification_labels_are_clear_input_errors(small, tmp_path, case, match):
    header = "patient_id,label"
    if case == "nan_target":
        rows = _rows(small, lambda i, p: f"{p},{'' if i == 2 else ('a' if i % 2 else 'b')}")
    elif case == "single_class":
        rows = _rows(small, lambda i, p: f"{p},a")
    elif case == "unknown_patient":
        rows = _rows(small, lambda i, p: f"{p},{'a' if i % 2 else 'b'}") + ["Q999,a"]
    elif case == "unlabelled_patient":
        rows = _rows(small, lambda i, p: f"{p},{'a' if i % 2 else 'b'}")[:-1]
    elif case == "no_overlap":
        rows = _rows(small, lambda i, p: f"X{p},{'a' if i % 2 else 'b'}")
    elif case == "class_gone":  # the only 'c' patients are not in the store
        rows = _rows(small, lambda i, p: f"{p},{'a' if i % 2 else 'b'}") + ["Q1,c", "Q2,c"]
    elif case == "inf_class":
        rows = _rows(small, lambda i, p: f"{p},{'inf' if i == 2 else i % 2}")
    else:
        header, rows = "patient_id,other", _rows(small, lambda i, p: f"{p},a")
    f = _labels(tmp_path, rows, header)
    with pytest.raises(InputError, match=match) as e:
        fit("xgboost", small.store, f, tmp_path / "run", target="label", folds=2,
            strict_match=case in ("unknown_patient", "unlabelled_patient"))
    assert str(f) in str(e.value) and "Fix" in str(e.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unmatched_patients_are_left_out_with_a_note(small, tmp_path):
    """Labels of patients absent from the store, and store patients without labels: a note, then the fit."""
    rows = _rows(small, lambda i, p: f"{p},{'a' if i % 2 else 'b'}")[:-1] + ["Q999,a", "Q998,b"]
    f = _labels(tmp_path, rows)
    notes: list[str] = []
    fit("xgboost", small.store, f, tmp_path / "run", target="label", folds=2, n_boot=5,
        params={"n_estimators": 5}, log=notes.append)
    text = "\n".join(notes)
    assert f"note: left out 2 labelled patient(s) of {f} without features of ['genes']" in text
    assert "Q998, Q999" in text and "without a row in" in text and ": P011" in text
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["n_patients"] == 11
    assert cfg["excluded_patients"] == {"not_in_store": ["Q998", "Q999"], "no_label": ["P011"]}


@pytest.mark.parametrize("row2,match", [
    ("P002,abc,1", r"'time' \(time\) is not a finite number at line 4 \(P002\)"),
    ("P002,inf,1", r"not a finite number"),
    ("P002,0,1", r"must be > 0, found <= 0 at line 4"),
    ("P002,-3,0", r"must be > 0"),
    ("P002,5,2", r"'event' \(event\) must be 0 or 1 at line 4 \(P002\)"),
    ("P002,5,yes", r"must be 0 or 1"),
])
def test_bad_survival_labels_are_clear_input_errors(small, tmp_path, row2, match):
    rows = _rows(small, lambda i, p: row2 if i == 2 else f"{p},{10 + i},{i % 2}")
    f = _labels(tmp_path, rows, "patient_id,time,event")
    with pytest.raises(InputError, match=match):
        fit("cox", small.store, f, tmp_path / "run", time="time", event="event", folds=2)


def test_drop_unmatched_leaves_out_and_records_bad_rows(small, tmp_path):
    rows = _rows(small, lambda i, p: f"{p},{'' if i == 0 else ('a' if i % 2 else 'b')}") + ["Q999,a"]
    f = _labels(tmp_path, rows)
    fit("xgboost", small.store, f, tmp_path / "run", target="label", folds=2, n_boot=5, drop_unmatched=True,
        params={"n_estimators": 5})
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["n_patients"] == 11
    assert cfg["excluded_patients"] == {"missing_label": ["P000"], "not_in_store": ["Q999"]}


def test_other_usage_errors(small, tmp_path):
    f = _labels(tmp_path, _rows(small, lambda i, p: f"{p},{'a' if i % 2 else 'b'}"))
    with pytest.raises(InputError, match="either a classification target"):
        fit("xgboost", small.store, f, tmp_path / "r", target="label", time="label", event="label")
    with pytest.raises(InputError, match="smaller than --folds 10"):
        fit("xgboost", small.store, f, tmp_path / "r", target="label", folds=10)
    with pytest.raises(InputError, match="no modality or table named 'ct'"):
        fit("xgboost", small.store, f, tmp_path / "r", target="label", modalities=["ct"])
    with pytest.raises(InputError, match="unknown head"):
        fit("svm", small.store, f, tmp_path / "r", target="label")
    with pytest.raises(InputError, match="cox.*survival|supports"):
        fit("cox", small.store, f, tmp_path / "r", target="label")


def test_several_encoders_need_a_choice(tmp_path):
    p = make_store(tmp_path / "s.zarr", n=12, task="binary", seed=12, modalities=("wsi",))
    fs = open_store(p.store, "a")
    for pid in p.labels.index:
        fs.write_item("wsi", "enc-other", pid, "slide0", np.ones((3, 4), np.float32),
                      np.zeros((3, 2), np.int64))
    with pytest.raises(InputError, match=r"several encoders \['enc-other', 'enc-wsi'\].*--encoder wsi=ID"):
        fit("attention_mil", p.store, p.labels, tmp_path / "r", target="label", folds=2)
    doc = fit("attention_mil", p.store, p.labels, tmp_path / "r", target="label", folds=2, n_boot=5,
              encoders={"wsi": "enc-other"}, params={"epochs": 1})
    assert doc["encoder_ids"] == {"wsi": "enc-other"}
    with pytest.raises(InputError, match="has no encoder_id 'enc-x'"):
        fit("attention_mil", p.store, p.labels, tmp_path / "r", target="label", encoders={"wsi": "enc-x"})


def test_cli_helpers_parse_params_and_encoders():
    assert parse_params(["epochs=3", "fusion=gated", "class_weight=null", "lr=0.01"]) == {
        "epochs": 3, "fusion": "gated", "class_weight": None, "lr": 0.01}
    assert parse_encoders(["wsi=enc-1"]) == {"wsi": "enc-1"}
    with pytest.raises(InputError):
        parse_params(["epochs"])
    with pytest.raises(InputError):
        parse_encoders(["wsi"])


def test_parse_params_validates_against_the_heads_model_at_parse_time(tmp_path):
    assert parse_params(["n_estimators=5", "class_weight=null"], "xgboost") == {"n_estimators": 5,
                                                                                "class_weight": None}
    with pytest.raises(InputError, match=r"head 'xgboost' has no parameter\(s\) \['epochs'\]. Fix: use some of "
                                         r"\[.*'n_estimators'"):
        parse_params(["epochs=3"], "xgboost")
    with pytest.raises(InputError, match=r"--param max_depth='deep': .*\(takes: maximum tree depth"):
        parse_params(["max_depth=deep"], "xgboost")
    with pytest.raises(InputError, match=r"--param fusion='sum'.*unknown fusion"):
        parse_params(["fusion=sum"], "fusion_mlp")
    with pytest.raises(InputError, match="set by the run"):
        parse_params(["n_classes=3"], "fusion_mlp")
    with pytest.raises(InputError, match=r"head 'xgboost' has no parameter\(s\) \['epochs'\]"):
        parse_params(["epochs=3"], ["fusion_mlp", "xgboost"])  # ablate: valid for every head it fits
    with pytest.raises(InputError, match="unknown head 'svm'"):
        parse_params(["epochs=3"], "svm")


def test_cli_bad_param_exits_2_naming_the_key_before_reading_anything(tmp_path):
    """The installed ``mmcli`` entry point: the store and labels need not exist for a bad --param to be caught."""
    import subprocess
    import sys

    mmcli = str(Path(sys.executable).with_name("mmcli"))
    base = [mmcli, "fit", "--head", "xgboost", "--store", str(tmp_path / "none.zarr"), "--labels",
            str(tmp_path / "none.csv"), "--out", str(tmp_path / "run"), "--target", "y"]
    for arg, expect in (("n_estimators=-1", "--param n_estimators=-1: Input should be greater than or equal to 1"),
                        ("depth=3", "head 'xgboost' has no parameter(s) ['depth']. Fix: use some of")):
        r = subprocess.run(base + ["--param", arg], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stderr
        assert expect in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_subgroup_column_no_table_has_stops_before_the_first_fold(small, tmp_path, monkeypatch):
    """Issue 29 item 6: ``--subgroups age`` where ``age`` is in neither the labels nor a store table failed only
    after the whole cross-validation; it is now an InputError naming the column, before any fold runs and before
    the run folder exists. A column that is there passes."""
    import mmcli.heads.training.fitting as fitting

    f = _labels(tmp_path, _rows(small, lambda i, p: f"{p},{'a' if i % 2 else 'b'},{i % 3}"),
                header="patient_id,label,site")
    monkeypatch.setattr(fitting, "cross_validate", lambda *a, **k: pytest.fail("a fold ran"))
    with pytest.raises(InputError, match=r"--subgroups: no column 'age' .*mmcli extract --modality tabular"):
        fit("xgboost", small.store, f, tmp_path / "r", target="label", folds=2,
            evidence={"subgroups": "site,age"})
    assert not (tmp_path / "r").exists()
    with pytest.raises(pytest.fail.Exception, match="a fold ran"):  # site is a labels column: on to the folds
        fit("xgboost", small.store, f, tmp_path / "r", target="label", folds=2, evidence={"subgroups": "site"})
