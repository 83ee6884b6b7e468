"""Slide encoders (issue 27 item 13): CHIEF and MADELEINE strict-loaded from their published checkpoint layouts
(random values, written by the authors' own module definitions ported in ``helpers.peer_models``) give the
authors' forward on the same tile features; ``extract --modality slide`` stores them as a vector modality with
provenance that a vector head fits on; a checkpoint of the wrong layout is refused with exit 2 naming the keys."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import peer_models as peers
from mmcli.cli import app
from mmcli.features.encoders.registry import create_encoder, list_encoders
from mmcli.features.encoders.slide import create_slide_encoder
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store

MADELEINE_CONFIG = {"MODALITIES": ["HE"], "wsi_encoder": "abmil", "patch_embedding_dim": 512,
                    "wsi_encoder_hidden_dim": 512, "n_heads": 4, "activation": "softmax", "precision": "bfloat16"}


def _fill(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return net.eval()


def chief_checkpoint(folder: Path, seed: int = 0, organ: bool = True) -> tuple[Path, torch.nn.Module]:
    ref = _fill(peers.Chief(), seed)
    sd = dict(ref.state_dict())
    if not organ:
        del sd["organ_embedding"]  # what STAMP loads
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "CHIEF_pretraining.pth")
    return folder / "CHIEF_pretraining.pth", ref


def madeleine_checkpoint(folder: Path, seed: int = 1) -> tuple[Path, torch.nn.Module]:
    ref = _fill(peers.Madeleine(512, 512, 4), seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, folder / "model.pt")  # a DDP save
    (folder / "model_config.json").write_text(json.dumps(MADELEINE_CONFIG))
    return folder / "model.pt", ref


@pytest.mark.parametrize("organ", [True, False], ids=["trident-layout", "stamp-layout"])
def test_chief_matches_its_authors_forward(tmp_path: Path, organ: bool) -> None:
    path, ref = chief_checkpoint(tmp_path, organ=organ)
    enc = create_slide_encoder("chief", weights=path, device="cpu", precision="fp32")
    feats = torch.randn(37, 768)
    with torch.inference_mode():
        want = ref(feats)["WSI_feature"].numpy()
    got = enc.encode(feats.numpy())
    assert got.shape == (1, 768)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    prov = enc.provenance()
    assert prov["licence"] == "GPL-3.0" and prov["weights_sha256"] and prov["tile_encoders"] == ["chief-ctranspath"]


def test_madeleine_matches_encode_he(tmp_path: Path) -> None:
    path, ref = madeleine_checkpoint(tmp_path)
    enc = create_slide_encoder("madeleine", weights=path, device="cpu", precision="fp32")
    feats = torch.randn(25, 512)
    with torch.inference_mode():
        want = ref.encode_he(feats[None]).numpy()
    got = enc.encode(feats.numpy())
    assert got.shape == (1, 512) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert enc.config["n_heads"] == 4 and enc.provenance()["licence"] == "CC-BY-NC-ND-4.0"


def test_wrong_layouts_are_refused_naming_the_keys(tmp_path: Path) -> None:
    chief, _ = chief_checkpoint(tmp_path / "c")
    with pytest.raises(InputError, match=r"not a MADELEINE .*missing key\(s\) \['projector"):
        torch.save(torch.load(chief, weights_only=True), tmp_path / "c" / "model.pt")
        (tmp_path / "c" / "model_config.json").write_text(json.dumps(MADELEINE_CONFIG))
        create_slide_encoder("madeleine", weights=tmp_path / "c" / "model.pt")
    sd = torch.load(chief, weights_only=True)
    sd["attention_net.0.weight"] = torch.zeros(512, 1024)
    sd["extra.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"unexpected key\(s\) \['extra.bias'\].*attention_net.0.weight") as e:
        create_slide_encoder("chief", weights=tmp_path / "bad.pth")
    assert e.value.exit_code == 2
    with pytest.raises(InputError, match="needs --weights"):
        create_encoder("chief")
    (tmp_path / "c" / "model_config.json").unlink()
    with pytest.raises(InputError, match="model_config.json"):
        create_slide_encoder("madeleine", weights=tmp_path / "c" / "model.pt")
    assert {"chief", "madeleine"} <= set(list_encoders("slide"))


SLIDES = {"P1": ["a1"], "P2": ["b1", "b2"], "P3": ["c1"], "P4": ["d1"], "P5": ["e1"], "P6": ["f1"], "P7": ["g1"],
          "P8": ["h1"]}


def tile_store(path: Path, encoder: str = "chief-ctranspath", dim: int = 768, seed: int = 2) -> str:
    """A store as ``extract --encoder chief-ctranspath`` leaves it (slides themselves absent)."""
    rng = np.random.default_rng(seed)
    st = open_store(path, "a")
    eid = f"{encoder}-0123456789"
    st.set_encoder_attrs("wsi", eid, {"encoder": encoder, "preset": encoder, "dim": dim})
    for pid, items in SLIDES.items():
        for iid in items:
            n = int(rng.integers(3, 12))
            st.write_item("wsi", eid, pid, iid, rng.normal(size=(n, dim)).astype(np.float16),
                          rng.integers(0, 50, size=(n, 2)) * 224, {"patch_size_level0": 224})
    return eid


def _manifest(tmp_path: Path) -> Path:
    lines = ["patient_id,modality,path,item_id"] + [f"{p},wsi,slides/{i}.svs,{i}" for p, ii in SLIDES.items()
                                                    for i in ii]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def _extract(tmp_path: Path, store: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["extract", "--modality", "slide", "--encoder", "chief", "--weights",
                                   str(tmp_path / "w" / "CHIEF_pretraining.pth"), "--manifest",
                                   str(_manifest(tmp_path)), "--store", str(store), "--no-progress",
                                   "--device", "cpu", *extra])
    return res.exit_code, res.output


@pytest.mark.parametrize("store_name", ["s.zarr", "s.h5"])
def test_extract_slide_stores_a_vector_modality_with_provenance(tmp_path: Path, store_name: str) -> None:
    store = tmp_path / store_name
    tile_eid = tile_store(store)
    _, ref = chief_checkpoint(tmp_path / "w")
    code, text = _extract(tmp_path, store)
    assert code == 0, text
    assert "done 9" in text
    st = open_store(store, "r")
    (eid,) = st.encoders("slide")
    attrs = st.encoder_attrs("slide", eid)
    assert attrs["tile_encoder_id"] == tile_eid and attrs["tile_encoder"] == "chief-ctranspath"
    assert attrs["licence"] == "GPL-3.0" and attrs["weights_sha256"]
    for pid, items in SLIDES.items():
        for iid in items:
            tiles = st.read_item("wsi", tile_eid, pid, iid).features
            item = st.read_item("slide", eid, pid, iid)
            with torch.inference_mode():
                want = ref(torch.from_numpy(tiles.astype(np.float32)))["WSI_feature"].numpy()
            np.testing.assert_allclose(item.features, want, rtol=1e-5, atol=1e-6)
            assert item.coords is None and item.attrs["n_tiles"] == len(tiles) and item.attrs["licence"] == "GPL-3.0"
    code, text = _extract(tmp_path, store)  # unchanged tile items: cached
    assert code == 0 and "cached 9" in text, text
    open_store(store, "a").write_item("wsi", tile_eid, "P1", "a1", np.ones((4, 768), np.float16),
                                      np.zeros((4, 2), np.int64), {"patch_size_level0": 224})
    code, text = _extract(tmp_path, store)  # a re-extracted tile item re-encodes its slide only
    assert code == 0 and "done 1" in text and "cached 8" in text, text
    with torch.inference_mode():
        want = ref(torch.ones(4, 768))["WSI_feature"].numpy()
    np.testing.assert_allclose(open_store(store, "r").read_item("slide", eid, "P1", "a1").features, want, rtol=1e-5)


def test_slide_embeddings_feed_a_vector_head(tmp_path: Path) -> None:
    """The 'slide' modality fits with xgboost (a vector head) like any other vector modality."""
    store = tmp_path / "s.zarr"
    tile_store(store)
    chief_checkpoint(tmp_path / "w")
    assert _extract(tmp_path, store)[0] == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,y\n" + "".join(f"P{i},{i % 2}\n" for i in range(1, 9)))
    res = CliRunner().invoke(app, ["fit", "--head", "xgboost", "--store", str(store), "--labels", str(labels),
                                   "--target", "y", "--modalities", "slide", "--out", str(tmp_path / "run"),
                                   "--folds", "2", "--n-boot", "20"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "slide" in json.dumps(cfg) and (tmp_path / "run" / "predictions.csv").is_file()


def test_wrong_tile_features_and_missing_items(tmp_path: Path) -> None:
    """CHIEF reads CHIEF-CTransPath features: UNI's (1024-d) are refused by width, another 768-d encoder by name
    (exit 2, before any slide); a slide whose tile features are not cached fails by name (exit 1)."""
    chief_checkpoint(tmp_path / "w")
    tile_store(tmp_path / "uni.zarr", "uni", 1024)
    code, text = _extract(tmp_path, tmp_path / "uni.zarr")
    assert code == 2 and "768-d chief-ctranspath" in text and "1024-d uni" in text
    tile_store(tmp_path / "ct.zarr", "ctranspath", 768)
    code, text = _extract(tmp_path, tmp_path / "ct.zarr")
    assert code == 2 and "trained on chief-ctranspath" in text and "ctranspath's" in text
    store = tmp_path / "s.zarr"
    tile_store(store)
    manifest = _manifest(tmp_path)
    manifest.write_text(manifest.read_text() + "P9,wsi,slides/z.svs,z\n")
    res = CliRunner().invoke(app, ["extract", "--modality", "slide", "--encoder", "chief", "--weights",
                                   str(tmp_path / "w" / "CHIEF_pretraining.pth"), "--manifest", str(manifest),
                                   "--store", str(store), "--no-progress", "--device", "cpu"])
    assert res.exit_code == 1 and "P9/z" in res.output and "no cached tile features" in res.output
    res = CliRunner().invoke(app, ["extract", "--modality", "slide", "--encoder", "uni", "--manifest", str(manifest),
                                   "--store", str(store), "--no-progress"])
    assert res.exit_code == 2 and "not a slide encoder" in res.output


def test_trident_chief_features_imported_then_slide_encoded(tmp_path: Path) -> None:
    """TRIDENT's features_ctranspath/ are CHIEF-CTransPath features (TRIDENT loads CHIEF's checkpoint for them):
    imported, CHIEF takes them."""
    job = tmp_path / "job" / "20x_256px_0px_overlap" / "features_ctranspath"
    job.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for ii in SLIDES.values():
        for i in ii:
            with h5py.File(job / f"{i}.h5", "w") as h:
                h["features"] = rng.normal(size=(6, 768)).astype(np.float32)
                h.create_dataset("coords", data=rng.integers(0, 40, size=(6, 2)) * 512).attrs.update(
                    patch_size=256, patch_size_level0=512, target_magnification=20, level0_magnification=40)
    res = CliRunner().invoke(app, ["import", "--format", "trident", "--from", str(tmp_path / "job"), "--manifest",
                                   str(_manifest(tmp_path)), "--store", str(tmp_path / "s.zarr"), "--no-progress"])
    assert res.exit_code == 0, res.output
    chief_checkpoint(tmp_path / "w")
    code, text = _extract(tmp_path, tmp_path / "s.zarr")
    assert code == 0 and "done 9" in text, text
    st = open_store(tmp_path / "s.zarr", "r")
    (eid,) = st.encoders("slide")
    assert st.encoder_attrs("slide", eid)["tile_encoder"] == "chief-ctranspath"
