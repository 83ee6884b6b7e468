"""A tiny WSI cohort and ways to run ``mmcli extract`` on it, for the crash, concurrency and cluster tests.

Slides are 384 x 320 µm Aperio files; with ``OPTS`` (``timm:test_resnet``, 32 px tiles at 1 µm/px, batches of
8, fp32, seed 0) each slide gives 18 tiles in three batches, so every slide has a point between two batches.
Every run, in this process or a child, uses ``THREADS`` torch threads (fp32 convolutions differ in the last bits
between thread counts, and other tests may change this process's count). Features are compared bit for bit up to
one float16 ulp: even at a fixed thread count, oneDNN may pick another fp32 kernel in another process, and a
value next to a float16 rounding boundary then lands on the neighbouring float16. The cohort and its clean
extraction are built once per session by the ``wsi_cohort`` / ``wsi_clean`` fixtures of ``tests/conftest.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from typer.testing import CliRunner

from helpers.slides import tissue_image, write_aperio
from mmcli.cli import app
from mmcli.features.runner import lock_dir
from mmcli.pipeline.store import open_store

THREADS = 2
MMCLI = str(Path(sys.executable).with_name("mmcli"))
OPTS = ["--modality", "wsi", "--encoder", "timm:test_resnet", "--patch-size", "32", "--mpp", "1.0",
        "--batch-size", "8", "--min-tissue-area", "2000", "--precision", "fp32", "--seed", "0", "--no-progress"]


COHORT_SIZE = 5  # slides of the session-wide cohort (the ``wsi_cohort`` fixture of tests/conftest.py)


def write_cohort(folder: Path, n: int = COHORT_SIZE) -> Path:
    """``n`` slides ``S<i>.svs`` of patients ``P<i>`` (item ``a``) and ``manifest.csv``; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["patient_id,modality,path,item_id"]
    for i in range(n):
        write_aperio(folder / f"S{i}.svs", tissue_image(384, 320, 0.5, seed=100 + i), 0.5, downsamples=(1, 4))
        rows.append(f"P{i},wsi,S{i}.svs,a")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def child_env(**extra: str | None) -> dict[str, str]:
    """This environment for a child process: ``THREADS`` torch threads, no fault unless given."""
    env = {k: v for k, v in os.environ.items() if k != "MMCLI_FAULT"}
    env["OMP_NUM_THREADS"] = str(THREADS)
    for k, v in extra.items():
        if v is not None:
            env[k] = v
    return env


def wait_stopped(p: subprocess.Popen, limit_s: float = 300) -> None:
    """Block until child ``p`` has stopped itself (``MMCLI_FAULT=...:stop``); fail if it exits or never gets there."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        pid, status = os.waitpid(p.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            assert os.WIFSTOPPED(status), f"the child ended (status {status}) instead of stopping at its fault point"
            return
        time.sleep(0.05)
    raise AssertionError("the child never reached its stop point")


def extract_cmd(manifest: Path, store: Path, *args: str) -> list[str]:
    return [MMCLI, "extract", *OPTS, "--manifest", str(manifest), "--store", str(store), *args]


@dataclass
class Run:
    pid: int
    returncode: int
    stdout: str
    stderr: str


def extract_subprocess(manifest: Path, store: Path, fault: str | None = None, *args: str,
                       timeout: float = 300) -> Run:
    """``mmcli extract`` in a child process (``fault``: its ``MMCLI_FAULT``); waits for it to end."""
    p = subprocess.Popen(extract_cmd(manifest, store, *args), env=child_env(MMCLI_FAULT=fault),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return Run(p.pid, p.returncode, out, err)


def extract_in_process(manifest: Path, store: Path, *args: str):
    """``mmcli extract`` through the CLI in this process (fast: torch and the encoder are already loaded)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return CliRunner().invoke(app, ["extract", *OPTS, "--manifest", str(manifest), "--store", str(store), *args])
    finally:
        torch.set_num_threads(prev)


def record_of(output: str) -> dict:
    """The run record JSON named on the last ``run record:`` line of an extract's output."""
    line = [x for x in output.splitlines() if x.startswith("run record: ")][-1]
    return json.loads(Path(line.removeprefix("run record: ")).read_text())


def records(store: Path) -> list[dict]:
    """Every run record beside ``store``, oldest first."""
    runs = store.with_name(store.name + ".runs")
    return [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]


def done_items(record: dict, status: str = "done") -> set[tuple[str, str]]:
    return {(o["patient_id"], o["item_id"]) for o in record["outcomes"] if o["status"] == status}


def items(store: Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None, dict]]:
    """Complete WSI items of ``store``: (patient_id, item_id) -> (features, coords, attrs)."""
    s = open_store(store, "r")
    out = {}
    for k in s.iter_items("wsi"):
        it = s.read_item(k.modality, k.encoder_id, k.patient_id, k.item_id)
        out[(k.patient_id, k.item_id)] = (it.features, it.coords, it.attrs)
    return out


def frozen_items(store: Path) -> Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray | None, Mapping]]:
    """``items(store)`` that no test can change: read-only mappings and arrays (a shared reference stays clean)."""
    out = {}
    for k, (f, c, attrs) in items(store).items():
        for a in (f, c):
            if a is not None:
                a.setflags(write=False)
        out[k] = (f, c, MappingProxyType(attrs))
    return MappingProxyType(out)


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (to check that a shared folder was left alone)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def lock_files(store: Path) -> list[Path]:
    d = lock_dir(store)
    return sorted(d.rglob("*.lock")) if d.is_dir() else []


def assert_same_items(got: dict, want: dict, exact: bool = True) -> None:
    """Same items, identical coords; features equal up to one float16 ulp (``exact``) or within 1e-2 relative."""
    assert sorted(got) == sorted(want)
    for k, (f, c, _) in want.items():
        g_f, g_c, g_attrs = got[k]
        assert g_attrs["complete"] is True
        np.testing.assert_array_equal(g_c, c, err_msg=str(k))
        assert g_f.dtype == f.dtype and g_f.shape == f.shape
        if exact:
            assert max_ulp_diff(g_f, f) <= 1, f"{k}: features differ by more than one float16 ulp"
        else:
            np.testing.assert_allclose(g_f.astype(np.float32), f.astype(np.float32), rtol=1e-2, atol=1e-3,
                                       err_msg=str(k))


def max_ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in float16 ulps between same-shaped float16 arrays (0: bitwise equal)."""
    assert a.dtype == b.dtype == np.float16
    ia, ib = (x.view(np.int16).astype(np.int32) for x in (a, b))
    ia, ib = (np.where(i < 0, -32768 - i, i) for i in (ia, ib))  # sign-magnitude -> ordered integers
    return int(np.abs(ia - ib).max(initial=0))


def verify_cli(store: Path, *args: str):
    return CliRunner().invoke(app, ["store", "verify", str(store), *args])
