"""Inference runtimes of the image encoders: OpenVINO vs torch parity on tissue-like tiles, bf16 vs fp32 (the
figure that lets both share an encoder_id), ``auto`` falling back to torch without openvino, ``--runtime
torch`` end to end, and int8 (own encoder_id, fidelity in the encoder attrs, refused below --min-cosine)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.slides import tissue_image, write_aperio
from mmcli.cli import app
from mmcli.features.encoders import runtime
from mmcli.features.encoders.openvino_rt import cosine_rows
from mmcli.features.encoders.registry import create_encoder
from mmcli.features.wsi import make_spec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store

TINY = "timm:test_resnet"
OPTS = ["--encoder", TINY, "--patch-size", "32", "--mpp", "1.0", "--batch-size", "16", "--min-tissue-area", "2000",
        "--no-progress"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted models go to a per-session folder, not the user's ~/.cache."""
    monkeypatch.setenv("MMCLI_CACHE", str(tmp_path_factory.getbasetemp() / "mmcli-cache"))


def _tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` tissue-like (H&E-coloured) tiles cut from a synthetic slide image."""
    img = tissue_image(size * 8 * 0.5, size * 8 * 0.5, 0.5, seed=seed, box=(0.0, 0.0, 1.0, 1.0))
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, img.shape[0] - size, n)
    xs = rng.integers(0, img.shape[1] - size, n)
    return np.stack([img[y:y + size, x:x + size] for y, x in zip(ys, xs)]).astype(np.uint8)


def test_openvino_matches_torch_fp32() -> None:
    x = _tiles(12, 64)
    ref = create_encoder(TINY, precision="fp32", runtime="torch").encode(x)
    enc = create_encoder(TINY, precision="fp32", runtime="openvino")
    got = enc.encode(x)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert cosine_rows(got, ref).min() >= 0.999
    ran = enc.runtime()
    assert ran["runtime"] == "openvino" and ran["runtime_version"] == runtime.openvino_version()
    assert Path(ran["ov_model"]).is_file()
    again = create_encoder(TINY, precision="fp32", runtime="openvino")  # a later run: the cached IR, no convert
    np.testing.assert_allclose(again.encode(x), got, rtol=1e-4, atol=1e-4)
    assert again.runtime()["ov_converted_now"] is False


def test_bf16_and_fp32_features_have_their_own_encoder_ids() -> None:
    """Issue 27 item 8 (changed): the effective precision is part of the encoder_id, so an array job over CPUs with
    and without native bf16 never mixes the two in one store. Their cosine stays high (measured 0.999994 min on
    these 8 tissue tiles for resnet50_trunc, random init, torch autocast bf16 on an AVX2 CPU; the floor is
    0.999); on a CPU whose OpenVINO plugin has BF16 the OpenVINO bf16 path is held to the same floor."""
    x = _tiles(8, 224, seed=3)
    fp32 = create_encoder("resnet50_trunc", precision="fp32", runtime="torch")
    bf16 = create_encoder("resnet50_trunc", precision="bf16", runtime="torch")
    assert fp32.encoder_id != bf16.encoder_id
    assert create_encoder("resnet50_trunc", precision="fp32", runtime="torch").encoder_id == fp32.encoder_id
    ref = fp32.encode(x)
    assert cosine_rows(bf16.encode(x), ref).min() >= 0.999
    if runtime.openvino_version():
        from mmcli.features.encoders.openvino_rt import cpu_capabilities

        if "BF16" in cpu_capabilities():
            ov = create_encoder("resnet50_trunc", precision="bf16", runtime="openvino")
            assert ov.runtime()["precision"] == "bf16"
            assert cosine_rows(ov.encode(x), ref).min() >= 0.999


def test_auto_falls_back_to_torch_without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.resolve_backend("auto", "cpu") == "openvino"
    assert runtime.resolve_backend("auto", "cuda") == "torch"
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert runtime.openvino_version() is None
    assert runtime.resolve_backend("auto", "cpu") == "torch"
    enc = create_encoder(TINY, precision="fp32", runtime="auto")
    enc.encode(_tiles(2, 32))
    assert enc.runtime()["runtime"] == "torch"
    with pytest.raises(ValueError, match="not installed"):
        runtime.resolve_backend("openvino", "cpu")
    with pytest.raises(InputError, match="--runtime openvino"):
        make_spec("s.zarr", encoder=TINY, runtime="openvino")


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    write_aperio(tmp_path / "a.svs", tissue_image(384, 320, 0.5, seed=7), 0.5, downsamples=(1, 4))
    write_aperio(tmp_path / "b.svs", tissue_image(384, 320, 0.5, seed=8), 0.5, downsamples=(1, 4))
    (tmp_path / "m.csv").write_text("patient_id,modality,path,item_id\nP1,wsi,a.svs,a\nP2,wsi,b.svs,b\n")
    return tmp_path


def _attrs(store: Path, pid: str = "P1", item: str = "a") -> tuple[str, dict]:
    s = open_store(store, "r")
    (eid,) = s.encoders("wsi")
    return eid, s.read_item("wsi", eid, pid, item).attrs


def test_runtime_torch_end_to_end(cohort: Path) -> None:
    store = cohort / "t.zarr"
    res = CliRunner().invoke(app, ["extract", "--modality", "wsi", "--manifest", str(cohort / "m.csv"), "--store",
                                   str(store), "--runtime", "torch", "--precision", "fp32", *OPTS])
    assert res.exit_code == 0, res.output
    _, attrs = _attrs(store)
    assert attrs["runtime"] == "torch" and attrs["n_tiles"] > 0
    bad = CliRunner().invoke(app, ["extract", "--modality", "wsi", "--manifest", str(cohort / "m.csv"), "--store",
                                   str(store), "--runtime", "tensorrt", *OPTS])
    assert bad.exit_code == 2 and "--runtime" in bad.output


def test_int8_own_encoder_id_fidelity_and_refusal(cohort: Path) -> None:
    base = ["extract", "--modality", "wsi", "--manifest", str(cohort / "m.csv"), *OPTS]
    store = cohort / "q.zarr"
    ok = CliRunner().invoke(app, [*base, "--store", str(store), "--precision", "int8", "--min-cosine", "0.9"])
    assert ok.exit_code == 0, ok.output
    assert "int8 fidelity" in ok.output
    eid, attrs = _attrs(store)
    float_id = make_spec(cohort / "f.zarr", encoder=TINY, patch_size=32, mpp=1.0, min_tissue_area=2000).encoder_id
    assert eid != float_id  # int8 features never share a group with float ones
    assert attrs["precision"] == "int8" and attrs["runtime"] == "openvino"
    fid = attrs["int8"]["fidelity"]
    assert fid["held_out_tiles"] >= 8 and 0.9 <= fid["cosine_min"] <= fid["cosine_median"] <= 1.0
    assert attrs["int8"]["calibration"]["tiles"] >= 8 and attrs["int8"]["calibration"]["slides"] == 2
    # the same figure against a floor it cannot reach: exit 2 naming the figure, nothing written
    store2 = cohort / "q2.zarr"
    bad = CliRunner().invoke(app, [*base, "--store", str(store2), "--precision", "int8", "--min-cosine", "0.99999"])
    assert bad.exit_code == 2, bad.output
    assert "refused" in bad.output and "0.99999" in bad.output and "cosine" in bad.output
    assert not store2.exists() or not open_store(store2, "r").encoders("wsi")
    with pytest.raises(InputError, match="int8"):
        make_spec(cohort / "x.zarr", encoder=TINY, precision="int8", runtime="torch")
