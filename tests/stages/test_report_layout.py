"""report.html leads with the answer (issue 29 items 1-3): a banner for unpretrained encoders, the headline box
(primary metric, headline interval and what it covers, patients, classes or events, a reading), then the plots,
then the provenance; one calibration plot; legends off the curves; Kaplan-Meier high risk in red; no attribution
share of a single modality; attention patients chosen and labelled (most confident correct calls and errors).
The last test renders a report in headless Chromium and looks at the screenshot."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.fake_runs import classification_run, survival_run, write_slide
from mmcli.pipeline.store import open_store
from mmcli.stages.report import plots, report

TILE = 128


def _store_with_encoder(tmp_path: Path, run: Path, pretrained: bool | None, patients: list[str] | None = None) -> Path:
    """A store holding the run's wsi encoder (attrs ``pretrained``), one small slide per patient."""
    store = open_store(tmp_path / "store.zarr", "a")
    slide = write_slide(tmp_path / "slide.tif")
    xs, ys = np.meshgrid(np.arange(0, 1024, TILE), np.arange(0, 768, TILE))
    coords = np.c_[xs.ravel(), ys.ravel()]
    for pid in patients or ["P0000"]:
        store.write_item("wsi", "enc-wsi", pid, "slide1", np.zeros((len(coords), 4), np.float32), coords,
                         {"source_fingerprint": {"path": str(slide)}, "patch_size": TILE, "mpp": 0.5})
    attrs = {"encoder": "resnet50_trunc", "weights": "random initialisation (no pretrained weights)"}
    if pretrained is not None:
        attrs["pretrained"] = pretrained
    store.set_encoder_attrs("wsi", "enc-wsi", attrs)
    cfg = json.loads((run / "config.json").read_text())
    cfg["store"] = str(tmp_path / "store.zarr")
    (run / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "store.zarr"


def _h2(text: str) -> list[str]:
    return re.findall(r"<h2>([^<]+)</h2>", text)


# ---- item 1: the banner -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pretrained", [False, True, None])
def test_banner_for_unpretrained_encoders(tmp_path: Path, pretrained: bool | None) -> None:
    run = classification_run(tmp_path / "run", modalities=("wsi", "omics"))
    _store_with_encoder(tmp_path, run, pretrained)
    text = report(run).read_text()
    has = "class='banner'" in text
    assert has is (pretrained is False)
    if has:  # at the top, before the headline box, naming the encoder and the fix
        assert text.index("class='banner'") < text.index("class='headline'") < text.index("<h2>")
        banner = text.split("class='banner'")[1].split("</div>")[0]
        assert "wsi: <code>resnet50_trunc</code>" in banner and "mmcli doctor" in banner
        assert "random projections" in banner


def test_no_banner_when_the_store_is_gone(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run", store=str(tmp_path / "nowhere.zarr"))
    assert "class='banner'" not in report(run).read_text()


# ---- item 3: the headline box and the order of the page ---------------------------------------------------------
def test_headline_box_leads_with_the_primary_metric(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run", classes=("LumA", "LumB", "HER2", "TNBC"), n=160)
    met = json.loads((run / "metrics.json").read_text())
    m = met["metrics"]["auroc"]
    m.update(ci_t_low=0.61, ci_t_high=0.83, headline="ci_t")
    (run / "metrics.json").write_text(json.dumps(met))
    text = report(run).read_text()
    body = text.split("<body>")[1]
    box = body.split("class='headline'")[1].split("</div>\n")[0]
    assert body.index("class='headline'") < body.index("<h2>")  # before any section
    assert "macro AUROC (one vs rest)" in box and f"{m['mean']:.3f}" in box
    assert "95% CI [0.610, 0.830]" in box  # the headline interval (corrected t over folds), not the bootstrap
    assert "mean of 5 folds" in box and "covers training and test variability" in box
    pred = pd.read_csv(run / "predictions.csv")
    counts = pred["y_true"].value_counts()
    assert "160 patients; " + ", ".join(f"{c} {counts[c]}" for c in ("LumA", "LumB", "HER2", "TNBC")) in box
    assert "the interval lies above chance (0.5)" in box
    # then plots, then the provenance last
    order = _h2(text)
    assert order[:2] == ["Metrics", "Out-of-fold predictions"] and order[-1] == "Provenance"
    assert order.index("Not in this run") == len(order) - 2


def test_headline_reading_follows_the_interval(tmp_path: Path) -> None:
    run = survival_run(tmp_path / "run", n=90)
    met = json.loads((run / "metrics.json").read_text())
    met["metrics"]["c_index"].update(mean=0.55, ci_t_low=0.45, ci_t_high=0.65, headline="ci_t")
    (run / "metrics.json").write_text(json.dumps(met))
    text = report(run).read_text()
    box = text.split("class='headline'")[1].split("</div>\n")[0]
    pred = pd.read_csv(run / "predictions.csv")
    events = int(pred["event"].sum())
    assert "c-index (Harrell)" in box and "0.550" in box and "95% CI [0.450, 0.650]" in box
    assert f"90 patients; {events} events ({100 * events / 90:.0f}%), {90 - events} censored" in box
    assert "had the event first in 55%" in box and "includes chance (0.5)" in box


def test_one_calibration_plot(tmp_path: Path) -> None:
    """With a calibration block in metrics.json the reliability diagram is the only calibration plot."""
    run = classification_run(tmp_path / "run")
    without = report(run).read_text()
    assert without.count("alt='calibration curve'") == 1 and "Reliability" not in without
    met = json.loads((run / "metrics.json").read_text())
    met["calibration"] = {"method": "none", "what": "out-of-fold probabilities", "classes": {"pos": {
        "intercept": {"value": 0.1, "ci_low": -0.2, "ci_high": 0.4}, "slope": {"value": 0.9, "ci_low": 0.7,
                                                                             "ci_high": 1.1},
        "brier": 0.2, "mean_predicted": 0.5, "observed_rate": 0.5, "n": 120,
        "reliability": {"mean_predicted": [0.2, 0.5, 0.8], "observed": [0.25, 0.5, 0.75], "n": [40, 40, 40]}}}}
    (run / "metrics.json").write_text(json.dumps(met))
    text = report(run).read_text()
    assert "alt='calibration curve'" not in text and text.count("<h2>Calibration</h2>") == 1
    assert len(re.findall(r"alt='(calibration|reliability)[^']*'", text, re.I)) == 1


def test_absent_evidence_is_listed_once_not_as_sections(tmp_path: Path) -> None:
    text = report(survival_run(tmp_path / "run")).read_text()
    for name in ("Calibration", "Operating point", "Subgroups"):
        assert f"<h2>{name}</h2>" not in text
    lacking = text.split("<h2>Not in this run</h2>")[1].split("</section>")[0]
    assert "--subgroups COL[,COL]" in lacking and "--operating-point sens=0.9" in lacking


# ---- legends and colours -------------------------------------------------------------------------------------------
def _capture(monkeypatch: pytest.MonkeyPatch) -> list:
    figs: list = []
    monkeypatch.setattr(plots, "to_base64", lambda fig: figs.append(fig) or "")
    return figs


def test_legends_sit_below_the_axes(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROC, precision-recall, calibration and Kaplan-Meier legends are figure legends below the plotting area
    (drawn, their boxes do not overlap the axes)."""
    figs = _capture(monkeypatch)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    classes = ["a", "b", "c", "d"]
    plots.roc_figure(y, probs, classes)
    plots.pr_figure(y, probs, classes)
    plots.calibration_figure(y, probs, classes)
    plots.km_figure(rng.exponential(10, 200), rng.integers(0, 2, 200), rng.normal(size=200))
    for fig in figs:
        fig.canvas.draw()
        (ax,) = fig.axes
        assert ax.get_legend() is None and len(fig.legends) == 1
        legend = fig.legends[0].get_window_extent()
        axes = ax.get_window_extent()
        assert legend.y1 <= axes.y0, (fig.axes[0].get_title(), legend, axes)


def _pixels_near(png_b64: str, rgb: tuple[int, int, int], tol: int = 30) -> int:
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")).astype(int)
    return int((np.abs(img - np.array(rgb)).max(axis=2) < tol).sum())


def test_kaplan_meier_high_risk_is_red() -> None:
    rng = np.random.default_rng(1)
    risk = rng.normal(size=150)
    time = rng.exponential(20 * np.exp(-risk))
    png, info = plots.km_figure(time, (rng.random(150) < 0.7).astype(int), risk)
    assert info["groups"][-1] == "high risk"
    red, green = _pixels_near(png, (178, 24, 43)), _pixels_near(png, (44, 160, 44))
    assert red > 200 and green == 0  # matplotlib's default third colour (green) is gone


# ---- attributions of one modality -----------------------------------------------------------------------------------
def test_no_share_bar_for_a_single_modality(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run", modalities=("wsi",))
    rows = [{"patient_id": f"P{i:04d}", "modality": "wsi", "feature": "(sum)", "attribution": v}
            for i, v in enumerate(np.random.default_rng(0).normal(size=20))]
    pd.DataFrame(rows).to_csv(run / "attributions.csv", index=False)
    text = report(run).read_text()
    section = text.split("<h2>Attributions (integrated gradients)</h2>")[1].split("</section>")[0]
    assert "share is 1 by construction" in section and "alt='attribution shares'" not in section
    rows += [{"patient_id": f"P{i:04d}", "modality": "omics", "feature": "ESR1", "attribution": 0.1} for i in range(20)]
    pd.DataFrame(rows).to_csv(run / "attributions.csv", index=False)
    assert "alt='attribution shares'" in report(run).read_text()


# ---- item 2: which patients the attention section shows, and how they are headed ---------------------------------
def test_attention_showcase_correct_calls_and_errors_labelled(tmp_path: Path) -> None:
    """Six patients with attention, predictions written by hand: the two most confident correct calls and the most
    confident error are shown, in that order, each headed 'predicted X (p) · true Y', the error marked."""
    classes = ["LumA", "LumB", "TNBC"]
    rows = [  # patient, true, predicted, p(predicted)
        ("P0", "LumA", "LumA", 0.90), ("P1", "TNBC", "TNBC", 0.70), ("P2", "LumB", "LumB", 0.50),
        ("P3", "LumA", "LumB", 0.99), ("P4", "TNBC", "LumA", 0.60), ("P5", "LumB", "LumB", 0.40)]
    pred = []
    for pid, true, said, p in rows:
        probs = dict.fromkeys(classes, (1 - p) / 2)
        probs[said] = p
        pred.append({"patient_id": pid, "fold": 0, "y_true": true, "y_pred": said,
                     **{f"prob_{c}": v for c, v in probs.items()}})
    run = classification_run(tmp_path / "run", classes=classes, n=6, ids=[r[0] for r in rows], folds=2)
    pd.DataFrame(pred).to_csv(run / "predictions.csv", index=False)
    _store_with_encoder(tmp_path, run, True, [r[0] for r in rows])
    att = [{"patient_id": r[0], "item_id": "slide1", "index": i, "attention": 1.0 / (i + 1)}
           for r in rows for i in range(48)]
    pd.DataFrame(att).to_csv(run / "attention.csv", index=False)
    text = report(run, attention_patients=3, top_tiles=2).read_text()
    shown = re.findall(r"<h3>Patient (P\d) <small>· ([^<]+)</small></h3><p class='said'>(.*?)</p>", text)
    assert shown == [
        ("P0", "correct call, most confident #1", "predicted LumA (p = 0.90) · true LumA"),
        ("P1", "correct call, most confident #2", "predicted TNBC (p = 0.70) · true TNBC"),
        ("P3", "error, most confident #1",
         "<span class='wrong'>✗ misclassified</span> predicted LumB (p = 0.99) · true LumA"),
    ]
    assert "score 1" not in text and "true class" not in text


# ---- a real browser -------------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_report_renders_in_chromium_with_the_headline_on_the_first_screen(tmp_path: Path) -> None:
    """The page opens in headless Chromium (benchmarks/report_screenshots.py); the first 700 px of the screenshot
    show the banner (red) and the headline box (blue), and the page is taller than one screen."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from report_screenshots import screenshot

    run = classification_run(tmp_path / "run", modalities=("wsi", "omics"))
    _store_with_encoder(tmp_path, run, False)
    html = report(run)
    png = tmp_path / "shot.png"
    height = screenshot(CHROMIUM, html, png, width=1200)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[0] == height > 1500 and img.shape[1] == 1200
    top = img[:700]
    near = lambda rgb: (np.abs(top - np.array(rgb)).max(axis=2) < 6).sum()  # noqa: E731
    assert near((0xFD, 0xEC, 0xEA)) > 20_000  # the banner's background
    assert near((0xF0, 0xF6, 0xFB)) > 20_000  # the headline box's background
    assert near((0xB2, 0x18, 0x2B)) > 500 and near((0x2C, 0x7F, 0xB8)) > 500  # their left borders


def test_in_sample_patients_of_an_evaluation_are_said_in_the_box(tmp_path: Path) -> None:
    run = classification_run(tmp_path / "run")
    met = json.loads((run / "metrics.json").read_text())
    met["training_overlap"] = {"checked": True, "n": 7, "patients": [f"P{i:04d}" for i in range(7)]}
    (run / "metrics.json").write_text(json.dumps(met))
    box = report(run).read_text().split("class='headline'")[1].split("</div>\n")[0]
    assert "7 of these patients were in the training cohort" in box and "optimistic" in box


def test_percentile_ordinals() -> None:
    from mmcli.stages.report.attention import _ordinal

    assert [_ordinal(k) for k in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 97, 100)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "97th", "100th"]


def test_attention_showcase_of_a_regression_run(tmp_path: Path) -> None:
    """Regression: the closest predictions first, then the largest absolute error, in the target's unit."""
    rows = [("P0", 5.0, 5.1), ("P1", 2.0, 6.0), ("P2", 7.0, 6.0), ("P3", 3.0, 3.0)]  # patient, observed, predicted
    run = classification_run(tmp_path / "run", n=4, ids=[r[0] for r in rows], folds=2)
    for name in ("config.json", "metrics.json"):
        doc = json.loads((run / name).read_text())
        doc.update(task="regression", target="level")
        doc.pop("classes", None)
        (run / name).write_text(json.dumps(doc))
    pd.DataFrame([{"patient_id": p, "fold": 0, "y_true": y, "y_pred": v} for p, y, v in rows]).to_csv(
        run / "predictions.csv", index=False)
    _store_with_encoder(tmp_path, run, True, [r[0] for r in rows])
    pd.DataFrame([{"patient_id": r[0], "item_id": "slide1", "index": i, "attention": 1.0 / (i + 1)}
                  for r in rows for i in range(48)]).to_csv(run / "attention.csv", index=False)
    text = report(run, attention_patients=3, top_tiles=2).read_text()
    shown = re.findall(r"<h3>Patient (P\d) <small>· ([^<]+)</small></h3><p class='said'>(.*?)</p>", text)
    assert shown == [
        ("P3", "closest prediction #1", "predicted level 3 · observed 3 (error +0)"),
        ("P0", "closest prediction #2", "predicted level 5.1 · observed 5 (error +0.1)"),
        ("P1", "largest error #1", "<span class='wrong'>✗ far off</span> predicted level 6 · observed 2 (error +4)"),
    ]
