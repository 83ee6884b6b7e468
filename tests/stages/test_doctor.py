"""``mmcli doctor``: checks readers, devices, runtimes, store backends, the HF cache and preset weights; exit 1
with a fix for each problem, 0 when all is fine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.stages import doctor as doc


def test_cpu_flags_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert {"avx512_bf16", "avx512_vnni", "amx_tile"} <= doc.cpu_flags(info)
    (cpu,) = [c for c in doc.check_devices(info) if c.name == "cpu"]
    assert "bf16 yes" in cpu.detail and "VNNI yes" in cpu.detail and "avx512_bf16" in cpu.detail
    info.write_text("flags\t\t: fpu sse avx2\n")
    (cpu,) = [c for c in doc.check_devices(info) if c.name == "cpu"]
    assert "bf16 no" in cpu.detail and "VNNI no" in cpu.detail
    assert doc.cpu_flags(tmp_path / "absent") == set()


def test_all_fine_exits_0_and_lists_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / "models--MahmoodLab--UNI"
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "snapshots" / "abc" / "pytorch_model.bin").write_bytes(b"x")
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc")
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    for word in ("openslide", "tiffslide", "cucim", "cuda", "cpu", "torch", "openvino", "zarr", "h5py",
                 str(tmp_path / "hub"), "uni2-h", "conch-v1.5", "no problems; 2 warning(s)"):
        assert word in res.output
    assert "ok   uni: weights" in res.output and "pytorch_model.bin" in res.output
    # issue 27: every preset's licence and access terms, found or not
    assert "uni: weights" in res.output and "licence CC-BY-NC-ND-4.0 (gated)" in res.output
    assert "h-optimus-0: no model.safetensors / pytorch_model.bin of bioptimus/H-optimus-0" in res.output
    assert "licence Apache-2.0" in res.output and "Owkin non-commercial" in res.output
    res = CliRunner().invoke(app, ["doctor", "--json"])
    data = json.loads(res.output)
    assert data["exit_code"] == 0 and {c["section"] for c in data["checks"]} >= {"slide readers", "devices",
                                                                                "runtimes", "store backends",
                                                                                "hugging face", "presets"}


def test_problems_exit_1_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real = doc._try_import

    def broken(module: str):
        if module in ("zarr", "openslide", "tiffslide", "cucim"):
            return None, f"ImportError: no module named {module}"
        return real(module)

    monkeypatch.setattr(doc, "_try_import", broken)
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 1
    assert "ERR  zarr" in res.output and "fix: pip install 'zarr>=3'" in res.output
    assert "ERR  any reader" in res.output and "fix: pip install openslide-python" in res.output
    assert "2 problem(s)" in res.output


def _cached(hub: Path, repo: str, name: str) -> None:
    snap = hub / f"models--{repo.replace('/', '--')}"
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "snapshots" / "abc" / name).write_bytes(b"x")
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc")


def test_random_default_encoders_are_warnings_with_the_weights_to_place(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29 item 1: doctor said all was fine while the default WSI and MRI encoders would run on random
    weights. Now each is a WARN line (exit code still 0) naming the weights and how to place them; with
    resnet50.tv_in1k in the cache the WSI line is ok."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "WARN wsi resnet50_trunc: RANDOM weights" in text and "WARN mri r3d18: RANDOM weights" in text
    assert "hf download timm/resnet50.tv_in1k model.safetensors" in text
    assert f"models--timm--resnet50.tv_in1k into {tmp_path / 'hub'}" in text and "r3d_18" in text
    assert "ok text minilm-l6: pretrained" in text
    assert text.endswith("no problems; 2 warning(s): wsi resnet50_trunc, mri r3d18") and "all fine" not in text
    data = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).output)
    warned = [c["name"] for c in data["checks"] if c["warn"]]
    assert warned == ["wsi resnet50_trunc", "mri r3d18"] and data["exit_code"] == 0

    _cached(tmp_path / "hub", "timm/resnet50.tv_in1k", "model.safetensors")
    text = " ".join(CliRunner().invoke(app, ["doctor"]).output.split())
    assert "ok wsi resnet50_trunc: pretrained: timm/resnet50.tv_in1k" in text
    assert text.endswith("no problems; 1 warning(s): mri r3d18")
