"""Image encoders: registry names, weights files (safetensors / weights_only .pth), the offline HF cache,
loud seeded random init, encoder ids, precision and devices."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from mmcli.features.encoders import image as image_mod
from mmcli.features.encoders import runtime
from mmcli.features.encoders.image import ImageEncoder
from mmcli.features.encoders.registry import create_encoder, list_encoders, resolve
from mmcli.features.encoders.runtime import cpu_has_bf16, load_state_dict, resolve_device, resolve_precision

TINY = "test_resnet"  # timm's ~0.4M-parameter test ResNet


def _batch(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference(model: torch.nn.Module, batch: np.ndarray, mean, std) -> np.ndarray:
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model.eval()(x).numpy()


def test_registry_names() -> None:
    names = list_encoders("wsi")
    assert "resnet50_trunc" in names and "timm:" in names
    assert resolve("timm:resnet18")[0] == "wsi"
    with pytest.raises(ValueError, match="unknown timm model"):
        create_encoder("timm:no_such_model_xyz")


def test_random_init_is_loud_seeded_and_recorded(capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The warning now comes from the one ``runtime.warn_random_init`` (its once-per-process memory is cleared
    there); it is said once per (encoder, seed), which is also checked now."""
    runtime._WARNED.clear()
    a = create_encoder(f"timm:{TINY}", seed=1, precision="fp32")
    b = create_encoder(f"timm:{TINY}", seed=1, precision="fp32")
    c = create_encoder(f"timm:{TINY}", seed=2, precision="fp32")
    x = _batch()
    fa, fb, fc = a.encode(x), b.encode(x), c.encode(x)
    said = capsys.readouterr().err + caplog.text
    assert "NO PRETRAINED WEIGHTS" in said
    assert said.count("NO PRETRAINED WEIGHTS for encoder 'timm:test_resnet'") == 2  # seeds 1 and 2, once each
    assert np.array_equal(fa, fb) and not np.allclose(fa, fc)
    assert a.encoder_id == b.encoder_id != c.encoder_id
    prov = a.provenance()
    assert prov["pretrained"] is False and prov["init_seed"] == 1 and prov["weights_sha256"] is None


def test_random_init_warning_names_the_weights_and_where_to_put_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29 item 1: the default encoder's warning names timm's resnet50.tv_in1k, the command that fetches it,
    the cache folder it goes into and --weights."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    runtime._WARNED.clear()
    enc = create_encoder("resnet50_trunc", seed=5, precision="fp32")
    assert enc.weights.kind == "random-init" and enc.weights.repo == "timm/resnet50.tv_in1k"
    enc.warn_if_random()
    said = " ".join((capsys.readouterr().err + caplog.text).split())
    assert "NO PRETRAINED WEIGHTS for encoder 'resnet50_trunc'" in said
    assert "resnet50.tv_in1k (timm/resnet50.tv_in1k)" in said
    assert "hf download timm/resnet50.tv_in1k model.safetensors" in said
    assert f"models--timm--resnet50.tv_in1k into {tmp_path / 'hub'}" in said and "--weights FILE" in said


def test_resnet50_trunc_is_layer3_avgpool(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    sd = {k: v for k, v in full.state_dict().items()}
    path = tmp_path / "resnet50.pth"
    torch.save(sd, path)  # torchvision / timm key names, classifier included (as CLAM's checkpoint)
    enc = create_encoder("resnet50_trunc", weights=path, precision="fp32")
    x = _batch(2, 64)
    got = enc.encode(x)
    assert got.shape == (2, 1024) and enc.dim == 1024
    trunk = torch.nn.Sequential(full.conv1, full.bn1, full.act1, full.maxpool, full.layer1, full.layer2,
                                full.layer3, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1))
    want = _reference(trunk, x, image_mod.IMAGENET_MEAN, image_mod.IMAGENET_STD)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert enc.provenance()["pretrained"] is True
    assert enc.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_files_load_and_name_the_encoder(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    model = timm.create_model(TINY, pretrained=False, num_classes=10)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # DDP-style wrapper
    enc = create_encoder(f"timm:{TINY}", weights=path, precision="fp32")
    model.reset_classifier(0)
    x = _batch()
    np.testing.assert_allclose(enc.encode(x), _reference(model, x, enc.mean, enc.std), rtol=1e-4, atol=1e-4)
    rand = create_encoder(f"timm:{TINY}", precision="fp32")
    assert enc.encoder_id != rand.encoder_id and enc.weights.kind == "file"


def test_pickled_objects_and_wrong_weights_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Custom()}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(evil)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(wrong))
    enc = create_encoder(f"timm:{TINY}", weights=wrong)
    with pytest.raises(ValueError, match="do not fit"):
        enc.encode(_batch())
    with pytest.raises(FileNotFoundError):
        create_encoder(f"timm:{TINY}", weights=tmp_path / "missing.pth")


class _Custom:
    pass


def _fake_hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The on-disk layout huggingface_hub uses: models--ORG--NAME/{refs/main, snapshots/<rev>/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("a" * 40)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_offline_hf_cache_is_used_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(5)
    model = timm.create_model(TINY, pretrained=False, num_classes=0)
    repo = timm.models.get_pretrained_cfg(TINY).hf_hub_id
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    snap = _fake_hf_cache(tmp_path, repo, {"model.safetensors": (tmp_path / "w.safetensors").read_bytes()})
    enc = create_encoder(f"timm:{TINY}", precision="fp32")
    assert enc.weights.kind == "hf-cache" and enc.weights.repo == repo
    assert Path(enc.weights.path).resolve() == (snap / "model.safetensors").resolve()
    x = _batch()
    np.testing.assert_allclose(enc.encode(x), _reference(model, x, enc.mean, enc.std), rtol=1e-4, atol=1e-4)
    # an hf-hub: name takes its architecture and normalisation from the cached config.json
    cfg = {"architecture": TINY, "num_classes": 0, "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    _fake_hf_cache(tmp_path, "lab/tiny-path", {
        "config.json": __import__("json").dumps(cfg).encode(),
        "model.safetensors": (tmp_path / "w.safetensors").read_bytes()})
    hub = create_encoder("timm:hf-hub:lab/tiny-path", precision="fp32")
    assert hub.arch == TINY and hub.mean == (0.5, 0.5, 0.5) and hub.weights.pretrained
    np.testing.assert_allclose(hub.encode(x), _reference(model, x, hub.mean, hub.std), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        create_encoder("timm:hf-hub:lab/absent")
    # nothing cached and offline: random init, no download
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert create_encoder(f"timm:{TINY}").weights.kind == "random-init"


def test_precision_and_device_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("int8", "cpu")
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device("cuda")


def test_reduced_precision_close_to_fp32() -> None:
    """runtime() now also names the inference runtime and its version (recorded per item)."""
    x = _batch(8, 64)
    ref = create_encoder(f"timm:{TINY}", precision="fp32").encode(x)
    for prec in ("bf16", "fp16"):
        enc = create_encoder(f"timm:{TINY}", precision=prec)
        got = enc.encode(x)
        assert enc.runtime() == {"device": "cpu", "precision": prec, "channels_last": True, "runtime": "torch",
                                 "runtime_version": torch.__version__}
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.99, (prec, cos.min())


def test_bad_batch_shape() -> None:
    enc = create_encoder(f"timm:{TINY}", precision="fp32")
    assert isinstance(enc, ImageEncoder)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enc.encode(np.zeros((2, 3, 32, 32), np.uint8))


def test_hf_offline_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf_downloads_allowed`` lives in ``encoders.runtime`` now (shared by image and text encoders)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not runtime.hf_downloads_allowed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert runtime.hf_downloads_allowed()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
