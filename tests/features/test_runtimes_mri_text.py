"""Inference runtimes of the MRI (r3d18) and clinical-note (MiniLM) encoders: OpenVINO vs torch parity (the
figure that lets both share an encoder_id), ``auto`` falling back to torch without openvino, ``--runtime torch``
end to end, length-bucketed windows equal to padded ones, and the next item prepared while this one is encoded.

Measured here (random-init r3d18 on a 24^3 phantom grid, fp32 on an AVX2 CPU without bf16): OpenVINO vs torch
cosine 1.000000 (min over the batch); MiniLM-L6 on the three notes below: 1.000000 min. The floor is 0.999."""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.features import mri, text
from mmcli.features.encoders import runtime
from mmcli.features.encoders.openvino_rt import cosine_rows
from mmcli.features.encoders.registry import create_encoder
from mmcli.features.runner import run_extraction
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import load_manifest
from mmcli.pipeline.store import open_store

SMALL = dict(spacing=(2.0, 2.0, 2.0), shape=(16, 16, 16), device="cpu", precision="fp32")
NOTES = [
    "Invasive ductal carcinoma, grade 2, ER positive, PR positive, HER2 negative. " * 40,  # several windows
    "Triple negative breast cancer, no special type.",
    "Core biopsy: ductal carcinoma in situ, high grade, comedo necrosis. Margins clear. " * 6,
]
needs_openvino = pytest.mark.skipif(runtime.openvino_version() is None, reason="openvino is not installed")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted models go to a per-session folder, not the user's ~/.cache."""
    monkeypatch.setenv("MMCLI_CACHE", str(tmp_path_factory.getbasetemp() / "mmcli-cache"))


def _volumes(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """``(n, 1, size, size, size)`` z-scored phantoms: an ellipsoid in Rayleigh noise."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    out = []
    for _ in range(n):
        r = rng.uniform(0.4, 0.8, 3)
        v = rng.rayleigh(1.0, (size,) * 3) + 5.0 * (((g / r[:, None, None, None]) ** 2).sum(0) < 1)
        out.append((v - v.mean()) / v.std())
    return np.stack(out)[:, None].astype(np.float32)


def _nifti_cohort(folder: Path, n: int = 3) -> Path:
    aff = np.diag([-1.5, 1.5, 3.0, 1.0])
    lines = ["patient_id,modality,path,item_id"]
    for i, v in enumerate(_volumes(n, 20, seed=4)):
        nib.save(nib.Nifti1Image(100 + 30 * v[0], aff), str(folder / f"v{i}.nii.gz"))
        lines.append(f"P{i},mri,v{i}.nii.gz,T1")
    (folder / "mri.csv").write_text("\n".join(lines) + "\n")
    return folder / "mri.csv"


def _note_cohort(folder: Path) -> Path:
    lines = ["patient_id,modality,path,item_id"]
    for i, note in enumerate(NOTES):
        (folder / f"n{i}.txt").write_text(note)
        lines.append(f"P{i},text,n{i}.txt,note")
    (folder / "text.csv").write_text("\n".join(lines) + "\n")
    return folder / "text.csv"


# ---- parity ---------------------------------------------------------------------------------------------
@needs_openvino
def test_r3d18_openvino_matches_torch() -> None:
    x = _volumes(2)
    ref = create_encoder("r3d18", precision="fp32", runtime="torch", seed=2, quiet=True)
    ov = create_encoder("r3d18", precision="fp32", runtime="openvino", seed=2, quiet=True)
    assert ov.encoder_id == ref.encoder_id  # the runtime is not part of the id: features agree
    got = ov.encode(x)
    assert got.shape == (2, 512) and got.dtype == np.float32
    assert cosine_rows(got, ref.encode(x)).min() >= 0.999
    ran = ov.runtime()
    assert ran["runtime"] == "openvino" and ran["runtime_version"] == runtime.openvino_version()
    assert Path(ran["openvino"]["model"]).is_file()
    again = create_encoder("r3d18", precision="fp32", runtime="openvino", seed=2, quiet=True)
    np.testing.assert_allclose(again.encode(x[:1]), got[:1], rtol=1e-4, atol=1e-4)  # another shape, same IR
    assert again.runtime()["openvino"]["converted_now"] is False


@needs_openvino
def test_minilm_openvino_matches_torch() -> None:
    ref = create_encoder("minilm-l6", device="cpu", precision="fp32", runtime="torch")
    ov = create_encoder("minilm-l6", device="cpu", precision="fp32", runtime="openvino")
    assert ov.encoder_id == ref.encoder_id
    a = np.stack([ov.embed(t)[0] for t in NOTES])
    b = np.stack([ref.embed(t)[0] for t in NOTES])
    assert cosine_rows(a, b).min() >= 0.999
    assert ov.runtime()["runtime"] == "openvino" and Path(ov.runtime()["openvino"]["model"]).is_file()
    assert ov.embed(NOTES[1])[1] == ref.embed(NOTES[1])[1]  # the same windows and token counts


def test_length_buckets_equal_padded_windows() -> None:
    """Windows sorted by length and cut to each batch's longest give the features of the whole note padded to
    its longest window, in the windows' own order."""
    import torch

    enc = create_encoder("minilm-l6", device="cpu", precision="fp32", runtime="torch", max_tokens=64, stride=8,
                         batch_size=2)
    windows = enc.tokenize(NOTES[2] + " Short tail.")
    n = windows["input_ids"].shape[0]
    lengths = windows["attention_mask"].sum(1)
    assert n >= 3 and lengths.min() < lengths.max()  # a short last window: several buckets, one cut
    vecs, counts = enc.encode_windows(windows)
    with torch.inference_mode():
        hidden = enc.model(input_ids=windows["input_ids"], attention_mask=windows["attention_mask"]).last_hidden_state
        m = windows["attention_mask"].unsqueeze(-1).float()
        expect = ((hidden * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(vecs, expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(counts, lengths.numpy())


# ---- without openvino -----------------------------------------------------------------------------------
def test_auto_falls_back_to_torch_without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert runtime.openvino_version() is None
    vol = create_encoder("r3d18", device="cpu", precision="fp32", runtime="auto", quiet=True)
    assert vol.encode(_volumes(1, 16)).shape == (1, 512) and vol.runtime()["runtime"] == "torch"
    note = create_encoder("minilm-l6", device="cpu", precision="fp32", runtime="auto")
    assert note.embed(NOTES[1])[0].shape == (384,) and note.runtime()["runtime"] == "torch"
    with pytest.raises(InputError, match="--runtime openvino.*not installed"):
        mri.make_spec(runtime="openvino", **SMALL)
    with pytest.raises(InputError, match="--runtime openvino.*not installed"):
        text.make_spec(runtime="openvino", device="cpu")


# ---- the pipeline ---------------------------------------------------------------------------------------
def test_mri_next_volume_is_prepared_during_this_one(tmp_path: Path) -> None:
    """The runner hints the next row; the extractor reads and preprocesses it in the background, and the
    features equal those of preprocessing inline."""
    rows = load_manifest(_nifti_cohort(tmp_path, 4)).rows
    spec = mri.make_spec(**SMALL)
    s = run_extraction(rows, spec, tmp_path / "a.zarr", progress=False)
    assert s.count("done") == 4
    extractor = spec.build()
    assert extractor._ahead.hits >= 2  # rows 3 and 4 (the extractor exists once row 1 is done)
    st = open_store(tmp_path / "a.zarr", "r")
    for r in rows:
        item = st.read_item("mri", spec.encoder_id, r.patient_id, r.item_id)
        x, _, _ = extractor._prepare(r.path)
        np.testing.assert_allclose(item.features, extractor.encoder.encode(x), rtol=1e-5, atol=1e-5)
        assert item.attrs["runtime"] == runtime.resolve_backend("auto", "cpu") and item.attrs["runtime_version"]


def test_text_next_note_is_tokenised_during_this_one(tmp_path: Path) -> None:
    rows = load_manifest(_note_cohort(tmp_path)).rows
    spec = text.make_spec(device="cpu", precision="fp32", runtime="torch")
    s = run_extraction(rows, spec, tmp_path / "t.zarr", progress=False)
    assert s.count("done") == 3
    extractor = spec.build()
    assert extractor.encoder.prefetch_hits >= 1
    st = open_store(tmp_path / "t.zarr", "r")
    for r, note in zip(rows, NOTES):
        item = st.read_item("text", spec.encoder_id, r.patient_id, r.item_id)
        # a note's item holds its windows (rows) and their token counts: pooled, they are the note's embedding
        pooled = text.pool_windows(item.features, np.asarray(item.attrs["row_weights"]))
        np.testing.assert_allclose(pooled, extractor.encoder.embed(note)[0], rtol=1e-5, atol=1e-6)
        assert item.attrs["runtime"] == "torch"


def test_runtime_torch_end_to_end_cli(tmp_path: Path) -> None:
    for modality, manifest, item_id, extra in (
            ("mri", _nifti_cohort(tmp_path, 2), "T1", ["--spacing", "2", "--shape", "16"]),
            ("text", _note_cohort(tmp_path), "note", [])):
        store = tmp_path / f"{modality}.zarr"
        base = ["extract", "--modality", modality, "--manifest", str(manifest), "--store", str(store),
                "--device", "cpu", "--precision", "fp32", "--no-progress", *extra]
        res = CliRunner().invoke(app, [*base, "--runtime", "torch"])
        assert res.exit_code == 0, res.output
        st = open_store(store, "r")
        (eid,) = st.encoders(modality)
        item = st.read_item(modality, eid, "P1", item_id)
        assert item.attrs["runtime"] == "torch" and item.attrs["runtime_version"]
        bad = CliRunner().invoke(app, [*base, "--runtime", "tensorrt"])
        assert bad.exit_code == 2 and "--runtime" in bad.output
