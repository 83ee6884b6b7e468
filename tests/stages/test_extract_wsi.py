"""``mmcli extract --modality wsi`` end to end: bad slides reported with exit 1 while the rest are stored,
resume skips cached slides (no encoder calls), --force, unsafe ids exit 2 before any work, dask parity."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.slides import tissue_image, write_aperio, write_generic
from mmcli.cli import app
from mmcli.features.encoders.image import ImageEncoder
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.extract import extract

OPTS = ["--encoder", "timm:test_resnet", "--patch-size", "32", "--mpp", "1.0", "--batch-size", "16",
        "--min-tissue-area", "2000", "--no-progress"]


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    img = tissue_image(384, 320, 0.5, seed=7)
    write_aperio(tmp_path / "P1_a.svs", img, 0.5, downsamples=(1, 4))
    write_generic(tmp_path / "P1_b.tif", tissue_image(384, 320, 0.25, seed=8), 0.25, downsamples=(1, 2))
    write_aperio(tmp_path / "P2_a.svs", tissue_image(384, 320, 0.5, seed=9), 0.5, downsamples=(1, 4))
    write_generic(tmp_path / "P3_blank.tif", tissue_image(384, 320, 0.5, blank=True), 0.5)
    (tmp_path / "P4_bad.svs").write_bytes(b"\x00corrupt" * 64)
    rows = ["patient_id,modality,path,item_id", "P1,wsi,P1_a.svs,a", "P1,wsi,P1_b.tif,b", "P2,wsi,P2_a.svs,a",
            "P3,wsi,P3_blank.tif,blank", "P4,wsi,P4_bad.svs,bad", "P5,wsi,slides/P5_gone.svs,gone",
            "P1,mri,P1_a.svs,T1"]  # another modality's row: ignored by --modality wsi
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count encoder batches."""
    seen: list[int] = []
    forward = ImageEncoder.forward

    def counting(self, batch):
        seen.append(len(batch))
        return forward(self, batch)

    monkeypatch.setattr(ImageEncoder, "forward", counting)
    return seen


def _run(*args: str):
    return CliRunner().invoke(app, ["extract", "--modality", "wsi", *OPTS, *args])


def _items(store: Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, dict]]:
    s = open_store(store, "r")
    out = {}
    for k in s.iter_items("wsi"):
        it = s.read_item(k.modality, k.encoder_id, k.patient_id, k.item_id)
        out[(k.patient_id, k.item_id)] = (it.features, it.coords, it.attrs)
    return out


@pytest.mark.slow
def test_bad_slides_reported_rest_stored_then_resume(cohort: Path, calls: list[int]) -> None:
    store = cohort / "features.zarr"
    r = _run("--manifest", str(cohort / "manifest.csv"), "--store", str(store))
    assert r.exit_code == 1, r.output
    out = r.stdout
    assert "done 4, cached 0, failed 1, missing 1" in out
    assert "failed: P4/bad (manifest line 6" in out and "P4_bad.svs" in out
    assert "missing: P5/gone" in out and "no tissue found" in out
    items = _items(store)
    assert set(items) == {("P1", "a"), ("P1", "b"), ("P2", "a"), ("P3", "blank")}
    assert items[("P3", "blank")][0].shape == (0, 96)
    feats, coords, attrs = items[("P1", "a")]
    assert feats.shape[0] == coords.shape[0] > 0 and feats.dtype == np.float16
    assert attrs["pretrained"] is False and attrs["complete"] is True and attrs["source_fingerprint"]["size"] > 0
    assert Path(attrs["qc_png"]).is_file()
    n_tiles = sum(v[0].shape[0] for v in items.values())
    assert sum(calls) == n_tiles
    record = json.loads(Path(out.strip().splitlines()[-1].split("run record: ")[1]).read_text())
    assert (record["done"], record["failed"], record["missing"], record["exit_code"]) == (4, 1, 1, 1)

    # resume: every good slide is cached, the encoder is never called; the bad ones are reported again
    calls.clear()
    r2 = _run("--manifest", str(cohort / "manifest.csv"), "--store", str(store))
    assert r2.exit_code == 1 and "done 0, cached 4, failed 1, missing 1" in r2.stdout
    assert calls == []

    # a replaced slide is re-extracted (fingerprint), the rest stay cached
    write_aperio(cohort / "P2_a.svs", tissue_image(384, 320, 0.5, seed=10), 0.5, downsamples=(1, 4))
    (cohort / "P4_bad.svs").unlink()
    r3 = _run("--manifest", str(cohort / "manifest.csv"), "--store", str(store))
    assert "done 1, cached 3, failed 0, missing 2" in r3.stdout and r3.exit_code == 1
    assert sum(calls) == _items(store)[("P2", "a")][0].shape[0]

    # --force redoes everything
    calls.clear()
    r4 = _run("--manifest", str(cohort / "manifest.csv"), "--store", str(store), "--force")
    assert "done 4, cached 0" in r4.stdout and sum(calls) == sum(v[0].shape[0] for v in _items(store).values())


def test_unsafe_ids_exit_2_before_any_work(cohort: Path, calls: list[int]) -> None:
    (cohort / "bad_ids.csv").write_text("patient_id,modality,path\nP1,wsi,P1_a.svs\n../P9,wsi,P2_a.svs\n")
    store = cohort / "s.zarr"
    r = _run("--manifest", str(cohort / "bad_ids.csv"), "--store", str(store))
    assert r.exit_code == 2 and "unsafe patient_id" in r.stderr and "line 3" in r.stderr
    assert not store.exists() and calls == []


def test_usage_errors_exit_2(cohort: Path) -> None:
    m, s = str(cohort / "manifest.csv"), str(cohort / "s.zarr")
    assert _run("--manifest", m, "--store", s, "--mpp", "-1").exit_code == 2
    assert _run("--store", s).exit_code == 2  # no manifest
    r = CliRunner().invoke(app, ["extract", "--modality", "pet", "--manifest", m, "--store", s])
    assert r.exit_code == 2 and "no extractor" in r.stderr
    with pytest.raises(InputError, match="--volume-index does not apply to --modality wsi"):
        extract("wsi", m, s, volume_index=1, progress=False)


@pytest.mark.slow
def test_dask_local_cluster_equals_in_process(cohort: Path) -> None:
    (cohort / "P4_bad.svs").unlink()
    kw = dict(encoder="timm:test_resnet", patch_size=32, mpp=1.0, precision="fp32", min_tissue_area=2000,
              progress=False)
    a = extract("wsi", cohort / "manifest.csv", cohort / "a.zarr", **kw)
    b = extract("wsi", cohort / "manifest.csv", cohort / "b.zarr", scheduler="local", workers=2, **kw)
    assert b.scheduler == "local" and a.encoder_id == b.encoder_id
    assert [(o.patient_id, o.item_id, o.status) for o in a.outcomes] == \
        [(o.patient_id, o.item_id, o.status) for o in b.outcomes]
    ia, ib = _items(cohort / "a.zarr"), _items(cohort / "b.zarr")
    assert set(ia) == set(ib) and len(ia) == 4
    for k in ia:
        assert np.array_equal(ia[k][1], ib[k][1])
        np.testing.assert_allclose(ia[k][0].astype(np.float32), ib[k][0].astype(np.float32), rtol=1e-2, atol=1e-2)
    assert {o.patient_id for o in b.outcomes if o.status == "done"} == {"P1", "P2", "P3"}
    assert os.path.isdir(f"{cohort / 'b.zarr'}.qc")
