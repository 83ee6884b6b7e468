"""``mmcli evaluate`` end to end on small planted stores: exit 0, the files, the saved calibration and threshold
applied, drift detected when a shift is planted and not when it is absent; and fit's evidence blocks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.intervals import assert_run_intervals
from helpers.planted_data import make_store
from mmcli.heads.evaluation.evidence import EvidenceOptions
from mmcli.pipeline.store import open_store
from mmcli.stages.evaluate import evaluate
from mmcli.stages.fit import fit
from mmcli.stages.predict import predict

MODS = ["genes", "mri"]
PARAMS = {"n_estimators": 15}


def _labels(p, path: Path) -> Path:
    lab = p.labels.copy()
    lab["site"] = np.where(np.arange(len(lab)) % 4 == 0, "B", "A")
    lab.loc[lab.index[:3], "site"] = "C"  # a group too small to report metrics for
    lab.reset_index().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    train = make_store(d / "train.zarr", n=40, task="binary", seed=11, modalities=("mri", "genes"))
    same = make_store(d / "same.zarr", n=40, task="binary", seed=12, modalities=("mri", "genes"), prefix="Q")
    shifted = make_store(d / "shifted.zarr", n=40, task="binary", seed=13, modalities=("mri", "genes"), prefix="R")
    fs = open_store(shifted.store, "a")  # planted site effect: every gene shifted by 1.5 sd
    genes = fs.read_table("genes")
    fs.write_table("genes", genes + 1.5)
    run = d / "run"
    doc = fit("xgboost", train.store, _labels(train, d / "train.csv"), run, target="label", folds=3, seed=0,
              n_boot=30, params=PARAMS, modalities=MODS,
              evidence=EvidenceOptions.build(dict(calibrate="platt", operating_point="sens=0.9", subgroups="site",
                                                  inner_folds=3)))
    return d, run, doc, _labels(same, d / "same.csv"), _labels(shifted, d / "shifted.csv"), same, shifted


def test_fit_writes_evidence_blocks_and_in_fold_audit(cohorts):
    d, run, doc, *_ = cohorts
    assert doc["calibration"]["method"] == "platt" and "pos" in doc["calibration"]["classes"]
    op = doc["operating_point"]
    assert len(op["threshold_per_fold"]) == 3 and 0 < op["final_threshold"] <= 1
    assert set(op["metrics"]) == {"sensitivity", "specificity", "ppv", "npv", "counts"}
    assert len(doc["decision_curve"]["thresholds"]) == 99
    groups = {g["group"]: g for g in doc["subgroups"]["columns"]["site"]["groups"]}
    assert groups["C"]["too_small"] and groups["C"]["n"] == 3 and "metrics" not in groups["C"]
    audit = json.loads((run / "cv_audit.json").read_text())
    for f in audit["folds"]:
        assert f["calibrator_overlap_with_test"] == 0 and len(f["calibrator_fit_on"]) == f["n_train"]
    post = json.loads((run / "model" / "postprocess.json").read_text())
    assert post["threshold"] == op["final_threshold"] and post["calibration"]["method"] == "platt"
    pred = pd.read_csv(run / "predictions.csv")
    assert set(pred["decision"]) <= {"neg", "pos"}


def test_predict_applies_the_saved_calibration_and_threshold(cohorts, tmp_path):
    d, run, doc, same_csv, _, same, _ = cohorts
    df = predict(run, same.store, tmp_path / "p.csv")
    thr = doc["operating_point"]["final_threshold"]
    np.testing.assert_array_equal(df["decision"], np.where(df["prob_pos"] >= thr, "pos", "neg"))
    ev = evaluate(run, same.store, same_csv, tmp_path / "ev", n_boot=20, n_permutations=19)
    got = pd.read_csv(tmp_path / "ev" / "predictions.csv").set_index("patient_id")
    np.testing.assert_allclose(got.loc[df["patient_id"], "prob_pos"], df["prob_pos"].to_numpy(), rtol=1e-6)
    assert ev["operating_point"]["threshold"] == thr


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "mmcli.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.parametrize("which", ["same", "shifted"])
def test_evaluate_cli_end_to_end_and_drift(cohorts, which):
    d, run, _, same_csv, shifted_csv, same, shifted = cohorts
    store, labels = (same.store, same_csv) if which == "same" else (shifted.store, shifted_csv)
    out = d / f"eval-{which}"
    res = _cli("evaluate", "--model", str(run), "--store", str(store), "--labels", str(labels), "--out", str(out),
               "--subgroups", "site", "--n-boot", "30", "--n-permutations", "39")
    assert res.returncode == 0, res.stderr
    for name in ("metrics.json", "predictions.csv", "report.html", "config.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "external_validation" and m["n_patients"] == 40
    assert_run_intervals(out, n_boot=30, seed=0)  # recomputed independently; fails for a wrong interval
    assert {"calibration", "operating_point", "decision_curve", "subgroups", "drift", "missing"} <= set(m)
    assert m["missing"]["modality_missing"]["mri"] > 0  # make_store leaves some patients without MRI
    genes = m["drift"]["modalities"]["genes"]
    if which == "shifted":
        assert genes["shift_detected"] and genes["auroc"] > 0.8 and genes["p_value"] <= 0.05
    else:
        assert not genes["shift_detected"] and genes["auroc"] < 0.75
    assert not m["drift"]["modalities"]["mri"]["shift_detected"]  # the planted shift is in genes only
    html = (out / "report.html").read_text()
    for section in ("Calibration", "Operating point", "Decision curve", "Subgroups", "Drift", "Missing patients"):
        assert f"<h2>{section}" in html, section


def test_evaluate_refuses_unknown_classes_and_fit_only_flags(cohorts, tmp_path):
    d, run, _, same_csv, _, same, _ = cohorts
    lab = pd.read_csv(same_csv)
    lab.loc[0, "label"] = "maybe"
    lab.to_csv(tmp_path / "bad.csv", index=False)
    res = _cli("evaluate", "--model", str(run), "--store", str(same.store), "--labels", str(tmp_path / "bad.csv"),
               "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "['maybe']" in res.stderr and "Traceback" not in res.stderr
    from mmcli.pipeline.errors import InputError

    with pytest.raises(InputError, match="fit options"):
        evaluate(run, same.store, same_csv, tmp_path / "o2", evidence=EvidenceOptions.build({"calibrate": "platt"}))
