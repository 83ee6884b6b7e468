"""``mmcli run study.yaml`` (issue 29 item 12): one typed file validated against the CLI's Options models, unknown
keys refused with their path, the study written back resolved into every run folder, a replay of one run from
its folder giving the same numbers, a second run re-extracting nothing, and every fit checked before the first.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmcli.pipeline.errors import InputError
from mmcli.workflows.study_file import StudyError, load_study, resolved_doc

SLOW = pytest.mark.slow
MMCLI = [sys.executable, "-m", "mmcli.cli"]

BASE = {
    "out": "out",
    "cohort": {"synth": {"patients": 16, "seed": 0}},
    "extract": [{"modality": "wsi", "encoder": "timm:test_resnet", "patch_size": 32, "mpp": 4.0,
                 "precision": "fp32"}],
    "fit_defaults": {"folds": 2, "seed": 0, "drop_unmatched": True, "n_boot": 30},
    "fits": [{"name": "abmil", "head": "abmil", "target": "subtype", "params": {"epochs": 2}},
             {"name": "xgb", "head": "xgboost", "target": "subtype", "modalities": ["genes", "clinical"]}],
    "compare": [{"a": "abmil", "b": "xgb", "n_boot": 30}],
}


def _with(**changes: object) -> dict:
    doc = json.loads(json.dumps(BASE))
    doc.update(changes)
    return doc


def _error(doc: dict, tmp_path: Path) -> str:
    with pytest.raises(StudyError) as e:
        load_study(doc, base=tmp_path)
    assert isinstance(e.value, InputError) and e.value.exit_code == 2
    return str(e.value)


# ---- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,path,hint", [
    ({"fits": [{**BASE["fits"][0], "parms": {"epochs": 2}}]}, "fits[0].parms: unknown key", "did you mean params?"),
    ({"extract": [{"modality": "wsi", "patch_sise": 32}]}, "extract[0].patch_sise: unknown key",
     "did you mean patch_size?"),
    ({"cohort": {"synth": {"patiens": 10}}}, "cohort.synth.patiens: unknown key", "did you mean patients?"),
    ({"reports": {"top_tile": 3}}, "reports.top_tile: unknown key", "did you mean top_tiles?"),
    ({"fit_defaults": {"fold": 2}}, "fit_defaults.fold: unknown key", "did you mean folds?"),
    ({"ablations": [{"name": "a", "target": "subtype", "fusion": ["concat"]}]}, "ablations[0].fusion: unknown key",
     "did you mean fusions?"),
    ({"outt": "x"}, "outt: unknown key", "did you mean out?"),
])
def test_unknown_keys_are_refused_with_their_path(tmp_path: Path, change: dict, path: str, hint: str) -> None:
    text = _error(_with(**change), tmp_path)
    assert path in text and hint in text, text


@pytest.mark.parametrize("change,expect", [
    ({"fits": [{**BASE["fits"][0], "folds": 1}]}, r"fits\[0\] \(abmil\): --folds 1: .*greater than or equal to 2"),
    ({"fits": [{**BASE["fits"][0], "params": {"epochs": 0}}]}, r"fits\[0\] \(abmil\): .*epochs"),
    ({"fits": [{**BASE["fits"][0], "head": "abmill"}]}, r"fits\[0\]\.head: .*(?i:did you mean)"),
    ({"extract": [{"modality": "wsi", "mpp": -1}]}, r"extract\[0\]\.mpp: .*greater than 0"),
    ({"extract": [{"modality": "notez"}]}, r"extract\[0\]\.modality: "),
    ({"cohort": {"synth": {"patients": 3}}}, r"cohort\.synth\.patients: .*greater than or equal to 8"),
    ({"cohort": {"manifest": "m.csv"}}, r"cohort: .*manifest: needs labels:"),
    ({"compare": [{"a": "abmil", "b": "nope"}]}, r"compare\[0\]\.b: no fit named 'nope'"),
    ({"fits": [BASE["fits"][0], {**BASE["fits"][1], "name": "abmil"}]}, r"the name 'abmil' is used twice"),
    ({"fits": [{**BASE["fits"][0], "name": "a/b"}]}, r"fits\[0\]\.name: required, a folder name"),
])
def test_bad_values_name_the_key(tmp_path: Path, change: dict, expect: str) -> None:
    import re

    text = _error(_with(**change), tmp_path)
    assert re.search(expect, text), text


def test_every_problem_at_once(tmp_path: Path) -> None:
    doc = _with(fits=[{**BASE["fits"][0], "parms": {}}, {**BASE["fits"][1], "folds": 0}],
                extract=[{"modality": "wsi", "patch_sise": 3}])
    text = _error(doc, tmp_path)
    assert "fits[0].parms" in text and "fits[1] (xgb)" in text and "extract[0].patch_sise" in text


def test_the_same_options_models_as_the_cli(tmp_path: Path) -> None:
    """A fit is a FitOptions (head params in the head's Params model, evidence in EvidenceOptions), an
    extraction the modality's options model, with every default filled in and paths absolute."""
    from mmcli.features.wsi import WsiOptions
    from mmcli.heads.evaluation.options import EvidenceOptions
    from mmcli.heads.training.options import FitOptions

    study = load_study(_with(fits=[{**BASE["fits"][0], "evidence": {"subgroups": "site"}}], compare=[]), base=tmp_path)
    (step,) = study.fits
    assert isinstance(step.options, FitOptions) and isinstance(step.options.evidence, EvidenceOptions)
    assert step.options.head == "attention_mil" and step.options.params.epochs == 2  # alias resolved
    assert step.options.out == tmp_path / "out" / "runs" / "abmil" and step.options.folds == 2
    assert step.options.store == tmp_path / "out" / "features.zarr" and step.options.overwrite is True
    assert step.options.labels == tmp_path / "out" / "cohort" / "labels.csv"
    assert isinstance(study.extract[0].options, WsiOptions) and study.extract[0].options.patch_size == 32


def test_resolved_study_reads_back_to_itself(tmp_path: Path) -> None:
    """What is written into every run folder is a complete study: loading it gives the same resolved study."""
    doc = _with(ablations=[{"name": "abl", "target": "subtype", "subsets": "singles+all", "fusions": ["concat"]}],
                reports={"card": True})
    first = resolved_doc(load_study(doc, base=tmp_path))
    (tmp_path / "elsewhere").mkdir()
    again = resolved_doc(load_study(yaml.safe_load(yaml.safe_dump(first)), base=tmp_path / "elsewhere"))
    assert again == first
    assert first["fits"][0]["params"]["hidden"] == 64 and first["fits"][0]["evidence"]["min_subgroup"] == 10
    assert first["extract"][0]["min_tissue"] == 0.25 and Path(first["out"]).is_absolute()


def test_yaml_errors_name_the_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "study.yaml"
    f.write_text("out: x\ncohort: [unclosed\n")
    with pytest.raises(StudyError, match=r"study\.yaml: line \d+, column \d+: not valid YAML"):
        load_study(f)
    f.write_text("- a list\n")
    with pytest.raises(StudyError, match="a study file is a YAML mapping"):
        load_study(f)


def test_cli_exits_2_naming_the_key(tmp_path: Path) -> None:
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(_with(fits=[{**BASE["fits"][0], "parms": {}}])))
    r = subprocess.run([*MMCLI, "run", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "fits[0].parms: unknown key" in r.stderr and "Traceback" not in r.stderr
    ok = subprocess.run([*MMCLI, "run", "--check", str(_write(tmp_path, BASE))],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["fits"][1]["head"] == "xgboost"
    assert not (tmp_path / "out").exists()  # --check runs nothing


def _write(tmp_path: Path, doc: dict, name: str = "study.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(doc))
    return f


# ---- running ----------------------------------------------------------------------------------------------------
def test_every_fit_is_checked_before_the_first_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subgroup column that no table has, in the second fit, stops the study before the first fit runs."""
    import mmcli.stages.extract as extract_stage
    from mmcli.workflows import study as study_mod

    doc = _with(fits=[BASE["fits"][1], {**BASE["fits"][1], "name": "xgb2", "evidence": {"subgroups": "age2"}}],
                extract=[], compare=[])
    study = load_study(doc, base=tmp_path)
    monkeypatch.setattr(extract_stage, "extract", lambda *a, **k: pytest.fail("no modality to extract"))
    ran: list[str] = []
    with pytest.raises(InputError, match=r"fits xgb2: --subgroups: no column 'age2'"):
        study_mod.run_study(study, echo=lambda _: None, fit=lambda *a: ran.append("fit") or ({}, None))
    assert ran == [] and not (tmp_path / "out" / "runs").exists()


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The study run once through the CLI (a subprocess, as a user would), and its output."""
    d = tmp_path_factory.mktemp("study")
    f = _write(d, BASE)
    r = subprocess.run([*MMCLI, "run", str(f), "--no-progress"], capture_output=True,
                       text=True)
    return {"dir": d, "file": f, "run": r, "out": d / "out"}


@SLOW
def test_a_study_runs_end_to_end(ran: dict) -> None:
    r, out = ran["run"], ran["out"]
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("abmil", "xgb"):
        run = out / "runs" / name
        assert (run / "report.html").is_file() and (run / "metrics.json").is_file()
        head = (run / "study.yaml").read_text().splitlines()[1]
        assert f"Replay: mmcli run {run / 'study.yaml'} --only {name}" in head
        # one line per run with its headline metric and its report's path
        assert any(line.startswith(f"{name}: AUROC ") and line.endswith(f"-> {run / 'report.html'}")
                   for line in r.stdout.splitlines()), r.stdout
    assert (out / "compare" / "abmil-vs-xgb.json").is_file() and (out / "study.yaml").is_file()
    # fit progress passes through, indented and named
    assert any(line.startswith("   abmil: fold 1/2") for line in r.stdout.splitlines()), r.stdout


@SLOW
def test_a_replay_from_a_run_folder_gives_the_same_numbers_and_extracts_nothing(ran: dict) -> None:
    out = ran["out"]
    assert ran["run"].returncode == 0
    before = json.loads((out / "runs" / "xgb" / "metrics.json").read_text())["metrics"]
    abmil_mtime = (out / "runs" / "abmil" / "metrics.json").stat().st_mtime_ns
    r = subprocess.run([*MMCLI, "run", str(out / "runs" / "xgb" / "study.yaml"),
                        "--only", "xgb", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "runs" / "xgb" / "metrics.json").read_text())["metrics"] == before
    assert (out / "runs" / "abmil" / "metrics.json").stat().st_mtime_ns == abmil_mtime  # only xgb ran
    assert "0 file(s) written" in r.stdout  # synth left the cohort alone ...
    assert "wsi: done 0, cached 17" in r.stdout  # ... so no slide was extracted again
