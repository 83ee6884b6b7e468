"""Stain normalisation (``--stain-norm``): the batched Macenko / Reinhard equal torchstain's per-image normalisers
tile for tile, and on the same tissue stained as another lab would, normalised features are closer to the clean
slide's than raw ones, under a different encoder id."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchstain
from PIL import Image

from helpers.qc_slides import OTHER_LAB, concentrations, render, write_qc_slide
from mmcli.features.qc import stain
from mmcli.features.wsi import make_spec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import ManifestRow

QC = dict(encoder="timm:test_resnet", patch_size=64, mpp=0.5, batch_size=32, read_threads=2)


def _tiles(stains=None, seed: int = 0) -> np.ndarray:
    img = render(concentrations(256, 256, seed), *(() if stains is None else (stains,)))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.stack([img[y:y + 64, x:x + 64] for y in range(0, 256, 64) for x in range(0, 256, 64)])


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


def test_macenko_matches_torchstain_tile_for_tile() -> None:
    ref = np.clip(render(concentrations(384, 384, seed=7)), 0, 255).astype(np.uint8)
    ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts.fit(_chw(ref))
    mine = stain.fit_reference("macenko", None)  # the built-in one first: torchstain's default reference
    assert np.allclose(mine.stats["he"], stain.HE_REF) and np.allclose(mine.stats["max_c"], stain.MAXC_REF)
    he, max_c, ok = stain.macenko_stats(stain._planar(ref[None], stain._OD_LUT))
    assert ok[0] and np.allclose(he[0], ts.HERef.numpy(), atol=1e-3) and np.allclose(max_c[0], ts.maxCRef, atol=1e-3)
    ref_stats = stain.StainReference("macenko", "t", "", {"he": he[0].tolist(), "max_c": max_c[0].tolist()})
    tiles = _tiles(OTHER_LAB)
    out, left = stain.StainNormalizer(ref_stats, sample_pixels=0, min_stain_pixels=0)(tiles)
    assert left == 0
    for k in range(len(tiles)):
        want, _, _ = ts.normalize(_chw(tiles[k]), stains=False)
        assert np.abs(want.numpy().astype(int) - out[k].astype(int)).max() <= 1, k
    # estimated on every 2nd pixel of each row and column: close, not equal
    out2, _ = stain.StainNormalizer(ref_stats, sample_pixels=1024)(tiles)
    assert np.abs(out2.astype(int) - out.astype(int)).mean() < 1.5


def test_reinhard_matches_torchstain_tile_for_tile(tmp_path: Path) -> None:
    ref = np.clip(render(concentrations(384, 384, seed=7)), 0, 255).astype(np.uint8)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    ts = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ts.fit(_chw(ref))
    mine = stain.fit_reference("reinhard", tmp_path / "ref.png")
    assert np.allclose(mine.stats["means"], ts.target_means, atol=1e-3)
    assert np.allclose(mine.stats["stds"], ts.target_stds, atol=1e-3)
    tiles = _tiles(OTHER_LAB)
    out, left = stain.StainNormalizer(mine, sample_pixels=0)(tiles)
    assert left == 0
    for k in range(len(tiles)):
        want = ts.normalize(_chw(tiles[k])).numpy()
        assert np.abs(want.astype(int) - out[k].astype(int)).max() <= 1, k


def test_tiles_without_stain_are_left_as_they_are_and_counted() -> None:
    tiles = _tiles()
    tiles[:3] = (242, 240, 244)  # glass
    out, left = stain.StainNormalizer(stain.fit_reference("macenko"))(tiles)
    assert left == 3 and np.array_equal(out[:3], tiles[:3]) and not np.array_equal(out[3:], tiles[3:])
    out, left = stain.StainNormalizer(stain.fit_reference("reinhard"))(tiles[:3])
    assert left == 3 and np.array_equal(out, tiles[:3])


def test_restained_slide_features_come_closer_to_the_clean_ones(tmp_path: Path) -> None:
    clean = write_qc_slide(tmp_path / "clean.svs", 1024, 768, seed=3).path
    other = write_qc_slide(tmp_path / "other.svs", 1024, 768, seed=3, stains=OTHER_LAB).path
    ref = np.clip(render(concentrations(512, 512, seed=9)), 0, 255).astype(np.uint8)  # other tissue, clean lab
    Image.fromarray(ref).save(tmp_path / "ref.png")
    store = tmp_path / "s.zarr"

    def feats(path: Path, **kw) -> tuple[str, dict]:
        spec = make_spec(store, **QC, **kw)
        r = spec.build().extract(ManifestRow("P1", "wsi", path, path.stem, 2))
        return spec.encoder_id, {tuple(c): f.astype(np.float32) for c, f in zip(r.coords.tolist(), r.features)}

    def mean_cosine(a: dict, b: dict) -> float:
        same = sorted(set(a) & set(b))
        assert len(same) >= 40
        x, y = np.stack([a[k] for k in same]), np.stack([b[k] for k in same])
        return float(np.mean((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)))

    raw_id, raw_clean = feats(clean)
    _, raw_other = feats(other)
    norm_id, n_clean = feats(clean, stain_norm="macenko", stain_reference=str(tmp_path / "ref.png"))
    _, n_other = feats(other, stain_norm="macenko", stain_reference=str(tmp_path / "ref.png"))
    assert norm_id != raw_id
    raw, normed = mean_cosine(raw_clean, raw_other), mean_cosine(n_clean, n_other)
    assert normed > raw + 0.02, (raw, normed)
    # another reference file is another encoder id; the built-in reference one more
    Image.fromarray(ref[::-1]).save(tmp_path / "ref2.png")
    ids = {norm_id} | {make_spec(store, **QC, **kw).encoder_id for kw in (
        dict(stain_norm="macenko", stain_reference=str(tmp_path / "ref2.png")), dict(stain_norm="macenko"),
        dict(stain_norm="reinhard"))}
    assert len(ids) == 4


def test_item_records_the_stain_reference(tmp_path: Path) -> None:
    path = write_qc_slide(tmp_path / "a.svs", 512, 512, seed=1, margin=64).path
    r = make_spec(tmp_path / "s.zarr", **QC, stain_norm="reinhard").build().extract(
        ManifestRow("P1", "wsi", path, "a", 2))
    st = r.attrs["stain_norm"]
    assert st["method"] == "reinhard" and st["source"] == stain.BUILTIN and len(st["stats"]["means"]) == 3
    assert st["tiles_left_unnormalised"] == 0 and st["sample_pixels"] == 4096


@pytest.mark.parametrize("what", ["blank", "missing", "not_image"])
def test_unusable_reference_is_refused_naming_the_file(what: str, tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    if what == "blank":
        Image.fromarray(np.full((64, 64, 3), 245, np.uint8)).save(ref)
    elif what == "not_image":
        ref.write_text("hello")
    with pytest.raises(InputError, match=r"--stain-reference .*ref\.png"):
        make_spec(tmp_path / "s.zarr", **QC, stain_norm="macenko", stain_reference=str(ref))
    with pytest.raises(InputError, match="--stain-norm"):
        make_spec(tmp_path / "s.zarr", **QC, stain_reference=str(ref))
