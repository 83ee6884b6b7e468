"""The 1-channel R3D-18 volume encoder: weights loading (safetensors, torch weights_only, 3->1 channel fold),
loud seeded random init, precision, registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmcli.features.encoders import runtime
from mmcli.features.encoders.registry import create_encoder, list_encoders
from mmcli.features.encoders.volume import R3D18Encoder, build_r3d18
from mmcli.pipeline.errors import InputError

X = np.random.default_rng(0).normal(size=(2, 1, 16, 16, 16)).astype(np.float32)


def test_registered_and_shapes() -> None:
    assert "r3d18" in list_encoders("mri")
    enc = create_encoder("r3d18", device="cpu", precision="fp32", seed=3, quiet=True)
    out = enc.encode(X)
    assert out.shape == (2, 512) and out.dtype == np.float32 and np.isfinite(out).all()
    assert enc.provenance()["pretrained"] is False and enc.provenance()["seed"] == 3
    with pytest.raises(ValueError, match=r"\(B, 1, Z, Y, X\)"):
        enc.encode(X[:, 0])


def test_random_init_is_loud_seeded_and_reproducible(capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Changed with the one random-init warning of ``encoders.runtime``: it was a stderr banner plus a Python
    ``UserWarning`` (said twice); it is now one message, as for image encoders, so the test checks that it is
    said, and said exactly once for two encoders with the same seed."""
    runtime._WARNED.clear()
    a = R3D18Encoder(device="cpu", precision="fp32", seed=4711)
    R3D18Encoder(device="cpu", precision="fp32", seed=4711)
    said = capsys.readouterr().err + caplog.text
    assert said.count("NO PRETRAINED WEIGHTS for encoder 'r3d18'") == 1 and "seed 4711" in said
    # issue 29 item 1: which weights to fetch, from where, and how mmcli takes them
    assert "--weights FILE" in said and "https://download.pytorch.org/models/r3d_18-" in " ".join(said.split())
    b = R3D18Encoder(device="cpu", precision="fp32", seed=4711, quiet=True)
    c = R3D18Encoder(device="cpu", precision="fp32", seed=4712, quiet=True)
    np.testing.assert_array_equal(a.encode(X), b.encode(X))
    assert not np.allclose(a.encode(X), c.encode(X))
    assert a.encoder_id == b.encoder_id != c.encoder_id


def test_safetensors_weights_load_and_change_the_id(tmp_path: Path) -> None:
    torch.manual_seed(123)
    ref = build_r3d18().eval()
    path = tmp_path / "r3d18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    enc = R3D18Encoder(weights=path, device="cpu", precision="fp32")
    with torch.inference_mode():
        expect = ref(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(enc.encode(X), expect, rtol=1e-4, atol=1e-5)
    prov = enc.provenance()
    assert prov["pretrained"] is True and len(prov["weights_sha256"]) == 64
    assert enc.encoder_id != R3D18Encoder(device="cpu", precision="fp32", quiet=True).encoder_id
    # with weights the init seed does not matter (and is not part of the id)
    assert R3D18Encoder(weights=path, device="cpu", precision="fp32", seed=9).encoder_id == enc.encoder_id


def test_three_channel_video_checkpoint_is_folded(tmp_path: Path) -> None:
    from torchvision.models.video import r3d_18

    torch.manual_seed(5)
    video = r3d_18(weights=None)  # Kinetics-style layout: 3-channel stem, 400-class fc
    path = tmp_path / "r3d18_kinetics.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in video.state_dict().items()}}, path)
    enc = R3D18Encoder(weights=path, device="cpu", precision="fp32")
    folded = enc.model.stem[0].weight.detach()
    torch.testing.assert_close(folded, video.stem[0].weight.detach().sum(1, keepdim=True))
    assert "folded" in enc.provenance()["weight_notes"][0]
    # a grey input through the folded stem equals the RGB input (x, x, x) through the original stem
    grey = torch.from_numpy(X[:1])
    with torch.inference_mode():
        a = enc.model.stem[0](grey)
        b = torch.nn.functional.conv3d(grey.repeat(1, 3, 1, 1, 1), video.stem[0].weight, stride=(2, 2, 2),
                                       padding=(1, 3, 3))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"layer9.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(InputError, match="do not fit r3d_18"):
        R3D18Encoder(weights=path, device="cpu", precision="fp32")
    with pytest.raises(InputError, match="not found"):
        R3D18Encoder(weights=tmp_path / "nope.pt", device="cpu")


def test_bf16_autocast_matches_fp32() -> None:
    fp32 = R3D18Encoder(device="cpu", precision="fp32", seed=1, quiet=True).encode(X)
    bf16 = R3D18Encoder(device="cpu", precision="bf16", seed=1, quiet=True).encode(X)
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99
    with pytest.raises(InputError):
        R3D18Encoder(device="cpu", precision="int8", quiet=True)
