"""Model card (``mmcli report --card``): cohort summary, encoders' pretraining, metrics, limitations that follow
the run (random-init encoders, synthetic data, small n, unreachable store), and the model hash."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers.planted_data import make_store
from mmcli.cli import app as cli_app
from mmcli.heads.card import CARD_JSON, CARD_MD, SYNTH_MARKER, build_card, card_markdown, model_sha256
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit
from mmcli.stages.synth import MARKER


@pytest.fixture(scope="module")
def xgb_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    p = make_store(d / "s.zarr", n=24, task="binary", seed=31, modalities=("wsi", "genes"))
    labels = p.labels.reset_index()
    labels = pd.concat([labels, pd.DataFrame({"patient_id": ["GHOST1"], "label": ["pos"]})])  # not in the store
    (d / "labels").mkdir()
    labels.to_csv(d / "labels" / "labels.csv", index=False)
    fit("xgboost", p.store, d / "labels" / "labels.csv", d / "run", target="label", folds=2, n_boot=5,
        params={"n_estimators": 5})
    return p, d


def _copy_run(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "config.json").read_text())
    doc.update(config)
    (dst / "config.json").write_text(json.dumps(doc))
    return dst


def test_synth_marker_name_is_the_synth_stages():
    assert SYNTH_MARKER == MARKER


def test_report_card_writes_json_and_markdown(xgb_run):
    _, d = xgb_run
    res = CliRunner().invoke(cli_app, ["report", "--run", str(d / "run"), "--card"])
    assert res.exit_code == 0, res.output
    assert (d / "run" / "report.html").is_file()
    card = json.loads((d / "run" / CARD_JSON).read_text())
    assert card == json.loads(json.dumps(build_card(d / "run")))
    md = (d / "run" / CARD_MD).read_text()
    assert md == card_markdown(card)
    for heading in ("## Intended use", "## Data", "## Encoders", "## Metrics", "## Calibration", "## Limitations"):
        assert heading in md
    auroc = card["metrics"]["auroc"]
    # issue 24 item 3: the headline interval (corrected t over folds) first, then the fold-model bootstrap
    assert "| metric | mean of 2 folds | 95% CI: corrected t over folds | 95% CI: bootstrap, models fixed |" in md
    assert (f"| auroc | {auroc['mean']:.3f} | [{auroc['ci_t_low']:.3f}, {auroc['ci_t_high']:.3f}] | "
            f"[{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}] |") in md
    assert "P0" not in md and "P0" not in json.dumps(card) and "GHOST" not in json.dumps(card)  # no patient ids
    assert str(d) not in json.dumps(card)  # no paths


def test_card_summarises_cohort_encoders_and_limitations(xgb_run):
    p, d = xgb_run
    card = build_card(d / "run")
    data = card["data"]
    assert data["n_patients"] == 24 and sum(data["classes"].values()) == 24
    assert data["classes"] == p.labels["label"].value_counts().to_dict()
    assert data["excluded_patients"] == {"not_in_store": 1}
    assert data["modalities"] == ["wsi", "genes"] and data["coverage"] == {"wsi": 24, "genes": 24}
    assert data["synthetic"] is False
    assert [(e["modality"], e["pretrained"]) for e in card["encoders"]] == [("wsi", "unknown"),
                                                                           ("genes", "not applicable")]
    assert card["model"]["head"] == "xgboost" and card["model"]["target"] == "label"
    assert card["model"]["model_sha256"] == model_sha256(d / "run" / "model")
    # every classification run reports calibration (slope / intercept of its probabilities, no recalibration here)
    assert card["calibration"]["method"] == "none" and card["subgroups"] is None and card["operating_point"] is None
    text = " ".join(card["limitations"])
    assert "Small cohort (n = 24)" in text and "['wsi'] was pretrained is unknown" not in text
    assert "Whether the encoders for ['wsi'] were pretrained is unknown" in text
    assert "1 patients were left out" in text and "Calibration not assessed" in text
    assert "synthetic" not in text


def test_random_init_encoders_and_synthetic_data_are_limitations(xgb_run, tmp_path):
    p, d = xgb_run
    store = tmp_path / "s.zarr"
    shutil.copytree(p.store, store)
    open_store(store, "a").set_encoder_attrs("wsi", "enc-wsi", {"encoder": "resnet50_trunc", "pretrained": False})
    (tmp_path / "cohort").mkdir()
    shutil.copy(d / "labels" / "labels.csv", tmp_path / "cohort" / "labels.csv")
    (tmp_path / "cohort" / MARKER).write_text("{}")
    run = _copy_run(d / "run", tmp_path / "run", store=str(store), labels=str(tmp_path / "cohort" / "labels.csv"))
    card = build_card(run)
    assert card["encoders"][0] == {"modality": "wsi", "encoder_id": "enc-wsi", "encoder": "resnet50_trunc",
                                   "pretrained": False, "licence": None, "licence_terms": None, "gated": None}
    assert card["data"]["synthetic"] is True
    text = " ".join(card["limitations"])
    assert "Random-init encoders for ['wsi']" in text and "Trained on synthetic data" in text
    assert "synthetic data: yes" in card_markdown(card)


def test_unreachable_store_makes_pretraining_and_provenance_unknown(xgb_run, tmp_path):
    _, d = xgb_run
    run = _copy_run(d / "run", tmp_path / "run", store=str(tmp_path / "gone.zarr"),
                    labels=str(tmp_path / "x" / "l.csv"))
    card = build_card(run)
    assert card["encoders"][0]["pretrained"] == "unknown" and card["data"]["coverage"] is None
    assert card["data"]["synthetic"] is None
    assert "Data provenance unknown" in " ".join(card["limitations"])
    assert card["model"]["model_sha256"] == model_sha256(d / "run" / "model")  # location does not matter


def test_encoder_licence_is_recorded_at_fit_and_shown_without_the_store(xgb_run, tmp_path):
    """Issue 27 item 11: the encoder's licence reaches the model card (and serve's /model, which returns it) from
    what fit recorded, so it survives the training store going away; a restrictive licence is a limitation."""
    p, d = xgb_run
    store = tmp_path / "s.zarr"
    shutil.copytree(p.store, store)
    terms = "non-commercial academic research only"
    open_store(store, "a").set_encoder_attrs("wsi", "enc-wsi", {
        "encoder": "uni", "pretrained": True, "licence": "CC-BY-NC-ND-4.0", "licence_terms": terms, "gated": True})
    fit("xgboost", store, d / "labels" / "labels.csv", tmp_path / "run", target="label", folds=2, n_boot=5,
        params={"n_estimators": 5})
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["encoder_provenance"]
    assert recorded == {"wsi": {"encoder": "uni", "pretrained": True, "licence": "CC-BY-NC-ND-4.0",
                                "licence_terms": terms, "gated": True}, "genes": {}}
    shutil.rmtree(store)
    card = build_card(tmp_path / "run")
    wsi = card["encoders"][0]
    assert (wsi["encoder"], wsi["pretrained"], wsi["licence"], wsi["gated"]) == ("uni", True, "CC-BY-NC-ND-4.0", True)
    assert card["encoders"][1]["licence"] is None
    text = " ".join(card["limitations"])
    assert f"wsi: uni (CC-BY-NC-ND-4.0: {terms})" in text and "derivatives" in text
    assert "| wsi | enc-wsi | uni | True | CC-BY-NC-ND-4.0 |" in card_markdown(card)


def test_model_sha256_follows_the_model_files(xgb_run, tmp_path):
    _, d = xgb_run
    model = tmp_path / "model"
    shutil.copytree(d / "run" / "model", model)
    before = model_sha256(model)
    assert before == model_sha256(d / "run" / "model")
    f = sorted(p for p in model.iterdir() if p.is_file())[0]
    f.write_bytes(f.read_bytes() + b" ")
    assert model_sha256(model) != before
    f.rename(f.with_name("renamed_" + f.name))
    assert model_sha256(model) != before


def test_survival_card_counts_events_and_a_model_folder_alone_works(tmp_path):
    p = make_store(tmp_path / "s.zarr", n=24, task="survival", seed=32, modalities=("genes",))
    fit("xgboost", p.store, p.labels, tmp_path / "run", time="time", event="event", folds=2, n_boot=5,
        params={"n_estimators": 5})
    card = build_card(tmp_path / "run")
    surv = card["data"]["survival"]
    assert surv["events"] == int(p.labels["event"].sum()) and surv["events"] + surv["censored"] == 24
    assert card["model"]["task"] == "survival" and card["model"]["time"] == "time"
    assert "Few events" in " ".join(card["limitations"])
    assert build_card(tmp_path / "run" / "model") == card  # the model folder finds its run
    shutil.copytree(tmp_path / "run" / "model", tmp_path / "exported")
    bare = build_card(tmp_path / "exported")  # no run folder: what the model's own config says
    assert bare["metrics"] is None and bare["model"]["model_sha256"] == card["model"]["model_sha256"]
    assert bare["model"]["features_sha256"] == card["model"]["features_sha256"]
    with pytest.raises(InputError, match="not a run folder or model folder"):
        build_card(tmp_path)


HOSTILE = ["<img src=x onerror=alert(1)>", "[click](javascript:alert(1))"]


def test_hostile_class_labels_are_shown_as_text_not_run(tmp_path):
    """Issue 25 (10): model_card.md wrote class labels unescaped, so `<img src=x onerror=...>` ran when the card
    was rendered. Rendered with raw HTML allowed (as GitHub and most viewers do), the labels now stay text."""
    from markdown_it import MarkdownIt

    from helpers.serving import FIT_ARGS, TABLE_IDS, table_store
    from mmcli.heads.card import write_card

    store, labels = table_store(tmp_path)
    pd.DataFrame({"patient_id": TABLE_IDS, "y": [HOSTILE[i % 2] for i in range(len(TABLE_IDS))]}).to_csv(
        labels, index=False)
    res = CliRunner().invoke(cli_app, ["fit", "--store", str(store), "--labels", str(labels), "--out",
                                       str(tmp_path / "run"), *FIT_ARGS])
    assert res.exit_code == 0, res.output
    md_path, js_path = write_card(tmp_path / "run")
    assert sorted(json.loads(js_path.read_text())["model"]["classes"]) == sorted(HOSTILE)  # JSON keeps them as-is
    md = md_path.read_text()
    outside_code = "".join(md.split("```")[::2])  # the JSON blocks are code: shown verbatim
    assert "<img" not in outside_code and "](javascript" not in outside_code
    html = MarkdownIt("commonmark", {"html": True}).render(md)
    assert "<img" not in html and "href=" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown, as text
    assert "[click](javascript:alert(1))" in html


def test_markdown_escaping_keeps_plain_labels_readable():
    from markdown_it import MarkdownIt

    from mmcli.heads.card import _fenced, _md

    for text in ("a_b*c_d", "x | y", "#1 `code`", "~~no~~", "a&b"):
        html = MarkdownIt("commonmark").render(f"- {_md(text)}")
        assert html == f"<ul>\n<li>{text.replace('&', '&amp;')}</li>\n</ul>\n", (text, html)
    block = _fenced('{"label": "```\\n<img src=x>"}')
    html = MarkdownIt("commonmark", {"html": True}).render(block)
    assert "<img" not in html and html.startswith("<pre><code")
