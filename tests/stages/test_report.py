"""report.html on hand-written run dirs: self-contained, metric values shown, every section degrades gracefully."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import multivariate_logrank_test

from helpers.fake_runs import classification_run, survival_run, write_slide
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.report import report
from mmcli.stages.report.plots import risk_groups

TILE = 128


def _assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "data:image/png;base64," in text
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:|//|file:)""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    for src in re.findall(r"""src=['"]([^'"]*)""", text):
        assert src.startswith("data:image/png;base64,")


def _add_wsi(tmp_path: Path, run: Path, patients: list[str], with_slide: bool = True) -> Path:
    """A store with one 8x6-tile slide per patient, attention.csv for them, and the store path in config."""
    store_path = tmp_path / "store.zarr"
    store = open_store(store_path, "a")
    slide = write_slide(tmp_path / "slide.tif") if with_slide else tmp_path / "gone.tif"
    xs, ys = np.meshgrid(np.arange(0, 1024, TILE), np.arange(0, 768, TILE))
    coords = np.c_[xs.ravel(), ys.ravel()]
    rows = []
    for k, pid in enumerate(patients):
        store.write_item("wsi", "enc-wsi", pid, "slide1", np.zeros((len(coords), 4), np.float32), coords,
                         {"source_fingerprint": {"path": str(slide)}, "patch_size": TILE, "mpp": 0.5})
        att = np.random.default_rng(k).random(len(coords))
        rows += [{"patient_id": pid, "item_id": "slide1", "index": i, "attention": a} for i, a in enumerate(att)]
    pd.DataFrame(rows).to_csv(run / "attention.csv", index=False)
    cfg = json.loads((run / "config.json").read_text())
    cfg["store"] = str(store_path)
    (run / "config.json").write_text(json.dumps(cfg))
    return store_path


def _showcase(pred: pd.DataFrame, with_attention: list[str], n: int) -> list[str]:
    """Independent pandas recomputation of the binary attention showcase: the true positives with the highest
    P(pos) (half, rounded up), then the errors with the most confident predicted class."""
    p = pred[pred["patient_id"].isin(with_attention)].copy()
    p["conf"] = p[["prob_neg", "prob_pos"]].max(axis=1)
    right = p["y_true"] == p["y_pred"]
    tp = p[right & (p["y_true"] == "pos")].sort_values("prob_pos", ascending=False, kind="stable")["patient_id"]
    err = p[~right].sort_values("conf", ascending=False, kind="stable")["patient_id"]
    n_bad = min(len(err), n // 2)
    n_good = min(len(tp), n - n_bad)
    n_bad = min(len(err), n - n_good)
    return tp.tolist()[:n_good] + err.tolist()[:n_bad]


@pytest.mark.slow
def test_binary_report_with_every_artefact(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run", head="fusion_mlp", modalities=("wsi", "omics"))
    (run / "modality_weights.json").write_text(json.dumps({"wsi": 0.7, "omics": 0.3}))
    shap = pd.DataFrame({"patient_id": ["P0000", "P0001"], "gene_ESR1": [0.5, -0.7], "gene_ERBB2": [0.1, 0.0],
                         "bias": [3.0, 3.0]})
    shap.to_csv(run / "shap.csv", index=False)
    pred = pd.read_csv(run / "predictions.csv")
    top3 = pred.sort_values("prob_pos", ascending=False)["patient_id"].head(3).tolist()
    _add_wsi(tmp_path, run, top3 + ["P0100"])

    out = report(run)
    assert out == run / "report.html"
    assert out.stat().st_mode & 0o777 == 0o644  # readable by others, unlike mkstemp's 0600
    text = out.read_text()
    _assert_self_contained(text)
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    for m in ("auroc", "f1_macro", "balanced_accuracy"):
        assert m in text and f"{metrics[m]['mean']:.3f}" in text and f"{metrics[m]['ci_low']:.3f}" in text
        assert all(f"{v:.3f}" in text for v in metrics[m]["per_fold"])
    for field in ("fusion_mlp", "classification", "enc-wsi", "enc-omics", "subtype", "Positive class"):
        assert field in text
    assert all(alt in text for alt in ("ROC curve", "precision-recall curve", "calibration curve",
                                       "confusion matrix", "modality weights", "SHAP summary"))
    assert "0.700" in text and "0.300" in text  # modality weights table
    shown = _showcase(pred, top3 + ["P0100"], 3)  # true positives by P(pos), then the most confident error
    for pid in shown:  # each gets a heatmap and its top tiles read from the slide
        assert f"attention heatmap {pid}/slide1" in text and f"top attention tiles {pid}/slide1" in text
    assert re.findall(r"<h3>Patient (P\d+) ", text) == shown
    # the Attention section only: the report's later sections (attributions, note windows) may say what is absent
    assert "absent" not in text.split("<h2>Attention</h2>")[1].split("<h2>")[0]
    assert text.count("data:image/png;base64,") == 6 + 2 * 3
    one = report(run, out=tmp_path / "one.html", attention_patients=1, top_tiles=2).read_text()
    assert one.count("alt='attention heatmap") == 1 and f"attention heatmap {shown[0]}/slide1" in one
    assert not (run / "one.html").exists() and (run / "report.html").exists()


def test_multiclass_report_without_optional_artefacts(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run", classes=("LumA", "LumB", "HER2", "TNBC"), n=160)
    text = report(run).read_text()
    _assert_self_contained(text)
    assert "one curve per class" in text
    assert "No <code>modality_weights.json</code>" in text
    assert "No <code>shap.csv</code>" in text
    assert "No <code>attention.csv</code>" in text
    # sections of artefacts other heads write are left out, listed once under "Not in this run"
    assert "<h2>Not in this run</h2>" in text
    assert all(f"<h2>{t}" not in text for t in ("Fusion modality weights", "SHAP summary", "Attention"))
    assert text.count("data:image/png;base64,") == 4


def test_survival_report_km_and_logrank(tmp_path: Path) -> None:
    run = survival_run(tmp_path / "run", n=150)
    text = report(run).read_text()
    _assert_self_contained(text)
    pred = pd.read_csv(run / "predictions.csv")
    groups, names = risk_groups(pred["risk"].to_numpy(), int(pred["event"].sum()))
    assert len(names) == 3  # 150 patients, ~100 events: tertiles
    p = multivariate_logrank_test(pred["time"], groups, pred["event"]).p_value
    assert f"p = {p:.4f}" in text or f"p = {p:.3g}" in text
    c = json.loads((run / "metrics.json").read_text())["metrics"]["c_index"]["mean"]
    assert f"{c:.3f}" in text and "tertiles" in text and "os_months / os_event" in text
    assert "Kaplan-Meier curves by risk group" in text
    assert "Multiclass" not in text and "ROC curve" not in text


def test_survival_report_leaves_out_classification_loss_params(tmp_path: Path) -> None:
    run = survival_run(tmp_path / "run", n=60, head="attention_mil")
    cfg_path = run / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["params"] = {"lr": 0.001, "loss": "ce", "focal_gamma": 2.0, "class_weight": "balanced"}
    cfg_path.write_text(json.dumps(cfg))
    header = report(run).read_text().split("<h2>Provenance</h2>")[1]
    assert "lr" in header and not any(k in header for k in ("focal_gamma", "class_weight", "balanced"))


def test_small_survival_run_uses_median_split(tmp_path: Path) -> None:
    text = report(survival_run(tmp_path / "run", n=24)).read_text()
    assert "median split" in text


def test_attention_without_reachable_slide_or_store(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run")
    store = _add_wsi(tmp_path, run, ["P0001"], with_slide=False)
    text = report(run).read_text()
    _assert_self_contained(text)
    assert "slide file not reachable" in text and "attention heatmap P0001/slide1" in text
    assert "top attention tiles" not in text
    import shutil

    shutil.rmtree(store)
    text = report(run).read_text()
    assert "is not reachable, so tile positions are unknown" in text


def test_broken_optional_artefacts_cost_only_their_section(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run")
    (run / "modality_weights.json").write_text("{not json")
    (run / "shap.csv").write_text("patient_id\nP0000\n")
    (run / "attention.csv").write_text("patient_id,item\nP0000,x\n")
    text = report(run).read_text()
    _assert_self_contained(text)
    assert "cannot read JSON" in text
    assert "<code>shap.csv</code> has no feature columns" in text
    assert "attention.csv could not be read" in text
    assert "ROC curve" in text


def test_missing_predictions_and_bad_run_dirs(tmp_path: Path) -> None:
    run = survival_run(tmp_path / "run")
    (run / "predictions.csv").unlink()
    text = report(run).read_text()
    assert "No <code>predictions.csv</code>" in text and "c_index" in text
    with pytest.raises(InputError, match="not a run directory"):
        report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a run directory"):
        report(tmp_path / "empty")
    bad = classification_run(tmp_path / "bad")
    pd.read_csv(bad / "predictions.csv").drop(columns="prob_pos").to_csv(bad / "predictions.csv", index=False)
    with pytest.raises(InputError, match="prob_pos"):
        report(bad)


@pytest.mark.slow
def test_report_on_a_real_attention_mil_run(tmp_path: Path) -> None:
    """Integration with `mmcli fit`: its attention.csv indexes the stored tiles the report draws."""
    fit_stage = pytest.importorskip("mmcli.stages.fit", reason="the fit stage has not landed yet")
    rng = np.random.default_rng(0)
    ids = [f"P{i:02d}" for i in range(16)]
    slide = write_slide(tmp_path / "slide.tif")
    xs, ys = np.meshgrid(np.arange(0, 1024, TILE), np.arange(0, 768, TILE))
    coords = np.c_[xs.ravel(), ys.ravel()]
    store = open_store(tmp_path / "store.zarr", "a")
    y = np.arange(16) % 2
    for pid, label in zip(ids, y):
        feats = rng.normal(size=(len(coords), 6)).astype(np.float32)
        feats[:4, 0] += 3 * label
        store.write_item("wsi", "enc-wsi", pid, "slide1", feats, coords,
                         {"source_fingerprint": {"path": str(slide)}, "patch_size": TILE, "mpp": 0.5})
    pd.DataFrame({"patient_id": ids, "y": np.where(y == 1, "pos", "neg")}).to_csv(tmp_path / "labels.csv",
                                                                                  index=False)
    run = tmp_path / "run"
    fit_stage.fit("attention_mil", tmp_path / "store.zarr", tmp_path / "labels.csv", run, target="y", folds=2,
                  params={"epochs": 2}, n_boot=20)
    text = report(run, attention_patients=2, top_tiles=4).read_text()
    _assert_self_contained(text)
    assert "attention_mil" in text and "enc-wsi" in text
    assert text.count("alt='attention heatmap") == 2 and text.count("alt='top attention tiles") == 2


def test_survival_attention_mil_report_has_heatmaps(tmp_path: Path) -> None:
    """Issue 15: attention_mil fitted with --time/--event gets the same heatmaps and top tiles as classification,
    patients ranked by out-of-fold risk, and the section says the ranking is by risk."""
    from mmcli.stages import fit as fit_stage

    rng = np.random.default_rng(1)
    ids = [f"P{i:02d}" for i in range(16)]
    slide = write_slide(tmp_path / "slide.tif")
    xs, ys = np.meshgrid(np.arange(0, 1024, TILE), np.arange(0, 768, TILE))
    coords = np.c_[xs.ravel(), ys.ravel()]
    store = open_store(tmp_path / "store.zarr", "a")
    risk = rng.normal(size=16)
    for pid, r in zip(ids, risk):
        feats = rng.normal(size=(len(coords), 6)).astype(np.float32)
        feats[:4, 0] += 2 * r
        store.write_item("wsi", "enc-wsi", pid, "slide1", feats, coords,
                         {"source_fingerprint": {"path": str(slide)}, "patch_size": TILE, "mpp": 0.5})
    time = np.exp(-risk) * 100 + rng.uniform(1, 5, 16)
    pd.DataFrame({"patient_id": ids, "time": time.round(2), "event": (np.arange(16) % 4 != 0).astype(int)}).to_csv(
        tmp_path / "labels.csv", index=False)
    run = tmp_path / "run"
    fit_stage.fit("attention_mil", tmp_path / "store.zarr", tmp_path / "labels.csv", run, time="time",
                  event="event", folds=2, params={"epochs": 2}, n_boot=20)
    att = pd.read_csv(run / "attention.csv")
    assert set(att["patient_id"]) == set(ids) and len(att) == 16 * len(coords)
    text = report(run, attention_patients=3, top_tiles=4).read_text()
    _assert_self_contained(text)
    assert text.count("alt='attention heatmap") == 3 and text.count("alt='top attention tiles") == 3
    # issue 29 item 2: the two highest-risk patients with an event (hits) and the lowest-risk one with an event
    # (a miss), each labelled, the risk given with its scale (log hazard ratio, percentile) and the outcome
    pred = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str})
    events = pred[pred["event"] == 1].sort_values("risk", ascending=False)["patient_id"].tolist()
    shown = re.findall(r"<h3>Patient (P\d+) <small>· ([^<]+)</small>", text)
    assert shown == [(events[0], "event, highest predicted risk #1"), (events[1], "event, highest predicted risk #2"),
                     (events[-1], "event, lowest predicted risk #1 (missed)")], shown
    said = re.findall(r"<p class='said'>(.*?)</p>", text)
    assert len(said) == 3 and "✗ missed" in said[2] and "✗" not in said[0] + said[1]
    assert all(re.search(r"risk [-0-9.e]+ \(log hazard ratio; \d+(st|nd|rd|th) percentile of the 16 out-of-fold "
                         r"risks, higher = shorter predicted survival\) · event at [0-9.]+", x) for x in said), said
    assert f"attention heatmap {events[0]}/slide1" in text
