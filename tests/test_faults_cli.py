"""Every verb's fault cases through the installed ``mmcli`` console script (issue 13): a bad or damaged model
file, store, labels, run folder or option exits with its code, one ``error:`` line that names the file and
the fix, and never a ``Traceback``. Also the two console-noise faults of stage 1: a corrupt slide (no
pending-asyncio reports, no tifffile lines) and an over-long note (cut at ``--max-note-chars``, recorded)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import tifffile

from helpers.planted_data import make_store
from helpers.slides import tissue_image, write_aperio, write_generic
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit

MMCLI = str(Path(sys.executable).with_name("mmcli"))
NOISE = ("Traceback", "Task was destroyed but it is pending", "Event loop is closed", "Jpeg8Error",
         "<tifffile.", "exception was never retrieved", "Logging error", "RuntimeWarning")


@dataclass
class World:
    root: Path
    store: Path  # binary: wsi + genes
    labels: Path
    surv_store: Path  # survival: genes
    surv_labels: Path
    runs: dict[str, Path]  # xgboost, fusion_mlp, cox


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    d = tmp_path_factory.mktemp("faults_cli")
    b = make_store(d / "s.zarr", n=16, task="binary", seed=41, modalities=("wsi", "genes"))
    b.labels.reset_index().to_csv(d / "labels.csv", index=False)
    s = make_store(d / "surv.zarr", n=16, task="survival", seed=42, modalities=("genes",))
    s.labels.reset_index().to_csv(d / "surv.csv", index=False)
    runs = {"xgboost": d / "runs" / "xgb", "fusion_mlp": d / "runs" / "fusion", "cox": d / "runs" / "cox"}
    common = dict(folds=2, n_boot=5)
    fit("xgboost", b.store, d / "labels.csv", runs["xgboost"], target="label", params={"n_estimators": 5}, **common)
    fit("fusion_mlp", b.store, d / "labels.csv", runs["fusion_mlp"], target="label", params={"epochs": 1}, **common)
    fit("cox", s.store, d / "surv.csv", runs["cox"], time="time", event="event", **common)
    (d / "afile").write_text("not a store\n")
    (d / "note.txt").write_text("ER positive.")
    (d / "notes.csv").write_text("patient_id,modality,path,item_id\nP1,text,note.txt,note\n")
    return World(d, b.store, d / "labels.csv", s.store, d / "surv.csv", runs)


# ---- damage --------------------------------------------------------------------------------------------------
def _copy(w: World, head: str, name: str) -> Path:
    dst = w.root / "damaged" / name
    shutil.copytree(w.runs[head], dst)
    return dst


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(path: Path, fn: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _damaged(head: str, name: str, how: Callable[[Path], None]) -> Callable[[World], Path]:
    def make(w: World) -> Path:
        run = _copy(w, head, name)
        how(run)
        return run

    return make


def _more_classes(doc: dict) -> None:
    doc["params"].update(n_classes=3, task="multiclass")


# ---- the cases -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    argv: Callable[[World], list[str]]
    code: int
    message: str  # regex searched in stderr


def _fit(w: World, **over: str) -> list[str]:
    args = {"--head": "xgboost", "--store": str(w.store), "--labels": str(w.labels),
            "--out": str(w.root / "new" / "run"), "--target": "label", "--folds": "2", "--n-boot": "5", **over}
    return ["fit", *[t for kv in args.items() for t in kv], "--param", "n_estimators=5"]


def _predict(run: Callable[[World], Path] | str, store: str = "store") -> Callable[[World], list[str]]:
    def argv(w: World) -> list[str]:
        model = w.runs[run] if isinstance(run, str) else run(w)
        return ["predict", "--model", str(model), "--store", str(getattr(w, store)),
                "--out", str(w.root / "pred" / f"{model.name}.csv")]

    return argv


FIX = r"Fix: restore the folder from where it came from, or re-run `mmcli fit`"
CASES = [
    # fit: store, labels, --out
    Case("fit store is a file", lambda w: _fit(w, **{"--store": str(w.root / "afile")}), 2, r"store"),
    Case("fit store missing", lambda w: _fit(w, **{"--store": str(w.root / "none.zarr")}), 2, r"none\.zarr"),
    Case("fit labels missing", lambda w: _fit(w, **{"--labels": str(w.root / "none.csv")}), 2, r"none\.csv"),
    Case("fit labels not a CSV of labels", lambda w: _fit(w, **{"--labels": str(w.root / "afile")}), 2,
         r"afile: no patient_id column"),
    Case("fit run exists", lambda w: _fit(w, **{"--out": str(w.runs["xgboost"])}), 2,
         r"already exists and is not empty.*Fix: pass --overwrite"),
    Case("fit out is a file", lambda w: _fit(w, **{"--out": str(w.root / "afile")}), 2, r"not a folder"),
    Case("fit out under a file", lambda w: _fit(w, **{"--out": str(w.root / "afile" / "run")}), 2,
         r"afile is a file, not a folder"),
    Case("fit overwrite a non-run", lambda w: _fit(w, **{"--out": str(w.root / "runs")}) + ["--overwrite"], 2,
         r"is not a run folder of `mmcli fit`"),
    Case("fit unknown head", lambda w: _fit(w, **{"--head": "svm"}), 2, r"unknown head 'svm'"),
    # predict: damaged model files, store, --out
    Case("predict run missing", _predict(lambda w: w.root / "no_run"), 2, r"no such run or model folder"),
    Case("predict weights cut", _predict(_damaged("fusion_mlp", "w_cut", lambda r: _cut(
        r / "model" / "weights.safetensors"))), 2, rf"weights\.safetensors: cannot be read \(SafetensorError.*{FIX}"),
    Case("predict weights missing", _predict(_damaged("fusion_mlp", "w_gone", lambda r: (
        r / "model" / "weights.safetensors").unlink())), 2, rf"weights\.safetensors: missing.*{FIX}"),
    Case("predict n_classes edited", _predict(_damaged("fusion_mlp", "ncls", lambda r: _edit_config(
        r / "model" / "config.json", _more_classes))), 2,
         rf"weights\.safetensors: does not fit the network config\.json describes \(size mismatch.*{FIX}"),
    Case("predict preprocess.json cut", _predict(_damaged("fusion_mlp", "pre_cut", lambda r: _cut(
        r / "model" / "preprocess.json"))), 2, rf"preprocess\.json: cannot be read \(JSONDecodeError.*{FIX}"),
    Case("predict preprocess.safetensors cut", _predict(_damaged("fusion_mlp", "pst_cut", lambda r: _cut(
        r / "model" / "preprocess.safetensors"))), 2, r"preprocess\.safetensors: cannot be read"),
    Case("predict cox.json cut", _predict(_damaged("cox", "cox_cut", lambda r: _cut(r / "model" / "cox.json")),
                                          "surv_store"), 2, rf"cox\.json: cannot be read \(JSONDecodeError.*{FIX}"),
    Case("predict xgboost model cut", _predict(_damaged("xgboost", "xgb_cut", lambda r: _cut(
        r / "model" / "model.json"))), 2, rf"model\.json: cannot be read \(XGBoostError.*{FIX}"),
    Case("predict xgboost model missing", _predict(_damaged("xgboost", "xgb_gone", lambda r: (
        r / "model" / "model.json").unlink())), 2, r"model\.json: missing"),
    Case("predict xgboost n_classes edited", _predict(_damaged("xgboost", "xgb_ncls", lambda r: _edit_config(
        r / "model" / "config.json", _more_classes))), 2, r"model\.json: holds a binary:logistic model"),
    Case("predict config cut", _predict(_damaged("xgboost", "cfg_cut", lambda r: _cut(
        r / "model" / "config.json"))), 2, rf"config\.json: cannot be read.*{FIX}"),
    Case("predict store is a file", lambda w: ["predict", "--model", str(w.runs["xgboost"]), "--store",
                                               str(w.root / "afile"), "--out", str(w.root / "p.csv")], 2, r"store"),
    Case("predict out is a folder", lambda w: ["predict", "--model", str(w.runs["xgboost"]), "--store",
                                               str(w.store), "--out", str(w.root)], 2, r"is a folder"),
    # report, compare: run folders
    Case("report run missing", lambda w: ["report", "--run", str(w.root / "no_run")], 2, r"not a run directory"),
    Case("report metrics cut", lambda w: ["report", "--run", str(_damaged("xgboost", "met_cut", lambda r: _cut(
        r / "metrics.json"))(w))], 2, r"metrics\.json: cannot read JSON"),
    Case("compare run missing", lambda w: ["compare", str(w.root / "no_run"), str(w.runs["xgboost"])], 2,
         r"not a run directory"),
    Case("compare predictions cut", lambda w: ["compare", str(_damaged("xgboost", "pred_cut", lambda r: _cut(
        r / "predictions.csv", 0.6))(w)), str(w.runs["xgboost"])], 2, r"predictions\.csv"),
    # extract / import / export / store / synth / ablate
    Case("extract manifest missing", lambda w: ["extract", "--modality", "text", "--manifest",
                                                str(w.root / "none.csv"), "--store", str(w.root / "n.zarr")], 2,
         r"none\.csv"),
    Case("extract bad max-note-chars", lambda w: ["extract", "--modality", "text", "--manifest",
                                                  str(w.root / "notes.csv"),
                                                  "--store", str(w.root / "n.zarr"), "--max-note-chars", "0"], 2,
         r"--max-note-chars"),
    Case("store info on a file", lambda w: ["store", "info", str(w.root / "afile")], 2, r"store"),
    Case("store verify missing", lambda w: ["store", "verify", str(w.root / "none.zarr")], 2, r"none\.zarr"),
    Case("export store missing", lambda w: ["export", "--format", "clam", "--store", str(w.root / "none.zarr"),
                                            "--out", str(w.root / "exp")], 2, r"none\.zarr"),
    Case("synth too few patients", lambda w: ["synth", "--out", str(w.root / "syn"), "--patients", "2"], 2,
         r"patients"),
    Case("ablate store missing", lambda w: ["ablate", "--store", str(w.root / "none.zarr"), "--labels",
                                            str(w.labels), "--out", str(w.root / "abl"), "--target", "label"], 2,
         r"none\.zarr"),
]


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([MMCLI, *argv], capture_output=True, text=True, timeout=timeout)


def test_every_verb_fault_exits_with_a_message_and_no_traceback(world):
    """All cases, four at a time (each is a fresh process); every failure is listed, not just the first."""
    argvs = [c.argv(world) for c in CASES]  # builds the damaged copies, in this process
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_run, argvs))
    bad = []
    for case, r in zip(CASES, results):
        out = r.stdout + r.stderr
        problems = [f"exit {r.returncode} != {case.code}"] if r.returncode != case.code else []
        if not re.search(case.message, r.stderr, re.S):
            problems.append(f"no /{case.message}/ in stderr")
        if "error:" not in r.stderr:
            problems.append("no 'error:' line")
        problems += [f"{n!r} in the output" for n in NOISE if n in out]
        if problems:
            bad.append(f"{case.name}: {'; '.join(problems)}\n    stderr: {r.stderr.strip()[-600:]}")
    assert not bad, "\n".join(bad)
    assert not (world.root / "new").exists()  # every fit failed before creating its --out


# ---- stage 1: a corrupt slide is one named failure, nothing else on the console ----------------------------
def _corrupt_one_tile(path: Path) -> None:
    with tifffile.TiffFile(path) as t:
        page = t.pages[0]
        i = len(page.dataoffsets) // 2
        off, n = page.dataoffsets[i], page.databytecounts[i]
    data = bytearray(path.read_bytes())
    for k in range(off + n // 4, off + n, 7):
        data[k] = (data[k] * 31 + 17) % 256
    path.write_bytes(bytes(data))


def test_corrupt_slides_fail_quietly(tmp_path):
    """One slide with a corrupt JPEG tile in a one-level TIFF (tiffslide decodes a thumbnail strip's many tiles as
    concurrent zarr tasks, which used to be left pending and reported at exit) and one cut short (tifffile
    logs about its broken page offsets): both are reported as failed items, and the console holds nothing
    else -- the library lines are in the command's log file."""
    write_generic(tmp_path / "bad_tile.tif", tissue_image(1024, 1024, 0.5, seed=3), 0.5, downsamples=(1,), tile=128)
    _corrupt_one_tile(tmp_path / "bad_tile.tif")
    write_aperio(tmp_path / "good.svs", tissue_image(384, 320, 0.5, seed=5), 0.5, downsamples=(1, 4))
    write_aperio(tmp_path / "cut.svs", tissue_image(800, 800, 0.5, seed=4), 0.5)
    _cut(tmp_path / "cut.svs")
    (tmp_path / "m.csv").write_text("patient_id,modality,path,item_id\nP1,wsi,bad_tile.tif,a\n"
                                    "P2,wsi,cut.svs,a\nP3,wsi,good.svs,a\n")
    store = tmp_path / "s.zarr"
    r = _run(["extract", "--modality", "wsi", "--manifest", str(tmp_path / "m.csv"), "--store", str(store),
              "--reader", "tiffslide", "--encoder", "timm:test_resnet", "--patch-size", "64", "--mpp", "1.0",
              "--precision", "fp32", "--no-progress"])
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "done 1, cached 0, failed 2" in r.stdout
    assert re.search(r"failed: P1/a .*bad_tile\.tif", r.stdout) and re.search(r"failed: P2/a .*cut\.svs", r.stdout)
    assert not [n for n in NOISE if n in out], out
    logs = list(store.with_name(store.name + ".runs").glob("extract-wsi-*.log"))
    assert len(logs) == 1 and "tifffile" in logs[0].read_text()  # kept, in the log file


# ---- stage 1: an over-long note is cut, with a warning and a record ------------------------------------------
def test_long_note_is_cut_at_max_note_chars_and_recorded(tmp_path):
    words = ["tumour", "margin", "clear", "ductal", "carcinoma", "grade", "two"]
    text = " ".join(words[i % len(words)] for i in range(1200))  # about 7,000 characters
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text("ER positive, PR negative.")
    (tmp_path / "m.csv").write_text("patient_id,modality,path,item_id\nP1,text,long.txt,note\n"
                                    "P2,text,short.txt,note\n")
    store = tmp_path / "notes.zarr"
    r = _run(["extract", "--modality", "text", "--manifest", str(tmp_path / "m.csv"), "--store", str(store),
              "--max-note-chars", "1000", "--device", "cpu", "--no-progress"])
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert f"long.txt: {len(text)} characters, only the first 1000 are encoded (--max-note-chars)" in out
    assert "short.txt" not in out and "Traceback" not in out
    fs = open_store(store, "r")
    (enc,) = fs.encoders("text")
    long_item, short_item = fs.read_item("text", enc, "P1", "note"), fs.read_item("text", enc, "P2", "note")
    assert long_item.attrs["text"]["truncated"] == {"chars_kept": 1000, "chars_original": len(text)}
    assert short_item.attrs["text"]["truncated"] is None
    assert long_item.attrs["options"]["max_note_chars"] == 1000
