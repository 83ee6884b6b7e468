"""MRI extraction: real NIfTI files written here (odd orientations, non-isotropic voxels, 4-D, corrupt ones)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mmcli.features.mri import MriParams, load_volume, make_spec, preprocess, to_tensor_layout
from mmcli.features.runner import ItemError, run_extraction
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import load_manifest
from mmcli.pipeline.store import open_store

SMALL = dict(spacing=(2.0, 2.0, 2.0), shape=(16, 16, 16), device="cpu", precision="fp32")

# Voxel axes -> world (RAS mm): i runs Posterior (0.9 mm), j Superior (3 mm), k Left (1.2 mm): "PSL", no axis
# in its RAS place and two of them flipped.
ODD_AFFINE = np.array([
    [0.0, 0.0, -1.2, 40.0],
    [-0.9, 0.0, 0.0, 30.0],
    [0.0, 3.0, 0.0, -45.0],
    [0.0, 0.0, 0.0, 1.0],
])
BOX_CENTRE = np.array([10.0, -5.0, -10.0])  # world mm
MARKER_OFFSET = np.array([14.0, 0.0, 0.0])  # a small bright blob 14 mm towards the patient's Right


def _phantom(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Intensities defined in world space: a 20 mm cube (100) plus a 6 mm marker (300) on its Right."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = nib.affines.apply_affine(affine, ijk).reshape(*shape, 3)
    vol = np.full(shape, 5.0, np.float32)
    vol[np.all(np.abs(xyz - BOX_CENTRE) <= 10.0, axis=-1)] = 100.0
    vol[np.all(np.abs(xyz - (BOX_CENTRE + MARKER_OFFSET)) <= 3.0, axis=-1)] = 300.0
    return vol


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(0))


def test_odd_orientation_and_anisotropic_voxels_come_out_ras_and_resampled(tmp_path: Path) -> None:
    shape = (50, 24, 40)  # covers ~45 x 72 x 48 mm
    path = _save(tmp_path / "odd.nii.gz", _phantom(ODD_AFFINE, shape), ODD_AFFINE)
    img, warnings = load_volume(path)
    assert warnings == [] and "".join(nib.aff2axcodes(img.affine)) == "PSL"
    vol, info, _ = preprocess(img, MriParams(spacing=(1.5, 1.5, 1.5), shape=(40, 44, 36)), "odd")

    assert vol.shape == (40, 44, 36) and vol.dtype == np.float32
    assert info["axcodes"] == "RAS" and info["source_axcodes"] == "PSL"
    assert info["source_spacing_mm"] == [0.9, 3.0, 1.2]
    out_aff = np.asarray(info["affine"])
    np.testing.assert_allclose(np.abs(np.diag(out_aff)[:3]), [1.5, 1.5, 1.5], atol=1e-6)
    assert np.all(np.diag(out_aff)[:3] > 0)  # axes run towards R, A, S

    # The cube and the marker sit where they are in world space (within a voxel or two).
    def z(v: float) -> float:  # raw intensity -> z-scored value
        return (v - info["foreground_mean"]) / info["foreground_sd"]

    marker = vol > z(200.0)
    cube = (vol > z(52.5)) & ~marker
    np.testing.assert_allclose(_world_centroid(cube, out_aff), BOX_CENTRE, atol=3.0)
    np.testing.assert_allclose(_world_centroid(marker, out_aff), BOX_CENTRE + MARKER_OFFSET, atol=2.0)
    # the marker is on the +x (Right) side of the cube in array order too: reorientation is not a mirror image
    assert np.argwhere(marker).mean(0)[0] > np.argwhere(cube).mean(0)[0]
    # physical size is kept: the 20 mm cube covers ~8000 mm^3 whatever the voxel size
    volume_mm3 = (cube.sum() + marker.sum()) * 1.5 ** 3
    assert 6000 < volume_mm3 < 10500
    # z-scored over the foreground: foreground mean 0, sd 1
    fg = vol > z(info["foreground_threshold"])
    assert abs(float(vol[fg].mean())) < 1e-3 and abs(float(vol[fg].std()) - 1.0) < 1e-3
    assert to_tensor_layout(vol).shape == (1, 1, 36, 44, 40)


def test_crop_and_pad_centre_on_the_volume(tmp_path: Path) -> None:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.zeros((30, 30, 30), np.float32)
    data[10:20, 10:20, 10:20] = 50.0
    img, _ = load_volume(_save(tmp_path / "c.nii", data, aff))
    big, _, _ = preprocess(img, MriParams((2.0, 2.0, 2.0), (40, 40, 40)), "c")  # pad 5 voxels per side
    small, _, _ = preprocess(img, MriParams((2.0, 2.0, 2.0), (14, 14, 14)), "c")  # crop close to the cube
    np.testing.assert_allclose(np.argwhere(big > big.min() / 2).mean(0), [19.5, 19.5, 19.5], atol=0.6)
    assert big[0, 0, 0] == big.min()  # padding is background (air)
    assert 0.25 < (small > small.min() / 2).mean() < 0.5  # the 10-voxel cube fills ~(10/14)^3 of the crop
    inside, _, warnings = preprocess(img, MriParams((2.0, 2.0, 2.0), (8, 8, 8)), "c")  # all inside the cube
    assert not inside.any() and "no contrast" in warnings[0]


def test_4d_uses_first_volume_with_warning_or_the_chosen_one(tmp_path: Path) -> None:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.random.default_rng(0).normal(10, 1, (12, 12, 12, 3)).astype(np.float32)
    data[3:9, 3:9, 3:9, 2] += 80
    path = _save(tmp_path / "dce.nii.gz", data, aff)
    img, warnings = load_volume(path)
    assert img.shape == (12, 12, 12)
    assert len(warnings) == 1 and "4-D" in warnings[0] and "--volume-index" in warnings[0]
    np.testing.assert_allclose(img.get_fdata(), data[..., 0], rtol=1e-6)
    img2, w2 = load_volume(path, volume_index=2)
    assert w2 == [] and np.allclose(img2.get_fdata(), data[..., 2])
    with pytest.raises(ItemError, match="out of range"):
        load_volume(path, volume_index=3)
    # (X, Y, Z, 1) is just a 3-D volume
    single, w3 = load_volume(_save(tmp_path / "one.nii", data[..., :1], aff))
    assert single.shape == (12, 12, 12) and w3 == []


def test_wrong_rank_and_corrupt_files_are_named(tmp_path: Path) -> None:
    aff = np.eye(4)
    flat = _save(tmp_path / "slice.nii.gz", np.ones((8, 8), np.float32), aff)
    with pytest.raises(ItemError, match=r"slice\.nii\.gz: wrong rank: a 2-D image"):
        load_volume(flat)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(ItemError, match="garbage.nii: not a readable NIfTI"):
        load_volume(garbage)
    good = _save(tmp_path / "good.nii.gz", np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32),
                 aff)
    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # header fine, half the voxels gone
    img, _ = load_volume(truncated)
    with pytest.raises(ItemError, match="truncated.nii.gz: voxel data cannot be read"):
        preprocess(img, MriParams((2.0, 2.0, 2.0), (16, 16, 16)), "truncated.nii.gz")
    const = _save(tmp_path / "const.nii", np.zeros((10, 10, 10), np.float32), aff)
    img, _ = load_volume(const)
    with pytest.raises(ItemError, match="constant image"):
        preprocess(img, MriParams((2.0, 2.0, 2.0), (16, 16, 16)), "const.nii")


def test_cohort_run_sequences_as_items_bad_files_skipped_exit_1(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    aff = np.diag([-1.1, 1.1, 3.0, 1.0])
    vol = _phantom(aff, (24, 24, 10)) + rng.normal(0, 2, (24, 24, 10)).astype(np.float32)
    _save(tmp_path / "p1_t1.nii.gz", vol, aff)
    _save(tmp_path / "p1_t2.nii.gz", vol[::-1].copy() * 0.5, aff)
    _save(tmp_path / "p2_t1.nii.gz", np.stack([vol, vol * 2], -1), aff)  # 4-D
    _save(tmp_path / "p3_t1.nii.gz", np.ones((5, 5), np.float32), aff)  # wrong rank
    (tmp_path / "p4_t1.nii.gz").write_bytes(b"\x1f\x8b broken")
    (tmp_path / "m.csv").write_text(
        "patient_id,modality,path,item_id\n"
        "P1,mri,p1_t1.nii.gz,T1\nP1,mri,p1_t2.nii.gz,T2\nP2,mri,p2_t1.nii.gz,T1\n"
        "P3,mri,p3_t1.nii.gz,T1\nP4,mri,p4_t1.nii.gz,T1\nP5,mri,gone.nii.gz,T1\n")
    m = load_manifest(tmp_path / "m.csv")
    spec = make_spec(**SMALL)
    store = tmp_path / "s.zarr"
    s = run_extraction(m.rows, spec, store, missing=m.missing, progress=False)
    status = {(o.patient_id, o.item_id): (o.status, o.reason) for o in s.outcomes}
    assert status[("P1", "T1")][0] == status[("P1", "T2")][0] == status[("P2", "T1")][0] == "done"
    assert status[("P3", "T1")] == ("failed", status[("P3", "T1")][1]) and "p3_t1.nii.gz: wrong rank" in \
        status[("P3", "T1")][1]
    assert status[("P4", "T1")][0] == "failed" and "p4_t1.nii.gz" in status[("P4", "T1")][1]
    assert status[("P5", "T1")][0] == "missing"
    assert s.exit_code == 1
    record = json.loads(Path(s.record_path).read_text())
    assert record["done"] == 3 and record["failed"] == 2 and record["missing"] == 1

    st = open_store(store, "r")
    assert st.patients("mri", spec.encoder_id) == ["P1", "P2"]
    t1, t2 = (st.read_item("mri", spec.encoder_id, "P1", i) for i in ("T1", "T2"))
    assert t1.features.shape == (1, 512) and np.isfinite(t1.features).all() and t1.coords is None
    assert not np.allclose(t1.features, t2.features)
    assert t1.attrs["pretrained"] is False and t1.attrs["mri"]["axcodes"] == "RAS"
    assert t1.attrs["preprocessing"] == {"spacing_mm": [2.0, 2.0, 2.0], "shape": [16, 16, 16], "volume_index": 0,
                                         "order": 1}
    four_d = st.read_item("mri", spec.encoder_id, "P2", "T1")
    assert any("--volume-index" in w for w in four_d.attrs["warnings"])

    # re-run: the good items are cached, the bad ones tried again (still failing)
    again = run_extraction(m.rows, spec, store, missing=m.missing, progress=False)
    assert again.count("cached") == 3 and again.count("failed") == 2


def test_deterministic_and_encoder_id_tracks_parameters(tmp_path: Path) -> None:
    aff = np.diag([1.0, 1.0, 2.5, 1.0])
    _save(tmp_path / "a.nii.gz", _phantom(aff, (30, 30, 12)), aff)
    (tmp_path / "m.csv").write_text("patient_id,modality,path,item_id\nP1,mri,a.nii.gz,T1\n")
    rows = load_manifest(tmp_path / "m.csv").rows
    spec = make_spec(**SMALL)
    run_extraction(rows, spec, tmp_path / "a.zarr", progress=False)
    run_extraction(rows, spec, tmp_path / "b.h5", progress=False)
    a = open_store(tmp_path / "a.zarr", "r").read_item("mri", spec.encoder_id, "P1", "T1").features
    b = open_store(tmp_path / "b.h5", "r").read_item("mri", spec.encoder_id, "P1", "T1").features
    np.testing.assert_array_equal(a, b)
    ids = {spec.encoder_id, make_spec(**{**SMALL, "shape": (24, 16, 16)}).encoder_id,
           make_spec(**{**SMALL, "spacing": (1.0, 1.0, 1.0)}).encoder_id,
           make_spec(**SMALL, seed=1).encoder_id, make_spec(**SMALL, volume_index=1).encoder_id}
    assert len(ids) == 5
    assert make_spec(**SMALL, volume_index=0).encoder_id == spec.encoder_id  # 0 is the default volume


def test_bad_parameters_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="spacing"):
        make_spec(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="shape"):
        make_spec(shape=(4, 16, 16))
    with pytest.raises(InputError, match="not MRI"):
        make_spec(encoder="minilm-l6")
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not weights")
    with pytest.raises(InputError, match="cannot read weights"):
        make_spec(weights=bad)


def test_cli_extract_mri(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcli.cli import app

    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    _save(tmp_path / "a.nii.gz", _phantom(aff, (30, 30, 10)), aff)
    _save(tmp_path / "flat.nii.gz", np.ones((6, 6), np.float32), aff)
    (tmp_path / "m.csv").write_text("patient_id,modality,path,item_id\nP1,mri,a.nii.gz,T1\nP2,mri,flat.nii.gz,T1\n")
    base = ["extract", "--modality", "mri", "--manifest", str(tmp_path / "m.csv"), "--store",
            str(tmp_path / "s.zarr"), "--device", "cpu", "--precision", "fp32", "--no-progress"]
    res = CliRunner().invoke(app, base + ["--spacing", "2", "--shape", "16,16,16"])
    assert res.exit_code == 1, res.output
    assert "done 1" in res.output and "failed: P2/T1" in res.output and "flat.nii.gz: wrong rank" in res.output
    res = CliRunner().invoke(app, base + ["--spacing", "1,2"])
    assert res.exit_code == 2 and "--spacing '1,2'" in res.output
    res = CliRunner().invoke(app, base + ["--max-tokens", "64"])
    assert res.exit_code == 2 and "--max-tokens does not apply to --modality mri" in res.output
