"""Learned segmentation with the published checkpoint layouts: HEST (torchvision deeplabv3_resnet50 in a Lightning
checkpoint) and GrandQC (segmentation-models-pytorch UnetPlusPlus / Unet, timm-efficientnet-b0). Checkpoints are
built here in each layout with random values; the forward is compared with TRIDENT's (a91fa84,
``trident/segmentation_models/load.py``), ported below; another layout exits 2 naming the keys."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from helpers.qc_slides import write_qc_slide
from mmcli.cli import app
from mmcli.features.qc.segmentation import SegmentationError, Segmenter, build_network, file_sha256
from mmcli.features.wsi import make_spec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import ManifestRow

QC = dict(encoder="timm:test_resnet", patch_size=64, mpp=0.5, batch_size=32, read_threads=2)
_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


# ---- checkpoints in the published layouts ------------------------------------------------------------------
def hest_checkpoint(path: Path, classes: int = 2, tissue_bias: float | None = None) -> Path:
    """HEST's ``deeplabv3_seg_v4.ckpt`` layout: a Lightning checkpoint whose ``state_dict`` holds the
    torchvision deeplabv3_resnet50 (aux classifier included, as trained) under ``model.``."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    net = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    net.classifier[4] = torch.nn.Conv2d(256, classes, kernel_size=1, stride=1)
    net.aux_classifier[4] = torch.nn.Conv2d(256, classes, kernel_size=1, stride=1)
    if tissue_bias is not None:  # push every pixel to tissue (> 0) or background (< 0)
        with torch.no_grad():
            net.classifier[4].weight.zero_()
            net.classifier[4].bias.copy_(torch.tensor([0.0, tissue_bias]))
    sd = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.9.0", "state_dict": sd}, path)
    return path


def grandqc_checkpoint(path: Path, artifact: bool = False, winner: int | None = None) -> Path:
    """GrandQC's plain state dicts: UnetPlusPlus (tissue, 2 classes) or Unet (artefacts, 8 classes)."""
    net = build_network("grandqc-artifact" if artifact else "grandqc")
    if winner is not None:
        with torch.no_grad():
            head = net.segmentation_head[0]
            head.weight.zero_()
            head.bias.fill_(-10.0)
            head.bias[winner] = 10.0
    torch.save(net.state_dict(), path)
    return path


# ---- TRIDENT's loaders and forwards, ported -------------------------------------------------------------------
def trident_hest(ckpt: Path, image: torch.Tensor, confidence_thresh: float = 0.5) -> torch.Tensor:
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None)  # TRIDENT: weights=None (backbone init is
    # downloaded, then overwritten by the checkpoint; offline here)
    model.classifier[4] = torch.nn.Conv2d(256, 2, kernel_size=1, stride=1)
    checkpoint = torch.load(ckpt, map_location="cpu")
    state_dict = {k.replace("model.", ""): v for k, v in checkpoint.get("state_dict", {}).items() if "aux" not in k}
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        logits = model(image)["out"]
    softmax_output = F.softmax(logits, dim=1)
    return (softmax_output[:, 1, :, :] > confidence_thresh).to(torch.uint8)


def trident_grandqc(ckpt: Path, image: torch.Tensor, confidence_thresh: float = 0.5) -> torch.Tensor:
    import segmentation_models_pytorch as smp

    model = smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2, activation=None)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model.eval()
    logits = model.predict(image)
    probs = torch.softmax(logits, dim=1)
    max_probs, predicted_classes = torch.max(probs, dim=1)
    return ((max_probs >= confidence_thresh) * (1 - predicted_classes)).to(torch.uint8)


def _patches(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _normalised(p: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255 - _MEAN) / _STD


@pytest.fixture(scope="module")
def hest_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hest_checkpoint(tmp_path_factory.mktemp("hest") / "deeplabv3_seg_v4.ckpt")


def test_hest_layout_loads_strictly_and_predicts_as_trident(hest_ckpt: Path) -> None:
    seg = Segmenter("hest", hest_ckpt)
    p = _patches()
    ours = seg.predict(p)
    theirs = trident_hest(hest_ckpt, _normalised(p)).numpy()
    assert ours.shape == (2, 64, 64) and np.array_equal(ours, theirs.astype(np.float32))
    prov = seg.provenance()
    assert prov["name"] == "hest" and prov["sha256"] == file_sha256(hest_ckpt) and prov["mpp"] == 1.0
    assert prov["input_size"] == 512


def test_a_three_class_checkpoint_exits_2_naming_the_keys(tmp_path: Path) -> None:
    bad = hest_checkpoint(tmp_path / "three.ckpt", classes=3)
    with pytest.raises(SegmentationError, match=r"classifier\.4\.weight: checkpoint \(3, 256, 1, 1\), model "
                                                r"\(2, 256, 1, 1\)"):
        Segmenter("hest", bad)
    slide = write_qc_slide(tmp_path / "a.svs", 512, 512, seed=1, margin=64).path
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"patient_id,modality,path,item_id\nP1,wsi,{slide},a\n")
    r = CliRunner().invoke(app, ["extract", "--modality", "wsi", "--manifest", str(manifest), "--store",
                                 str(tmp_path / "s.zarr"), "--encoder", "timm:test_resnet", "--tissue-model", "hest",
                                 "--tissue-weights", str(bad), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "classifier.4.weight" in r.output and "classifier.4.bias" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s.zarr").exists() or not list((tmp_path / "s.zarr").rglob("features*"))


def test_tissue_model_flags_are_checked(hest_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--tissue-weights"):
        make_spec(tmp_path / "s.zarr", **QC, tissue_model="hest")
    with pytest.raises(InputError, match="--tissue-model"):
        make_spec(tmp_path / "s.zarr", **QC, tissue_weights=str(hest_ckpt))
    with pytest.raises(InputError, match="file not found"):
        make_spec(tmp_path / "s.zarr", **QC, tissue_model="hest", tissue_weights=str(tmp_path / "none.ckpt"))
    # a GrandQC file given as HEST: refused, naming the keys
    with pytest.raises(InputError, match="not a hest checkpoint.*missing"):
        make_spec(tmp_path / "s.zarr", **QC, tissue_model="hest",
                  tissue_weights=str(grandqc_checkpoint(tmp_path / "g.pth")))


@pytest.mark.slow
def test_hest_segments_the_slide_and_is_recorded(tmp_path: Path) -> None:
    """A 512 x 512 µm slide is one 512-px patch at 10x. Forcing the model's class 1 everywhere keeps every grid
    tile, glass included (the saturation mask keeps only the tissue); forcing class 0 keeps none."""
    slide = write_qc_slide(tmp_path / "a.svs", 1024, 1024, seed=1, margin=256).path
    row = ManifestRow("P1", "wsi", slide, "a", 2)
    plain = make_spec(tmp_path / "s.zarr", **QC)
    r0 = plain.build().extract(row)
    ck = hest_checkpoint(tmp_path / "all.ckpt", tissue_bias=10.0)
    spec = make_spec(tmp_path / "s.zarr", **QC, tissue_model="hest", tissue_weights=str(ck))
    assert spec.encoder_id != plain.encoder_id
    r1 = spec.build().extract(row)
    assert len(r1.coords) == (1024 // 64) ** 2 > len(r0.coords)
    tm = r1.attrs["tissue_model"]
    assert tm["name"] == "hest" and tm["sha256"] == file_sha256(ck) and tm["weights"] == str(ck.resolve())
    none = hest_checkpoint(tmp_path / "none.ckpt", tissue_bias=-10.0)
    r2 = make_spec(tmp_path / "s.zarr", **QC, tissue_model="hest", tissue_weights=str(none)).build().extract(row)
    assert len(r2.coords) == 0


@pytest.mark.filterwarnings("ignore:`timm-` encoders are deprecated:DeprecationWarning")  # TRIDENT's own call
def test_grandqc_tissue_layout_and_forward_as_trident(tmp_path: Path) -> None:
    ck = grandqc_checkpoint(tmp_path / "Tissue_Detection_MPP10.pth")
    seg = Segmenter("grandqc", ck)
    p = _patches(size=64)
    seg.spec = replace(seg.spec, jpeg_quality=None)  # TRIDENT's JPEG step is OpenCV's: compared without it
    ours = seg.predict(p)
    theirs = trident_grandqc(ck, _normalised(p)).numpy()
    assert np.array_equal(ours, theirs.astype(np.float32))
    with pytest.raises(SegmentationError, match="not a grandqc checkpoint.*segmentation_head.0.weight: checkpoint "
                                                r"\(8,"):
        Segmenter("grandqc", grandqc_checkpoint(tmp_path / "art.pth", artifact=True))


def test_grandqc_artifact_model_removes_the_tiles_it_labels(tmp_path: Path) -> None:
    slide = write_qc_slide(tmp_path / "a.svs", 1024, 1024, seed=1, margin=128).path
    row = ManifestRow("P1", "wsi", slide, "a", 2)
    n_plain = len(make_spec(tmp_path / "s.zarr", **QC).build().extract(row).coords)
    pen = grandqc_checkpoint(tmp_path / "pen.pth", artifact=True, winner=4)  # class 4: pen marking everywhere
    spec = make_spec(tmp_path / "s.zarr", **QC, remove_artifacts="grandqc", artifact_weights=str(pen))
    r = spec.build().extract(row)
    assert len(r.coords) == 0 and r.attrs["tile_qc"]["removed"] == {"grandqc": n_plain}
    ok = grandqc_checkpoint(tmp_path / "ok.pth", artifact=True, winner=1)  # class 1: normal tissue
    r = make_spec(tmp_path / "s.zarr", **QC, remove_artifacts="grandqc", artifact_weights=str(ok)).build().extract(row)
    assert len(r.coords) == n_plain and r.attrs["tile_qc"]["removed"] == {}
    with pytest.raises(InputError, match="--artifact-weights .*not a grandqc-artifact checkpoint"):
        make_spec(tmp_path / "s.zarr", **QC, remove_artifacts="grandqc",
                  artifact_weights=str(grandqc_checkpoint(tmp_path / "t.pth")))
