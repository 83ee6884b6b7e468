"""The demo's QuPath GeoJSON and survival attention steps (issue 15), run with the demo's own functions
(:func:`mmcli.workflows.demo.fit_and_report`, :func:`~mmcli.workflows.demo.export_attention_geojson`) on a small
synthetic demo cohort (``mmcli synth``), with a tiny encoder and short fits so that it runs in a test.

The GeoJSON is checked as a file QuPath reads: the JSON schema, shapely validity and winding of every polygon
(``helpers.geojson_check``), every tile inside the slide's level-0 bounds and at its stored coords, the tissue
outlines covering every tile, the attention of each tile equal to the run's ``attention.csv``; its preview PNG is
a real image. The survival attention_mil report carries attention heatmaps and top tiles of the synthetic slides.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from helpers.geojson_check import check_feature_collection
from mmcli.features.readers import open_slide
from mmcli.pipeline.store import open_store
from mmcli.stages.extract import extract
from mmcli.stages.synth import synth
from mmcli.workflows.demo import EXTRA_FITS, export_attention_geojson, fit_and_report

SLOW = pytest.mark.slow  # the demo fixture: a synthetic cohort, one extraction, two short fits (~4 min on 2 busy cores)

QUICK = {"epochs": 2}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("demo")
    cohort = synth(out / "cohort", patients=12, seed=0, workers=2)
    store = out / "features.zarr"
    summary = extract("wsi", cohort.manifest, store, encoder="timm:test_resnet", patch_size=32, mpp=4.0,
                      precision="fp32", progress=False)
    assert summary.exit_code == 0, summary.lines()
    runs = {}
    for name, head, task in [("attention_mil", "attention_mil", {"target": "subtype"}), *EXTRA_FITS]:
        fit_and_report(head, store, cohort.labels, out / "runs" / name, task, folds=2, seed=0, params=QUICK)
        runs[name] = out / "runs" / name
    return {"out": out, "store": store, **runs}


@SLOW
def test_demo_geojson_is_a_valid_qupath_file_over_its_slide(demo: dict[str, Path]) -> None:
    run = demo["attention_mil"]
    gj, png = export_attention_geojson(demo["store"], run, demo["out"] / "qupath")
    att = pd.read_csv(run / "attention.csv", dtype={"patient_id": str, "item_id": str})
    sizes = att.groupby(["patient_id", "item_id"]).size()
    pid, item = sizes.idxmax()  # the demo takes the slide with the most tiles
    assert gj.name == f"{item}.geojson" and gj.parent == demo["out"] / "qupath"
    assert [p.name for p in gj.parent.glob("*.geojson")] == [gj.name]  # one slide, not the cohort

    fc = json.loads(gj.read_text())
    tissue, tiles = check_feature_collection(fc)
    store = open_store(demo["store"], "r")
    eid = json.loads((run / "config.json").read_text())["encoder_ids"]["wsi"]
    it = store.read_item("wsi", eid, pid, item)
    assert len(tiles) == len(it.coords) == sizes.max() and tissue
    with open_slide(it.attrs["source_fingerprint"]["path"], "auto") as slide:
        w0, h0 = slide.dimensions
    bounds = shapely.box(0, 0, w0, h0)
    outline = shapely.unary_union([g for g, _ in tissue])
    size0 = it.attrs["patch_size_level0"]
    for (geom, _), (x, y) in zip(tiles, it.coords.tolist()):
        assert geom.equals(shapely.box(x, y, x + size0, y + size0))  # at its stored level-0 coords
        assert bounds.covers(geom), (geom.bounds, (w0, h0))
        assert outline.covers(geom)  # the tissue contours cover every tile
    # each tile carries its out-of-fold attention from attention.csv
    want = att[(att["patient_id"] == pid) & (att["item_id"] == item)].set_index("index")["attention"]
    got = pd.Series({p["measurements"]["tile_index"]: p["measurements"]["attention"] for _, p in tiles})
    assert np.allclose(got.sort_index().to_numpy(), want.sort_index().to_numpy())
    # the outline is the tile union, so its area is the covered area: no tissue polygon without tiles
    assert outline.area == pytest.approx(shapely.unary_union([g for g, _ in tiles]).area)

    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) >= 400
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.std() > 10  # a drawn picture (thumbnail + tiles), not a blank canvas


@SLOW
def test_demo_survival_attention_report_has_heatmaps(demo: dict[str, Path]) -> None:
    run = demo["attention_mil_survival"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["task"] == "survival" and cfg["time"] == "time" and cfg["event"] == "event"
    text = (run / "report.html").read_text()
    assert "the highest-risk patients who had the event" in text
    heatmaps = re.findall(r"alt='attention heatmap ([^/']+)/([^']+)'", text)
    assert len({pid for pid, _ in heatmaps}) == 3  # three patients, each with every slide it has
    tops = re.findall(r"alt='top attention tiles ([^/']+)/([^']+)'", text)
    assert tops == heatmaps  # the slides are reachable: tile images for every heatmap
    assert re.search(r"risk [-0-9.e]+ \(log hazard ratio; \d+(st|nd|rd|th) percentile", text)
    assert "slide file not reachable" not in text


def test_a_stopped_extraction_stops_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM (or a full disk) that stops an extraction stops the demo with the run's exit code, instead of
    fitting every head on a partial store (seen: a SIGTERM mid-WSI left 84 of 177 slides unextracted and the demo
    went on to the next modality)."""
    import mmcli.stages.extract as extract_stage
    import mmcli.stages.fit as fit_stage
    import mmcli.stages.synth as synth_stage
    from mmcli.features.runner import RunSummary
    from mmcli.workflows import demo as demo_stage

    calls = []
    monkeypatch.setattr(synth_stage, "synth", lambda out, **_: SimpleNamespace(
        out_dir=Path(out), manifest=Path(out) / "manifest.csv", labels=Path(out) / "labels.csv", tables={},
        patients=8, written=0, unchanged=0))

    def stopped(modality: str, *_: object, **__: object) -> RunSummary:
        calls.append(modality)
        return RunSummary(modality, "enc", "s.zarr", [], 1.0, "in-process", stopped="SIGTERM: 0 item(s) abandoned "
                          "unwritten, 84 not started.", signal=15)

    monkeypatch.setattr(extract_stage, "extract", stopped)
    monkeypatch.setattr(fit_stage, "fit", lambda *a, **k: pytest.fail("fitted after a stop"))
    assert demo_stage.run_demo(tmp_path / "demo", patients=8) == 143
    assert calls == ["wsi"] and not (tmp_path / "demo" / "demo_results.json").exists()


def test_the_headline_tables_fit_80_columns() -> None:
    """Issue 29 item 5: the heads x metrics table was cut at 80-120 columns ("attentio…", intervals cut). The
    demo's tables (one per task, metrics as rows, runs as columns) render at 80 columns with every value and
    interval whole and no ellipsis."""
    from rich.console import Console

    from mmcli.workflows.demo import tables
    from mmcli.workflows.study import StudyResult

    def m(v: float) -> dict:
        return {"mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "ci_t_low": v - 0.05, "ci_t_high": v + 0.05,
                "per_fold": [v] * 5, "headline": "ci_t"}

    cls = {k: m(0.5 + i / 10) for i, k in enumerate(("auroc", "auprc", "f1_macro", "balanced_accuracy", "brier"))}
    surv = {k: m(0.6) for k in ("c_index", "ibs", "td_auc")}
    res = StudyResult(fits={"attention_mil": {"task": "classification", "metrics": cls},
                            "fusion_mlp": {"task": "classification", "metrics": cls},
                            "xgboost": {"task": "classification", "metrics": cls},
                            "cox": {"task": "survival", "metrics": surv},
                            "attention_mil_survival": {"task": "survival", "metrics": surv}})
    for width in (80, 120):
        console = Console(width=width, record=True, color_system=None)
        for caption, t in tables(res):
            console.print(caption)
            console.print(t)
        text = console.export_text()
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
        for value in ("0.500", "[0.45, 0.55]", "0.900", "[0.85, 0.95]", "0.600", "[0.55, 0.65]"):
            assert value in text, (width, value)
        flat = text.replace("│", " ").split()
        for name in ("attention_mil", "fusion_mlp", "xgboost", "cox", "balanced_accuracy"):
            assert name in flat, (width, name)
