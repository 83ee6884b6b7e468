"""Foundation-model presets, offline: each architecture is built with random weights, saved with the published
key layout and file name, loaded through the preset (dimension, normalisation, pooling checked), and a wrong
checkpoint is refused (strict keys and shapes) with exit 2.

Test-only override: the networks are built with a reduced depth (``depth`` / ``num_hidden_layers`` = 2) through
``arch_overrides``. The key names, widths and shapes are the published ones; only the number of transformer
blocks is smaller (a full ViT-g is over a billion parameters, too big for a unit test). The full-depth layout is
still checked: the reduced checkpoint is refused by the real preset, naming the missing blocks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.features.encoders.presets import PRESETS, build_network, create_preset, expected_keys, tiling_defaults
from mmcli.features.encoders.registry import PRESET_NAMES, create_encoder, list_encoders
from mmcli.pipeline.errors import InputError

SMALL = {"dinov2-hf": {"num_hidden_layers": 2}}


def _small(name: str) -> dict[str, int]:
    return SMALL.get(PRESETS[name].arch, {"depth": 2})


def random_network(name: str, overrides: dict[str, int] | None = None) -> torch.nn.Module:
    """The preset's network with random N(0, 0.02) weights (built on the meta device and filled: timm's own
    init of these widths takes tens of seconds on a busy CPU)."""
    with torch.device("meta"):
        net = build_network(PRESETS[name], overrides or _small(name))
    net = net.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    return net.eval()


def _save(name: str, folder: Path, net: torch.nn.Module | None = None) -> Path:
    p = PRESETS[name]
    net = net or random_network(name)
    sd = dict(net.state_dict())  # the network's keys are the published ones (CONCH's trunk under trunk.)
    if p.extra_keys:  # published parts the tile encoder does not use (CONCH's text projection)
        sd.update({k: torch.zeros(768, 512) for k in p.extra_keys})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / p.weights_file
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_loads_published_layout(tmp_path: Path, name: str) -> None:
    p = PRESETS[name]
    net = random_network(name)
    path = _save(name, tmp_path / "w", net)
    assert path.name == p.weights_file
    enc = create_preset(name, weights=tmp_path / "w", device="cpu", precision="fp32", arch_overrides=_small(name))
    assert enc.dim == p.dim and enc.mean == p.mean and enc.std == p.std
    size = p.patch_size
    batch = np.random.default_rng(0).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    out = enc.encode(batch)
    assert out.shape == (2, p.dim) and np.isfinite(out).all()
    # the weights are the saved ones and the normalisation is the preset's: same output as by hand
    x = torch.as_tensor(batch).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = net(x).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    prov = enc.provenance()
    assert prov["preset"] == name and prov["pretrained"] and prov["weights_sha256"]


def test_virchow2_output_is_cls_and_mean_patch_tokens() -> None:
    net = random_network("virchow2", {"depth": 1})
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        tokens = net.trunk(x)
        out = net(x)
    assert tokens.shape[1] == 1 + 4 + 256  # CLS + 4 registers + 16x16 patches
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


def test_wrong_checkpoints_are_refused(tmp_path: Path) -> None:
    uni = _save("uni", tmp_path / "uni")
    with pytest.raises(InputError, match="not a UNI2-h .*missing key") as e:  # another model's file
        create_preset("uni2-h", weights=uni, arch_overrides={"depth": 2})
    assert e.value.exit_code == 2
    with pytest.raises(InputError, match=r"missing key\(s\) \['blocks.10") as e:  # full depth: blocks 2..23 lack
        create_preset("uni", weights=uni)
    sd = torch.load(uni, weights_only=True)
    sd["pos_embed"] = torch.zeros(1, 10, 1024)
    torch.save(sd, tmp_path / "shape.bin")
    with pytest.raises(InputError, match="another shape, e.g. pos_embed"):
        create_preset("uni", weights=tmp_path / "shape.bin", arch_overrides={"depth": 2})
    with pytest.raises(InputError, match="presets are never downloaded"):
        create_preset("virchow2", weights=tmp_path / "empty_dir_does_not_exist")


def test_cli_refuses_wrong_weights_with_exit_2(tmp_path: Path) -> None:
    from helpers.slides import tissue_image, write_aperio

    write_aperio(tmp_path / "s.svs", tissue_image(256, 256, 0.5, seed=1), 0.5)
    (tmp_path / "m.csv").write_text("patient_id,modality,path\nP1,wsi,s.svs\n")
    uni = _save("uni", tmp_path / "uni")
    res = CliRunner().invoke(app, ["extract", "--modality", "wsi", "--manifest", str(tmp_path / "m.csv"),
                                   "--store", str(tmp_path / "s.zarr"), "--encoder", "h-optimus-0",
                                   "--weights", str(uni), "--no-progress"])
    assert res.exit_code == 2 and "not a H-optimus-0" in res.output


def test_registry_and_tiling_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(PRESET_NAMES) == set(PRESETS) and set(PRESETS) <= set(list_encoders("wsi"))
    assert tiling_defaults("conch-v1.5") == {"mpp": 0.5, "patch_size": 448}
    assert tiling_defaults("resnet50_trunc") == {}
    assert {p.dim for p in PRESETS.values()} == {1024, 1536, 2560, 768}
    # the Hugging Face cache is a source too (no download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / "models--MahmoodLab--UNI" / "snapshots" / "abc"
    _save("uni", snap)
    (tmp_path / "hub" / "models--MahmoodLab--UNI" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--MahmoodLab--UNI" / "refs" / "main").write_text("abc")
    enc = create_preset("uni", arch_overrides={"depth": 2})
    assert enc.weights.kind == "hf-cache" and enc.weights.path.endswith("pytorch_model.bin")
    with pytest.raises(InputError, match="presets are never downloaded"):
        create_encoder("uni2-h")


def test_preset_sets_tiling_unless_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``extract --encoder conch-v1.5`` tiles 448 px at 0.5 µm/px; a given --patch-size wins."""
    from mmcli.stages import extract as extract_stage

    seen = {}
    real = extract_stage.modality_of("wsi")

    class Spy:
        options, unit, build_options = real.options, real.unit, real.build_options

        def make_spec(self, store: str, opts: object, **_: object) -> None:
            seen.update(mpp=opts.mpp, patch_size=opts.patch_size)
            raise InputError("stop here")

    monkeypatch.setattr(extract_stage, "modality_of", lambda name: Spy())
    (tmp_path / "m.csv").write_text("patient_id,modality,path\nP1,wsi,s.svs\n")
    (tmp_path / "s.svs").write_bytes(b"x")  # the spec is only built once some file of the cohort exists
    for given, want in (({}, (0.5, 448)), ({"patch_size": 256}, (0.5, 256))):
        with pytest.raises(InputError, match="stop here"):
            extract_stage.extract("wsi", tmp_path / "m.csv", tmp_path / "s.zarr", encoder="conch-v1.5",
                                  progress=False, **given)
        assert (seen["mpp"], seen["patch_size"]) == want
    assert expected_keys(PRESETS["uni"], {"depth": 1})["pos_embed"] == (1, 197, 1024)
