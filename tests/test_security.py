"""Security: no pickle in the package or its artifacts, checkpoints read with ``weights_only=True``, ids
validated so that manifests, labels and stores cannot make mmcli write outside the store or run dir, and a
pseudonymised shared store holds none of the original ids or paths."""
from __future__ import annotations

import ast
import io
import json
import pickle
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import mmcli
from helpers.planted_data import make_store
from helpers.slides import tissue_image, write_aperio
from helpers.wsi_runs import OPTS, write_cohort
from mmcli.cli import app
from mmcli.features.encoders.image import load_state_dict
from mmcli.pipeline.store import open_store

PKG = Path(mmcli.__file__).parent
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
PICKLING_ATTRS = {"read_pickle", "to_pickle"}
PICKLE_HEADS = {b"\x80" + bytes([p]) for p in (2, 3, 4, 5)}
PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin"}


def _invoke(args: list[str]):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r


def _snapshot(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*")}


# ---- (a) the package source ----------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def pickle_findings(source: str, name: str = "<src>") -> list[str]:
    """Every pickle use in ``source``: pickling modules, pandas pickle I/O, ``np.load(allow_pickle=True)`` and
    ``torch.load`` without a literal ``weights_only=True``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in PICKLING_MODULES or (mod == "torch" and any(a.name == "load" for a in node.names)):
                out.append(f"{where}: from {mod} import ...")
        elif isinstance(node, ast.Attribute):
            if _dotted(node.value) in PICKLING_MODULES or node.attr in PICKLING_ATTRS:
                out.append(f"{where}: {_dotted(node)}")
        elif isinstance(node, ast.Call):
            fn = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            literal = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
            if fn in ("torch.load", "torch.serialization.load") and (literal.get("weights_only") is not True
                                                                     or None in kw):
                out.append(f"{where}: {fn} without weights_only=True")
            if fn in ("np.load", "numpy.load") and "allow_pickle" in kw and literal.get("allow_pickle") is not False:
                out.append(f"{where}: {fn}(allow_pickle=...)")
    return out


def test_package_source_uses_no_pickle_and_loads_weights_only() -> None:
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 30
    findings = [f for p in files for f in pickle_findings(p.read_text(), str(p.relative_to(PKG.parent)))]
    assert findings == []
    # non-vacuous: the package does load torch checkpoints, each one with weights_only=True
    loads = [p for p in files if "torch.load(" in p.read_text()]
    assert loads and all("weights_only=True" in p.read_text() for p in loads)


@pytest.mark.parametrize("bad", [
    "import pickle", "import joblib", "from pickle import loads", "import cloudpickle as cp",
    "pickle.dumps(x)", "df.to_pickle('f')", "pd.read_pickle('f')", "from torch import load",
    "torch.load('w.pth')", "torch.load('w.pth', weights_only=False)", "torch.load(p, **kw)",
    "np.load('a.npy', allow_pickle=True)", "numpy.load(f, allow_pickle=flag)",
])
def test_static_check_catches_each_pickle_use(bad: str) -> None:
    assert pickle_findings(bad)


def test_static_check_passes_safe_loads() -> None:
    assert pickle_findings("torch.load(p, map_location='cpu', weights_only=True)\nnp.load(f)\n"
                           "np.load(f, allow_pickle=False)\nimport json\njson.loads(s)") == []


# ---- (b) artifacts ---------------------------------------------------------------------------------------------
def _is_safetensors(data: bytes) -> bool:
    n = int.from_bytes(data[:8], "little")
    try:
        return 0 < n <= len(data) - 8 and isinstance(json.loads(data[8:8 + n]), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def pickle_problems(root: Path) -> list[str]:
    """Files under ``root`` that are (or hold) pickles: a protocol 2-5 header, a zip (torch.save) member that
    is a pickle, a pickle-ish suffix, or an .npy/.npz that needs allow_pickle."""
    out = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.suffix.lower() in PICKLE_SUFFIXES:
            out.append(f"{f}: pickle-style suffix")
        if data[:2] in PICKLE_HEADS and not _is_safetensors(data):
            out.append(f"{f}: pickle header")
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                out += [f"{f}!{m}: pickle in zip" for m in z.namelist()
                        if m.endswith(".pkl") or z.read(m)[:2] in PICKLE_HEADS]
        if f.suffix in (".npy", ".npz"):
            try:
                np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError:
                out.append(f"{f}: numpy file needs allow_pickle")
    return out


def h5_problems(path: Path) -> list[str]:
    """Datasets of an HDF5 store that are not plain numbers, attributes that are not text or numbers."""
    out: list[str] = []

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind not in "fiub":
            out.append(f"{name}: dtype {obj.dtype}")
        for k, v in obj.attrs.items():
            if not isinstance(v, (str, bytes, int, float, np.number, np.ndarray)) or (
                    isinstance(v, np.ndarray) and v.dtype.kind == "O"):
                out.append(f"{name}@{k}: {type(v).__name__}")

    with h5py.File(path, "r") as f:
        visit("/", f)
        f.visititems(visit)
    return out


def test_scanners_catch_pickles(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.weights")  # a zip holding data.pkl, under an innocent name
    (tmp_path / "p.json").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    save_file({"x": torch.zeros(160)}, str(tmp_path / "ok.safetensors"))
    found = " ".join(pickle_problems(tmp_path))
    assert "w.weights!" in found and "p.json: pickle header" in found and "o.npy" in found
    assert "ok.safetensors" not in found
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("s", data=np.array([b"a"], dtype=object), dtype=h5py.string_dtype())
    assert h5_problems(tmp_path / "x.h5")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store written with the store API and a run dir of every head, all under one folder."""
    root = tmp_path_factory.mktemp("artifacts")
    cls = make_store(root / "cls.zarr", n=16, task="binary", seed=1, dim=8, tiles=(4, 8))
    surv = make_store(root / "surv.h5", n=16, task="survival", seed=2, dim=8, tiles=(4, 8))
    cls.labels.reset_index().to_csv(root / "cls.csv", index=False)
    surv.labels.reset_index().to_csv(root / "surv.csv", index=False)
    cheap = ["--folds", "2", "--n-boot", "2"]
    runs = [("attention_mil", "cls", ["--target", "label", "--param", "epochs=1"]),
            ("fusion_mlp", "cls", ["--target", "label", "--param", "epochs=1"]),
            ("xgboost", "cls", ["--target", "label", "--param", "n_estimators=3"]),
            ("cox", "surv", ["--time", "time", "--event", "event"])]
    for head, data, args in runs:
        store = root / ("cls.zarr" if data == "cls" else "surv.h5")
        r = _invoke(["fit", "--head", head, "--store", store, "--labels", root / f"{data}.csv",
                     "--out", root / "runs" / head, *cheap, *args])
        assert r.exit_code == 0, r.output
    r = _invoke(["predict", "--model", root / "runs" / "attention_mil", "--store", root / "cls.zarr",
                 "--attention", "--out", root / "runs" / "scores.csv"])
    assert r.exit_code == 0, r.output
    return root


def test_fit_runs_and_stores_hold_no_pickle(fitted: Path) -> None:
    model_files = {f.name for f in (fitted / "runs").rglob("model/*")}
    assert {"weights.safetensors", "model.json", "config.json"} <= model_files  # torch heads and xgboost
    assert pickle_problems(fitted) == []
    assert h5_problems(fitted / "surv.h5") == []


@pytest.mark.slow
def test_extracted_store_holds_no_pickle(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path / "cohort", 2)
    for store in (tmp_path / "s.zarr", tmp_path / "s.h5"):
        r = _invoke(["extract", *OPTS, "--manifest", manifest, "--store", store])
        assert r.exit_code == 0, r.output
    assert pickle_problems(tmp_path) == []  # store, run records, locks, QC images
    assert h5_problems(tmp_path / "s.h5") == []


# ---- (c) ids: no path traversal ------------------------------------------------------------------------------
TRAVERSAL = ["../x", "../../etc/evil", "a/b", "..", "/tmp/evil_abs", "./x", "x\\..\\y"]


@pytest.mark.parametrize("column", ["patient_id", "item_id"])
@pytest.mark.parametrize("bad", TRAVERSAL)
def test_manifest_ids_cannot_escape_the_store(tmp_path: Path, bad: str, column: str) -> None:
    manifest = write_cohort(tmp_path / "cohort", 1)
    row = {"patient_id": "P0", "item_id": "a", column: bad}
    manifest.write_text(f'patient_id,modality,path,item_id\n"{row["patient_id"]}",wsi,S0.svs,"{row["item_id"]}"\n')
    before = _snapshot(tmp_path)
    r = _invoke(["extract", *OPTS, "--manifest", manifest, "--store", tmp_path / "out" / "s.zarr"])
    assert r.exit_code == 2 and f"unsafe {column}" in r.output and str(manifest) in r.output, r.output
    assert _snapshot(tmp_path) == before
    assert not Path("/tmp/evil_abs").exists()


def test_file_stem_as_item_id_is_validated_too(tmp_path: Path) -> None:
    """Without an item_id column the file stem names the item: a stem with a space is refused as well."""
    write_cohort(tmp_path / "cohort", 1)
    (tmp_path / "cohort" / "S0.svs").rename(tmp_path / "cohort" / "my slide.svs")
    manifest = tmp_path / "cohort" / "m.csv"
    manifest.write_text("patient_id,modality,path\nP0,wsi,my slide.svs\n")
    before = _snapshot(tmp_path)
    r = _invoke(["extract", *OPTS, "--manifest", manifest, "--store", tmp_path / "s.zarr"])
    assert r.exit_code == 2 and "taken from the file name" in r.output
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("bad", TRAVERSAL)
def test_label_ids_cannot_escape_the_run_dir(fitted: Path, tmp_path: Path, bad: str) -> None:
    labels = tmp_path / "labels.csv"
    rows = (fitted / "cls.csv").read_text().splitlines()
    rows[3] = f'"{bad}",' + rows[3].split(",", 1)[1]
    labels.write_text("\n".join(rows) + "\n")
    before = _snapshot(tmp_path)
    r = _invoke(["fit", "--head", "xgboost", "--store", fitted / "cls.zarr", "--labels", labels, "--target", "label",
                 "--out", tmp_path / "run", "--folds", "2"])
    assert r.exit_code == 2 and f"{labels}: line 4: unsafe patient_id" in r.output, r.output
    assert _snapshot(tmp_path) == before


def _crafted_stores(root: Path) -> list[Path]:
    """A Zarr and an HDF5 store with a key mmcli never writes (as if edited by hand or made by an attacker)."""
    z = root / "crafted.zarr"
    open_store(z).write_item("wsi", "enc", "P1", "a", np.ones((2, 4), np.float32), np.zeros((2, 2), np.int64))
    (z / "wsi" / "enc" / "P1").rename(z / "wsi" / "enc" / "=cmd|x")
    h = root / "crafted.h5"
    open_store(h).write_item("wsi", "enc", "P1", "a", np.ones((2, 4), np.float32), np.zeros((2, 2), np.int64))
    with h5py.File(h, "a") as f:
        f.move("wsi/enc/P1/a", "wsi/enc/P1/x y")
    return [z, h]


def test_crafted_store_keys_are_refused(tmp_path: Path) -> None:
    for store in _crafted_stores(tmp_path):
        (tmp_path / "labels.csv").write_text("patient_id,y\nP1,a\nP2,b\n")
        before = _snapshot(tmp_path)
        for args in (["store", "info", store], ["export", "--format", "clam", "--store", store, "--out",
                                                 tmp_path / "exp"],
                     ["fit", "--head", "attention_mil", "--store", store, "--labels", tmp_path / "labels.csv",
                      "--target", "y", "--out", tmp_path / "run"]):
            r = _invoke(args)
            assert r.exit_code == 2 and "mmcli never writes such a key" in r.output, (args, r.output)
        assert _snapshot(tmp_path) == before


# ---- (d) weights files with pickled code ---------------------------------------------------------------------
class _Payload:
    """Unpickling this object creates ``marker`` (as a real attack would run any code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_checkpoint_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    sd = timm.create_model("test_resnet", num_classes=0).state_dict()
    torch.save({"state_dict": sd, "extra": _Payload(str(marker))}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)  # control: a plain load does run the payload
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()

    manifest = write_cohort(tmp_path / "cohort", 1)
    before = _snapshot(tmp_path)
    r = _invoke(["extract", *OPTS, "--weights", tmp_path / "evil.pth", "--manifest", manifest,
                 "--store", tmp_path / "s.zarr"])
    assert r.exit_code == 2 and "weights_only=True" in r.output and "evil.pth" in r.output, r.output
    assert not marker.exists() and _snapshot(tmp_path) == before  # refused before any slide, nothing written


# ---- (e) a shared, pseudonymised store -----------------------------------------------------------------------
def test_shared_store_of_a_real_extraction_leaks_no_ids_or_paths(tmp_path: Path) -> None:
    """Ids, slide file names and every folder name (slides, store, weights) appear nowhere in the shared copy."""
    site, models, out = tmp_path / "Hospital_Smith", tmp_path / "dr_jones_models", tmp_path / "secret_site"
    for d in (site, models, out):
        d.mkdir()
    pids = ["TCGA-AA-0001", "TCGA-BB-0002"]
    rows = ["patient_id,modality,path,item_id"]
    for i, pid in enumerate(pids):
        write_aperio(site / f"{pid}_Smith_left.svs", tissue_image(384, 320, 0.5, seed=100 + i), 0.5, (1, 4))
        rows.append(f"{pid},wsi,{pid}_Smith_left.svs,{'scan' + str(i) if i else ''}")
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    weights = models / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()},
              str(weights))
    r = _invoke(["extract", *OPTS, "--weights", weights, "--manifest", site / "manifest.csv",
                 "--store", out / "s.zarr"])
    assert r.exit_code == 0, r.output
    original = b"".join(f.read_bytes() for f in (out / "s.zarr").rglob("*") if f.is_file())
    assert b"Hospital_Smith" in original and b"dr_jones_models" in original  # there is something to remove

    shared = tmp_path / "to_share" / "shared.zarr"
    r = _invoke(["store", "share", out / "s.zarr", shared, "--pseudonymize", tmp_path / "key.txt"])
    assert r.exit_code == 0, r.output
    blob = b"".join(f.read_bytes() + str(f.relative_to(shared)).encode() for f in shared.rglob("*") if f.is_file())
    secrets = [*pids, "AA-0001", "BB-0002", "scan1", "Smith", "Hospital", "dr_jones", "secret_site", "_left",
               str(tmp_path), tmp_path.name]
    assert [s for s in secrets if s.encode() in blob] == []
    s = open_store(shared, "r")
    keys = list(s.iter_items())
    assert len(keys) == 2 and all(k.patient_id.startswith("p-") and k.item_id.startswith("i-") for k in keys)
    item = s.read_item(*[getattr(keys[0], a) for a in ("modality", "encoder_id", "patient_id", "item_id")])
    assert item.features.shape[0] == item.coords.shape[0] > 0
    # issue 13: size / mtime / head hash would link the item back to its slide; only an HMAC under the key is kept
    assert item.attrs["weights_sha256"] and set(item.attrs["source_fingerprint"]) == {"hmac_sha256"}


# ---- (e) side files: crash logs, the report, the Dockerfile (issue 25, items 8 and 10) ---------------------------
def _crash(log_path: Path | None) -> tuple[str, Path]:
    """Run a command that crashes inside `handled` with no output folder; (its console output, its crash log)."""
    import re

    import typer

    from mmcli.cli import handled

    crash_app = typer.Typer()

    @crash_app.command()
    @handled(log=lambda kw: log_path)
    def boom() -> None:
        raise RuntimeError("patient P0042 broke it")

    @crash_app.command()
    def other() -> None:  # two commands, so `boom` is addressed by name
        pass

    r = CliRunner().invoke(crash_app, ["boom"])
    assert r.exit_code == 1 and "internal error" in r.output
    return r.output, Path(re.search(r"traceback in (\S+\.log)", r.output).group(1))


def test_crash_logs_go_to_a_private_per_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """They were written to a world-readable /tmp/mmcli-logs (0755 / 0644) with the patient ids in them."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    _, log = _crash(tmp_path / "never" / "cmd.log")
    assert log.parent == tmp_path / "state" / "mmcli" / "logs" and "P0042" in log.read_text()
    assert log.parent.stat().st_mode & 0o777 == 0o700 and log.stat().st_mode & 0o777 == 0o600


def test_a_planted_shared_tmp_folder_is_never_written_into(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No usable home: the fallback is $TMPDIR/mmcli-logs-<uid>; a link planted there by someone else is skipped,
    and an existing folder of ours that others could read is closed (0700)."""
    import os

    (tmp_path / "notadir").write_text("x")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "notadir"))  # cannot hold a folder
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "attacker").mkdir()
    planted = tmp_path / "tmp" / f"mmcli-logs-{os.getuid()}"
    planted.symlink_to(tmp_path / "attacker")
    _, log = _crash(None)
    assert not any((tmp_path / "attacker").iterdir()) and log.parent != planted
    assert log.parent.parent == tmp_path / "tmp" and log.parent.stat().st_mode & 0o777 == 0o700
    planted.unlink()
    planted.mkdir(mode=0o755)
    planted.chmod(0o755)
    _, log = _crash(None)
    assert log.parent == planted and planted.stat().st_mode & 0o777 == 0o700


def test_report_html_holds_no_absolute_paths(fitted: Path, tmp_path: Path) -> None:
    """report.html embedded the run folder's absolute path (and the store's and the labels'): a shared report
    told where the data lives."""
    import shutil

    run = tmp_path / "xgb"
    shutil.copytree(fitted / "runs" / "xgboost", run)
    r = _invoke(["report", "--run", run])
    assert r.exit_code == 0, r.output
    html = (run / "report.html").read_text()
    for root in {str(fitted), str(tmp_path), str(fitted.resolve()), str(Path.home())}:
        assert root not in html, root
    assert "cls.zarr" in html and "cls.csv" in html  # the names stay, as provenance


def test_dockerfile_publishes_on_loopback_and_signs_the_audit_log() -> None:
    text = (PKG.parent / "Dockerfile").read_text()
    runs = [line for line in text.splitlines() if "docker run" in line and "-p " in line]
    assert runs and all("-p 127.0.0.1:" in line for line in runs)
    assert "-p 8000:8000" not in text.replace("never `-p 8000:8000`", "")
    assert "TLS-terminating reverse proxy" in text and "docs/serving.md" in text
    cmd = text[text.index("CMD ["):]
    assert '"--audit-key"' in cmd and '"--token-file"' in cmd
