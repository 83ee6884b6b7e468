"""One tile plan per slide: a second encoder on an already-planned cohort does no tissue detection (counter
and item attrs), gets the same tiles and its own QC image; an edited slide is planned again."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers.slides import tissue_image, write_aperio
from mmcli.features import wsi
from mmcli.features.tileplan import PlanCache, plans_dir_for
from mmcli.pipeline.manifest import ManifestRow

TINY = dict(encoder="timm:test_resnet", patch_size=32, mpp=1.0, batch_size=16, read_threads=2, runtime="torch",
            precision="fp32", min_tissue_area=2000)


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    return write_aperio(tmp_path / "s.svs", tissue_image(384, 320, 0.5, seed=5), 0.5, downsamples=(1, 4))


def test_second_encoder_reuses_the_plan(slide: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    row = ManifestRow("P1", "wsi", slide, "s", 2)
    first = wsi.make_spec(store, **TINY).build().extract(row)
    assert first.attrs["tile_plan"] == "computed"
    assert list(plans_dir_for(store).glob("*.npz")) and list(plans_dir_for(store).glob("*.qc.png"))
    before = wsi.DETECTIONS["tissue"]
    spec2 = wsi.make_spec(store, **{**TINY, "seed": 1})  # another (random-init) encoder: another encoder_id
    second = spec2.build().extract(row)
    assert wsi.DETECTIONS["tissue"] == before  # no tissue detection for the second encoder
    assert second.attrs["tile_plan"] == "reused"
    np.testing.assert_array_equal(first.coords, second.coords)
    assert second.attrs["tissue_threshold"] == first.attrs["tissue_threshold"]
    assert Path(second.attrs["qc_png"]).is_file() and second.attrs["qc_png"] != first.attrs["qc_png"]
    # other tiling parameters: another plan
    third = wsi.make_spec(store, **{**TINY, "min_tissue": 0.9}).build().extract(row)
    assert third.attrs["tile_plan"] == "computed" and third.coords.shape[0] <= first.coords.shape[0]
    # an edited slide (new mtime) is planned again
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert wsi.make_spec(store, **TINY).build().extract(row).attrs["tile_plan"] == "computed"


def test_unreadable_plan_is_recomputed(slide: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    row = ManifestRow("P1", "wsi", slide, "s", 2)
    wsi.make_spec(store, **TINY).build().extract(row)
    (plan,) = plans_dir_for(store).glob("*.npz")
    plan.write_bytes(b"not a zip")
    assert PlanCache(plans_dir_for(store)).load(plan.stem) is None
    assert wsi.make_spec(store, **{**TINY, "seed": 2}).build().extract(row).attrs["tile_plan"] == "computed"
