"""The run-folder module: what :class:`RunWriter` writes, :func:`load_run` reads back (labels that look like
formulas included), with ``schema_version`` checked on read."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmcli.pipeline.errors import InputError, RunFolderError
from mmcli.pipeline.rundir import SCHEMA_VERSION, RunWriter, load_run, read_metrics, resolve_model_dir

EVIL = "=cmd|' /C calc'!A0"


def _write(path: Path, classes: list[str], config_extra: dict | None = None, overwrite: bool = False) -> Path:
    ids = [f"P{i}" for i in range(6)]
    y = [classes[i % 2] for i in range(6)]
    p1 = np.linspace(0.1, 0.9, 6)
    pred = pd.DataFrame({"patient_id": ids, "fold": [0, 1] * 3, "y_true": y,
                         "y_pred": [classes[int(v > 0.5)] for v in p1],
                         f"prob_{classes[0]}": 1 - p1, f"prob_{classes[1]}": p1})
    w = RunWriter(path, overwrite=overwrite).begin()

    def save(folder: Path) -> None:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"head": "xgboost"}))
        (folder / "model.json").write_text("{}")

    config = {"head": "xgboost", "params": {"max_depth": 2}, "task": "classification", "problem": "binary",
              "target": "y", "classes": classes, "modalities": ["genes"], "encoder_ids": {"genes": "tabular"},
              "store": "/data/s.zarr", "seed": 0, **(config_extra or {})}
    w.write_model(save, config)
    w.write_predictions(pred)
    w.write_folds(dict(zip(ids, pred["fold"])))
    w.write_audit({"folds": []})
    w.write_shap(pd.DataFrame({"patient_id": ids, "-neg_gene": np.arange(6.0)}))
    w.finish(config, {"head": "xgboost", "task": "classification", "metrics": {"auroc": {"mean": 0.5}}})
    return path


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    run = load_run(_write(tmp_path / "run", ["neg", "pos"]))
    assert run.schema_version == SCHEMA_VERSION and run.config["schema_version"] == SCHEMA_VERSION
    assert run.task == "classification" and run.head == "xgboost" and run.classes == ["neg", "pos"]
    assert run.params == {"max_depth": 2} and run.store == "/data/s.zarr" and run.time_unit is None
    assert run.metrics == {"head": "xgboost", "task": "classification", "metrics": {"auroc": {"mean": 0.5}}}
    assert run.class_index().tolist() == [0, 1, 0, 1, 0, 1]
    model = json.loads((run.model_dir / "config.json").read_text())
    assert model["run"]["classes"] == ["neg", "pos"] and model["run"]["target"] == "y"
    assert resolve_model_dir(run.path) == run.model_dir and resolve_model_dir(run.model_dir) == run.model_dir
    assert read_metrics(run.path) == run.metrics
    assert not list(run.path.glob(".*"))  # no staging or temp files left
    assert [p.name for p in run.path.parent.iterdir()] == ["run"]  # nor a staging folder or lock beside it


def test_formula_labels_are_escaped_on_disk_and_round_trip(tmp_path: Path) -> None:
    run = load_run(_write(tmp_path / "run", [EVIL, "neg"]))
    raw = (run.path / "predictions.csv").read_text()
    cells = [c for line in raw.splitlines() for c in line.split(",")]
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), raw
    assert f"'{EVIL}" in raw
    assert run.classes == [EVIL, "neg"] and set(run.require_predictions()["y_true"]) == {EVIL, "neg"}
    assert run.class_index().tolist() == [0, 1, 0, 1, 0, 1]
    shap_header = (run.path / "shap.csv").read_text().splitlines()[0]
    assert shap_header == "patient_id,'-neg_gene"


def test_rewrite_replaces_the_whole_run(tmp_path: Path) -> None:
    """Was: begin() dropped stale explanation files of the earlier run. Now (issue 13) a rewrite needs
    ``overwrite`` and replaces the folder whole, so nothing of the earlier run (explanations, a report, a
    stray model file) is left beside the new one."""
    path = _write(tmp_path / "run", ["neg", "pos"])
    (path / "attention.csv").write_text("patient_id,item_id,index,attention\n")
    (path / "report.html").write_text("<html>old</html>")
    (path / "model" / "stale.bin").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="already exists and is not empty.*--overwrite"):
        RunWriter(path).begin()
    assert (path / "report.html").is_file()  # refused: untouched
    _write(path, ["neg", "pos"], overwrite=True)
    assert not (path / "attention.csv").exists() and not (path / "report.html").exists()
    assert not (path / "model" / "stale.bin").exists() and (path / "shap.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failed_model_save_leaves_the_old_run_and_no_staging(tmp_path: Path) -> None:
    """Was: a failed write_model left the old model/ in place. Now the whole old run stays as it was, and the
    staging folder and the lock are gone (the writer is a context manager)."""
    path = _write(tmp_path / "run", ["neg", "pos"])
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def broken(folder: Path) -> None:
        folder.mkdir()
        raise OSError("boom")

    with pytest.raises(OSError, match="boom"), RunWriter(path, overwrite=True) as w:
        w.write_model(broken, {})
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "run", ["neg", "pos"])
    cfg = json.loads((path / "config.json").read_text())
    cfg["schema_version"] = SCHEMA_VERSION + 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunFolderError, match=rf"schema_version {SCHEMA_VERSION + 1} was written by a newer mmcli.*"
                                             r"Fix: upgrade mmcli"):
        load_run(path)
    with pytest.raises(InputError, match="newer mmcli"):  # predict refuses it as well
        resolve_model_dir(path)
    cfg["schema_version"] = "one"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunFolderError, match="is not a run-folder schema version"):
        load_run(path)
    assert read_metrics(path) is None


def test_runs_without_schema_version_read_as_version_0(tmp_path: Path) -> None:
    path = _write(tmp_path / "run", ["neg", "pos"])
    cfg = json.loads((path / "config.json").read_text())
    del cfg["schema_version"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_run(path).schema_version == 0
