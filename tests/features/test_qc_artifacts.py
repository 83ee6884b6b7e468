"""Artefact QC per tile (``--remove-artifacts``) on a slide of real tissue texture with an out-of-focus region and
a green marker band; the detectors themselves; the per-tile record, the run record and the QC picture; and the
WSI path's refusal of non-finite features."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from helpers.qc_slides import INK, concentrations, ink_share, render, tiles_in_box, write_qc_slide
from mmcli.cli import app
from mmcli.features.qc.artifacts import CHECKS, ArtifactParams, removed_by, tile_scores
from mmcli.features.qc.record import load_record
from mmcli.features.runner import ItemError
from mmcli.features.wsi import ARTIFACT_CHECKS, make_spec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import ManifestRow
from mmcli.pipeline.store import open_store
from mmcli.stages.extract import extract

QC = dict(encoder="timm:test_resnet", patch_size=64, mpp=0.5, batch_size=32, read_threads=2)
TILE = 64  # level-0 px per tile (0.5 µm/px slides, tiles at 0.5 µm/px)


@pytest.fixture(scope="module")
def qc_slide(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("qc")
    return write_qc_slide(d / "art.svs", blur_box=(128, 128, 640, 896), ink_band=(700, 90))


def _row(path: Path, pid: str = "P1") -> ManifestRow:
    return ManifestRow(pid, "wsi", path, path.stem, 2)


def test_blur_and_pen_tiles_are_removed_clean_tissue_kept(qc_slide, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    plain = make_spec(store, **QC)
    r0 = plain.build().extract(_row(qc_slide.path))
    spec = make_spec(store, remove_artifacts="blur,pen", **QC)
    assert spec.encoder_id != plain.encoder_id  # removing tiles changes the features: never reused
    r1 = spec.build().extract(_row(qc_slide.path))
    before = {tuple(c) for c in r0.coords.tolist()}
    after = {tuple(c) for c in r1.coords.tolist()}
    assert after <= before
    c0 = r0.coords
    blur = tiles_in_box(c0, TILE, qc_slide.blur_box, inset=8)
    pen = ink_share(c0, TILE, qc_slide.ink) >= 0.5
    clean = (~tiles_in_box(c0, TILE, qc_slide.blur_box, inset=-24) & (ink_share(c0, TILE, qc_slide.ink) == 0)
             & tiles_in_box(c0, TILE, qc_slide.tissue_box))
    assert blur.sum() >= 20 and pen.sum() >= 15 and clean.sum() >= 40  # the regions are there without QC
    kept = np.array([tuple(c) in after for c in c0.tolist()])
    assert kept[blur].mean() <= 0.2, kept[blur].mean()
    assert kept[pen].mean() <= 0.2, kept[pen].mean()
    assert kept[clean].mean() >= 0.9, kept[clean].mean()
    # the record: one row per planned tile, the kept rows are the item's tiles in order, scores for re-filtering
    qc = r1.attrs["tile_qc"]
    arrays, meta = load_record(qc["record"])
    assert np.array_equal(arrays["coords"], c0) and len(arrays["code"]) == len(c0)
    assert np.array_equal(arrays["coords"][arrays["code"] == 0], r1.coords)
    assert np.isfinite(arrays["sharpness"]).all() and np.isfinite(arrays["pen_fraction"]).all()
    assert meta["removed"] == qc["removed"] and sum(qc["removed"].values()) == len(c0) - len(r1.coords)
    assert qc["removed"]["blur"] >= blur.sum() * 0.8 and qc["removed"]["pen"] >= 10
    assert meta["artifacts"] == {"checks": ["blur", "pen"], "blur_threshold": 6.0, "pen_max": 0.05}
    assert r1.record["tiles_removed"] == qc["removed"] and r1.record["tiles_candidates"] == len(c0)
    # the QC picture draws the removed tiles in their check's colours (blur orange, pen magenta)
    png = np.asarray(Image.open(r1.attrs["qc_png"]).convert("RGB")).reshape(-1, 3)
    for colour in ((255, 140, 0), (220, 0, 220), (30, 60, 220)):
        assert (png == colour).all(axis=1).sum() > 20, colour


def test_removed_tiles_are_counted_in_the_run_record(qc_slide, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"patient_id,modality,path,item_id\nP1,wsi,{qc_slide.path},art\n")
    store = tmp_path / "s.zarr"
    args = ["extract", "--modality", "wsi", "--manifest", str(manifest), "--store", str(store), "--encoder",
            "timm:test_resnet", "--patch-size", "64", "--mpp", "0.5", "--remove-artifacts", "blur,pen",
            "--blur-threshold", "5", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    line = [x for x in r.output.splitlines() if x.startswith("run record: ")][-1]
    rec = json.loads(Path(line.removeprefix("run record: ")).read_text())
    o = rec["outcomes"][0]
    gone = o["record"]["tiles_removed"]
    assert o["status"] == "done" and gone["blur"] > 0 and gone["pen"] > 0
    assert o["n"] == o["record"]["tiles_kept"] == o["record"]["tiles_candidates"] - sum(gone.values())
    fs = open_store(store, "r")
    eid = fs.encoders("wsi")[0]
    attrs = fs.item_attrs("wsi", eid, "P1", "art")
    assert attrs["options"]["remove_artifacts"] == ["blur", "pen"] and attrs["options"]["blur_threshold"] == 5.0
    assert attrs["tile_qc"]["artifacts"]["blur_threshold"] == 5.0


# ---- the detectors --------------------------------------------------------------------------------------------
def _tiles(seed: int = 0, n: int = 16) -> np.ndarray:
    img = np.clip(render(concentrations(256, 256, seed)), 0, 255)
    return np.stack([img[y:y + 64, x:x + 64] for y in range(0, 256, 64) for x in range(0, 256, 64)])[:n]


def test_sharpness_falls_with_blur_and_ink_and_dark_shares_are_measured() -> None:
    sharp = _tiles().astype(np.float32)
    scores = [tile_scores(sharp.astype(np.uint8))["sharpness"]]
    for sigma in (1.0, 2.0, 3.0):
        blurred = ndimage.gaussian_filter(sharp, (0, sigma, sigma, 0))
        scores.append(tile_scores(np.clip(blurred, 0, 255).astype(np.uint8))["sharpness"])
    for a, b in zip(scores, scores[1:]):
        assert (b < a).all()  # every tile gets less sharp with more blur
    assert (scores[0] >= 20).all() and (scores[3] < 6).all()  # the default threshold sits between them
    # ink over the left 40% of each tile: pen_fraction is that share (an independent count)
    inked = sharp.copy()
    inked[:, :, :26] *= INK
    s = tile_scores(np.clip(inked, 0, 255).astype(np.uint8))
    assert np.allclose(s["pen_fraction"], 26 / 64, atol=0.04)
    assert (tile_scores(sharp.astype(np.uint8))["pen_fraction"] < 0.01).all()  # the stains are never ink
    dark = sharp.copy()
    dark[:, :32] = 20
    assert np.allclose(tile_scores(dark.astype(np.uint8))["dark_fraction"], 0.5, atol=0.02)


def test_removed_by_applies_the_first_failing_check_in_order() -> None:
    scores = {"sharpness": np.array([1.0, 50, 50, 1, 50], np.float32),
              "pen_fraction": np.array([0, 0.2, 0, 0.3, 0], np.float32),
              "dark_fraction": np.array([0, 0, 0.9, 0, 0], np.float32)}
    codes = removed_by(scores, ArtifactParams(("blur", "pen", "dark")))
    assert codes.tolist() == [1, 2, 3, 1, 0]
    assert removed_by(scores, ArtifactParams(("pen",))).tolist() == [0, 2, 0, 2, 0]
    assert tuple(CHECKS) == ARTIFACT_CHECKS


@pytest.mark.parametrize("given, flag", [
    (dict(remove_artifacts="blur,smudge"), "--remove-artifacts"),
    (dict(remove_artifacts="grandqc"), "--artifact-weights"),
    (dict(artifact_weights="/x.pth"), "--artifact-weights"),
    (dict(pen_max=0), "--pen-max"),
    (dict(blur_threshold=-1), "--blur-threshold"),
])
def test_bad_qc_options_name_the_flag(given: dict, flag: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=flag):
        make_spec(tmp_path / "s.zarr", **QC, **given)


# ---- non-finite features ---------------------------------------------------------------------------------------
def test_non_finite_features_fail_the_slide_by_name_and_the_cohort_goes_on(qc_slide, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcli.features.encoders.image import ImageEncoder

    poisoned = write_qc_slide(tmp_path / "bad.svs", 512, 512, seed=5, margin=64).path
    real = ImageEncoder.forward

    def forward(self, batch):  # NaN for the tiles of the poisoned slide only (it is the one read last)
        y = real(self, batch)
        if _reading.get("bad"):
            y = y.clone()
            y[0, 0] = float("nan")
        return y

    _reading: dict[str, bool] = {}
    from mmcli.features import wsi

    real_encode = wsi.WSIExtractor._encode

    def encode(self, path, *a, **k):
        _reading["bad"] = path.name == "bad.svs"
        return real_encode(self, path, *a, **k)

    monkeypatch.setattr(ImageEncoder, "forward", forward)
    monkeypatch.setattr(wsi.WSIExtractor, "_encode", encode)
    spec = make_spec(tmp_path / "x.zarr", **QC)
    with pytest.raises(ItemError, match="bad.svs: encoder produced non-finite features"):
        spec.build().extract(_row(poisoned, "P2"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"patient_id,modality,path,item_id\nP2,wsi,{poisoned},bad\nP1,wsi,{qc_slide.path},art\n")
    s = extract("wsi", manifest, tmp_path / "s.zarr", progress=False, **QC)
    by = {o.item_id: o for o in s.outcomes}
    assert by["bad"].status == "failed" and "non-finite" in by["bad"].reason and by["art"].status == "done"
    assert s.exit_code == 1
    fs = open_store(tmp_path / "s.zarr", "r")
    assert fs.item_attrs("wsi", s.encoder_id, "P2", "bad") is None  # nothing written for the bad slide


def test_without_the_new_options_the_encoder_id_is_what_it_was(tmp_path: Path) -> None:
    """Stores made before these options existed keep their items: the default id is computed from exactly the
    parameters it was computed from before (encoder params + mpp, patch size, min tissue, tissue settings)."""
    from mmcli.features.encoders.registry import create_encoder
    from mmcli.features.wsi import WsiOptions
    from mmcli.pipeline.fingerprint import make_encoder_id

    opts = WsiOptions.build(QC)
    enc = create_encoder(opts.encoder, seed=opts.seed)
    old = {**enc.params(), "mpp": 0.5, "patch_size": 64, "min_tissue": 0.25, "tissue": opts.tissue_params().to_dict()}
    assert make_spec(tmp_path / "s.zarr", **QC).encoder_id == make_encoder_id(enc.name, enc.weights.sha256, old)
