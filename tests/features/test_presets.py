"""Foundation-model presets, offline: each checkpoint is written in its published key layout (built with timm,
transformers or the peer's own module definitions, ported in ``helpers.peer_models``; random values), loaded
strictly through the preset, and its features compared with the peer's own forward on the same input.

Test-only override: the networks are built with a reduced depth (``depth`` / ``num_hidden_layers`` = 2) through
``arch_overrides``. Key names, widths and shapes are the published ones; only the number of transformer blocks
is smaller (a full ViT-g is over a billion parameters, too big for a unit test). The full-depth layout is still
checked: the reduced checkpoint is refused by the real preset, naming the missing blocks.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import peer_models as peers
from mmcli.cli import app
from mmcli.features.encoders import presets as P
from mmcli.features.encoders.presets import PRESETS, build_network, create_preset, expected_keys, tiling_defaults
from mmcli.features.encoders.registry import ENCODERS, create_encoder, list_encoders
from mmcli.features.encoders.runtime import resolve_precision
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.registry import decorated_names

SMALL = {"dinov2-cls": {"num_hidden_layers": 2}, "swin-avg": {}}
PHIKON_CONFIG = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 16, "image_size": 224, "layerscale_value": 1e-5, "mlp_ratio": 4,
                 "architectures": ["Dinov2Model"], "layer_norm_eps": 1e-6, "hidden_act": "gelu"}


def _small(name: str) -> dict[str, int]:
    return SMALL.get(PRESETS[name].kind, {"depth": 2})


def _fill(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in [*net.named_parameters(), *net.named_buffers()]:
            if t.dtype.is_floating_point and "attn_mask" not in k:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02 + (1.0 if k.endswith("running_var") else 0.0))
    return net.eval()


def random_network(name: str, overrides: dict[str, int] | None = None) -> torch.nn.Module:
    """mmcli's network of the preset with random N(0, 0.02) weights (built on the meta device and filled: timm's
    own init of these widths takes tens of seconds on a busy CPU)."""
    p = PRESETS[name]
    args = {**PHIKON_CONFIG} if p.config_file else None
    if args:
        args.pop("model_type"), args.pop("architectures")
    if p.kind == "swin-avg":
        return _fill(build_network(p, args, overrides))
    with torch.device("meta"):
        net = build_network(p, args, _small(name) if overrides is None else overrides)
    return _fill(net.to_empty(device="cpu"))


def published(name: str, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights in the published file's key layout."""
    p = PRESETS[name]
    sd = dict(net.state_dict())
    if p.kind in ("cls+mean", "dinov2-cls"):
        pre = "trunk." if p.kind == "cls+mean" else "model."
        sd = {k.removeprefix(pre): v for k, v in sd.items()}
    if p.kind == "conch-v1":  # the whole CoCa file: the vision tower under visual., the text parts beside
        sd = {f"visual.{k}": v for k, v in sd.items()}
        sd.update({"visual.proj_contrast": torch.zeros(512, 512), "text.token_embedding.weight": torch.zeros(4, 8),
                   "text_decoder.ln_final.weight": torch.zeros(8), "logit_scale": torch.zeros(())})
    return sd


def _save(name: str, folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    p = PRESETS[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(p.weights_files[0]).name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"model": sd} if p.kind == "swin-avg" else sd, path)
    if p.config_file:
        cfg = {**PHIKON_CONFIG, "num_hidden_layers": 2}
        (folder / p.config_file).write_text(json.dumps(cfg))
    return path


def _tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _normalised(batch: np.ndarray, p: P.Preset) -> torch.Tensor:
    x = torch.as_tensor(batch).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)


def _encoder(name: str, folder: Path) -> P.PresetEncoder:
    return create_preset(name, weights=folder, device="cpu", precision="fp32", arch_overrides=_small(name))


# ---- every preset: published layout in, the network's own forward out ------------------------------------------
@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.kind not in ("swin-avg", "conch-v1.5")])
def test_preset_loads_published_layout(tmp_path: Path, name: str) -> None:
    p = PRESETS[name]
    net = random_network(name)
    _save(name, tmp_path / "w", published(name, net))
    enc = _encoder(name, tmp_path / "w")
    assert enc.dim == p.dim and enc.mean == p.mean and enc.std == p.std
    batch = _tiles(2, p.input_size)
    out = enc.encode(batch)
    assert out.shape == (2, p.dim) and np.isfinite(out).all()
    with torch.inference_mode():
        want = net(_normalised(batch, p)).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    prov = enc.provenance()
    assert prov["preset"] == name and prov["pretrained"] and prov["weights_sha256"]
    assert prov["licence"] == p.licence and prov["licence_terms"] and "gated" in prov


TRIDENT_TIMM = {  # TRIDENT's timm_kwargs (patch_encoder_models/load.py), num_classes=0 left out
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                      "dynamic_img_size": True}),
    "uni2-h": ("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                         "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                         "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
                                         "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "global_pool": "token", "init_values": 1e-5,
                                                      "dynamic_img_size": True}),
    "prov-gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                                   "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                   "mlp_ratio": 5.33334, "dynamic_img_size": True}),
    "virchow": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375,
                                         "global_pool": "", "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked",
                                         "act_layer": "SiLU"}),
}


@pytest.mark.parametrize("name", list(TRIDENT_TIMM))
def test_timm_presets_match_tridents_loader(tmp_path: Path, name: str) -> None:
    """The published file strict-loads into the model TRIDENT builds (its timm_kwargs), and TRIDENT's forward
    (Virchow: CLS + mean of tokens[1:]) gives mmcli's features."""
    import timm

    from mmcli.features.encoders.preset_nets import resolved_args

    arch, kwargs = TRIDENT_TIMM[name]
    p = PRESETS[name]
    net = random_network(name)
    sd = published(name, net)
    _save(name, tmp_path / "w", sd)
    with torch.device("meta"):
        ref = timm.create_model(arch, pretrained=False, num_classes=0, **resolved_args({**kwargs, "depth": 2}))
    ref.load_state_dict(sd, strict=True, assign=True)
    batch = _tiles(2, 224, seed=4)
    with torch.inference_mode():
        out = ref.eval()(_normalised(batch, p))
        if p.kind == "cls+mean":
            out = torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1)
    np.testing.assert_allclose(_encoder(name, tmp_path / "w").encode(batch), out.numpy(), rtol=1e-4, atol=1e-4)


def test_virchow2_output_is_cls_and_mean_patch_tokens() -> None:
    net = random_network("virchow2", {"depth": 1})
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        tokens = net.trunk(x)
        out = net(x)
    assert tokens.shape[1] == 1 + 4 + 256  # CLS + 4 registers + 16x16 patches
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


# ---- the peers' own networks --------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [14, 28], ids=["pos224", "pos448"])
def test_conch_v15_loads_tridents_layout_and_matches_its_forward(tmp_path: Path, grid: int) -> None:
    """Issue 27 item 1: the published file has TRIDENT's bias-free pooler (to_q 768x768, to_kv 1536x1024, to_out
    768x768) and a 224-px position embedding, which TRIDENT re-grids at run time; mmcli re-grids it once at load
    and gives TRIDENT's features on the same 448-px tiles. A 448-px embedding (785 tokens) is resampled to the
    224 grid first, as TRIDENT's resize_pos_embed does."""
    ref = _fill(peers.TridentConchV15(depth=2), seed=3)
    sd = dict(ref.state_dict())
    assert tuple(sd["attn_pool_contrast.to_kv.weight"].shape) == (1536, 1024)
    assert "attn_pool_contrast.to_q.bias" not in sd
    if grid == 28:
        sd["trunk.pos_embed"] = torch.randn(1, 1 + 28 * 28, 1024) * 0.02
        ref.load_published(sd)
    _save("conch-v1.5", tmp_path / "w", sd)
    batch = _tiles(2, 448, seed=5)
    with torch.inference_mode():
        want = ref(_normalised(batch, PRESETS["conch-v1.5"])).numpy()
    got = _encoder("conch-v1.5", tmp_path / "w").encode(batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # the layout mmcli used to expect (an nn.MultiheadAttention pooler) is refused, naming the keys
    old = {k: v for k, v in sd.items() if "to_" not in k}
    old.update({"attn_pool_contrast.attn.q_proj_weight": torch.zeros(768, 768),
                "attn_pool_contrast.attn.in_proj_bias": torch.zeros(2304)})
    torch.save(old, tmp_path / "old.bin")
    with pytest.raises(InputError, match=r"missing key\(s\) \['attn_pool_contrast.to_kv.weight'.*unexpected key"):
        create_preset("conch-v1.5", weights=tmp_path / "old.bin", arch_overrides={"depth": 2})


def test_conch_v1_is_encode_image_without_projection(tmp_path: Path) -> None:
    """CONCH v1: the whole CoCa checkpoint (text tower, captioning pooler, projection beside the vision tower) is
    read, and the features equal CONCH's encode_image(x, proj_contrast=False, normalize=False): 512-d."""
    ref = _fill(peers.ConchV1Visual(depth=2), seed=6)
    sd = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    sd.update({"text.positional_embedding": torch.zeros(128, 768), "logit_scale": torch.zeros(())})
    _save("conch-v1", tmp_path / "w", sd)
    batch = _tiles(2, 448, seed=7)
    with torch.inference_mode():
        want = ref.forward_no_head(_normalised(batch, PRESETS["conch-v1"])).numpy()
    got = _encoder("conch-v1", tmp_path / "w").encode(batch)
    assert got.shape == (2, 512)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["ctranspath", "chief-ctranspath"])
def test_ctranspath_loads_stamps_layout_and_matches_its_forward(tmp_path: Path, name: str) -> None:
    """CTransPath / CHIEF-CTransPath: ``{'model': state_dict}`` of STAMP's timm-0.5 Swin (attn_mask and
    relative_position_index buffers, patch merging at the end of a stage) runs on timm's Swin with the same
    features as STAMP's own network."""
    ref = _fill(peers.StampCTransPath(), seed=8)
    sd = dict(ref.state_dict())
    assert "layers.0.blocks.1.attn_mask" in sd and "layers.0.downsample.reduction.weight" in sd
    _save(name, tmp_path / "w", sd)
    batch = _tiles(2, 224, seed=9)
    with torch.inference_mode():
        want = ref(_normalised(batch, PRESETS[name])).numpy()
    enc = create_preset(name, weights=tmp_path / "w", device="cpu", precision="fp32")
    got = enc.encode(batch)
    assert got.shape == (2, 768)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert enc.runtime()["precision"] == "fp32"


def test_phikon_v2_is_built_from_its_config_json(tmp_path: Path) -> None:
    """Phikon-v2's architecture is read from the published config.json beside model.safetensors (as
    ``AutoModel.from_pretrained`` does in TRIDENT): a config with another depth builds another network, and the
    features equal ``last_hidden_state[:, 0]`` of the transformers model loaded from that folder."""
    from transformers import AutoModel

    net = random_network("phikon-v2")
    _save("phikon-v2", tmp_path / "w", published("phikon-v2", net))
    batch = _tiles(2, 224, seed=10)
    ref = AutoModel.from_pretrained(tmp_path / "w").eval()
    with torch.inference_mode():
        want = ref(pixel_values=_normalised(batch, PRESETS["phikon-v2"])).last_hidden_state[:, 0].numpy()
    enc = create_preset("phikon-v2", weights=tmp_path / "w", device="cpu", precision="fp32")
    np.testing.assert_allclose(enc.encode(batch), want, rtol=1e-4, atol=1e-4)
    assert enc.model_args["num_hidden_layers"] == 2
    (tmp_path / "w" / "config.json").unlink()
    with pytest.raises(InputError, match="config.json"):
        create_preset("phikon-v2", weights=tmp_path / "w")


# ---- refusals, the cache, geometry, precision, licences --------------------------------------------------------
def test_wrong_checkpoints_are_refused(tmp_path: Path) -> None:
    uni = _save("uni", tmp_path / "uni", published("uni", random_network("uni")))
    with pytest.raises(InputError, match="not a UNI2-h .*missing key") as e:  # another model's file
        create_preset("uni2-h", weights=uni, arch_overrides={"depth": 2})
    assert e.value.exit_code == 2
    with pytest.raises(InputError, match=r"missing key\(s\) \['blocks.10"):  # full depth: blocks 2..23 lack
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
    uni = _save("uni", tmp_path / "uni", published("uni", random_network("uni")))
    res = CliRunner().invoke(app, ["extract", "--modality", "wsi", "--manifest", str(tmp_path / "m.csv"),
                                   "--store", str(tmp_path / "s.zarr"), "--encoder", "h-optimus-0",
                                   "--weights", str(uni), "--no-progress"])
    assert res.exit_code == 2 and "not a H-optimus-0" in res.output


def _cache(hub: Path, folder: str, files: dict[str, bytes | Path]) -> Path:
    snap = hub / folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data.read_bytes() if isinstance(data, Path) else data)
    (hub / folder / "refs").mkdir()
    (hub / folder / "refs" / "main").write_text("abc123")
    return snap


def test_hf_cache_lookup_is_case_insensitive_and_takes_safetensors(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27 item 6: timm caches ``MahmoodLab/uni`` (as TRIDENT, STAMP and the UNI README spell it) as
    ``models--MahmoodLab--uni`` and downloads ``model.safetensors`` first; the preset finds it offline, with no
    --weights, and records it as pretrained from the cache."""
    from safetensors.torch import save_file

    net = random_network("uni")
    save_file({k: v.contiguous() for k, v in published("uni", net).items()}, str(tmp_path / "m.st"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache(tmp_path / "hub", "models--MahmoodLab--uni", {"model.safetensors": tmp_path / "m.st"})
    enc = create_preset("uni", arch_overrides={"depth": 2}, device="cpu", precision="fp32")
    assert enc.weights.kind == "hf-cache" and enc.weights.path.endswith("model.safetensors")
    assert enc.weights.repo == "MahmoodLab/uni" and enc.provenance()["pretrained"] is True
    assert "Hugging Face cache MahmoodLab/uni" in enc.weights.describe()
    with pytest.raises(InputError, match="presets are never downloaded"):
        create_encoder("uni2-h")


def test_registry_names_are_declared_once(tmp_path: Path) -> None:
    """Issue 22: the lazy table is derived from the @register_encoder decorators; every preset has one and the
    preset table and the decorators name the same models."""
    source = Path(P.__file__).read_text()
    assert {name for name, _ in decorated_names(source, "register_encoder")} == set(PRESETS)
    assert set(PRESETS) <= ENCODERS.lazy_names() and set(PRESETS) <= set(list_encoders("wsi"))
    assert {"resnet50_trunc", "timm:", "hf:", "r3d18", "minilm-l6"} <= ENCODERS.lazy_names()
    assert tiling_defaults("conch-v1.5") == {"mpp": 0.5, "patch_size": 448}
    assert tiling_defaults("conch-v1.5", "trident") == {"mpp": 0.5, "patch_size": 512}
    assert tiling_defaults("uni", "trident") == {"mpp": 0.5, "patch_size": 256}
    assert tiling_defaults("resnet50_trunc") == {}
    assert expected_keys(PRESETS["uni"], overrides={"depth": 1})["pos_embed"] == (1, 197, 1024)


def test_trident_geometry_resizes_tiles_as_tridents_transform(tmp_path: Path) -> None:
    """``--preset-geometry trident``: 256-px tiles at 20x reach the network resized to 224 (antialiased bilinear,
    torchvision's Resize), the same as resizing by hand first; GigaPath's transform resizes to 256 and crops the
    centre 224."""
    import torchvision.transforms.v2.functional as TF  # noqa: N812

    net = random_network("uni")
    _save("uni", tmp_path / "w", published("uni", net))
    enc = _encoder("uni", tmp_path / "w")
    tiles = _tiles(2, 256, seed=11)
    resized = TF.resize(torch.as_tensor(tiles).permute(0, 3, 1, 2).float(), [224, 224], antialias=True)
    with torch.inference_mode():
        x = (resized / 255.0 - torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(P.IMAGENET_STD).view(
            1, 3, 1, 1)
        want = net(x).numpy()
    np.testing.assert_allclose(enc.encode(tiles), want, rtol=1e-4, atol=1e-4)
    g = P.ResizeToInput(torch.nn.Identity(), 224, 256, "bicubic")
    x = torch.rand(1, 3, 256, 256)
    torch.testing.assert_close(g(x), TF.center_crop(TF.resize(x, [256], interpolation=TF.InterpolationMode.BICUBIC,
                                                              antialias=True), [224, 224]))


def test_precision_defaults_follow_trident_and_enter_the_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    """Issue 27 item 8: --precision auto is each preset's TRIDENT dtype on a GPU (UNI2-h bf16, Phikon-v2 and
    CTransPath fp32, most fp16), fp32 on a CPU for the fp32 models; the effective precision is part of the
    encoder_id, so bf16 and fp32 features never share one."""
    import torch as _torch

    assert {n: p.precision for n, p in PRESETS.items()} == {
        "uni": "fp16", "uni2-h": "bf16", "virchow": "fp16", "virchow2": "fp16", "h-optimus-0": "fp16",
        "h-optimus-1": "fp16", "prov-gigapath": "fp16", "phikon-v2": "fp32", "conch-v1": "fp32",
        "conch-v1.5": "fp16", "ctranspath": "fp32", "chief-ctranspath": "fp32"}
    monkeypatch.setattr(_torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda", "bf16") == "bf16" and resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("auto", "cpu", "fp32") == "fp32" and resolve_precision("fp16", "cuda", "bf16") == "fp16"
    monkeypatch.setattr(_torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda", "bf16") == "fp32"
    _save("uni", tmp_path / "w", published("uni", random_network("uni")))
    ids = {prec: create_preset("uni", weights=tmp_path / "w", device="cpu", precision=prec,
                               arch_overrides={"depth": 2}).encoder_id for prec in ("fp32", "bf16")}
    assert ids["fp32"] != ids["bf16"]


def test_every_preset_records_licence_and_access() -> None:
    """Issue 27 item 11: licence, terms and gating per preset (the non-commercial ones say so)."""
    for p in PRESETS.values():
        assert p.licence and p.terms, p.name
    nc = {n for n, p in PRESETS.items() if "non-commercial" in p.terms.lower()}
    assert {"uni", "uni2-h", "virchow2", "conch-v1", "conch-v1.5", "phikon-v2", "h-optimus-1"} <= nc
    assert PRESETS["uni"].licence == "CC-BY-NC-ND-4.0" and PRESETS["h-optimus-0"].licence == "Apache-2.0"


def test_preset_sets_tiling_unless_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``extract --encoder conch-v1.5`` tiles 448 px at 0.5 µm/px; ``--preset-geometry trident`` 512 px at 20x;
    a given --patch-size wins."""
    from mmcli.stages import extract as extract_stage

    seen = {}
    real = extract_stage.modality_of("wsi")

    class Spy:
        name, options, unit, build_options, rows = real.name, real.options, real.unit, real.build_options, \
            real.rows

        def make_spec(self, store: str, opts: object, **_: object) -> None:
            seen.update(mpp=opts.mpp, patch_size=opts.patch_size)
            raise InputError("stop here")

    monkeypatch.setattr(extract_stage, "modality_of", lambda name: Spy())
    (tmp_path / "m.csv").write_text("patient_id,modality,path\nP1,wsi,s.svs\n")
    (tmp_path / "s.svs").write_bytes(b"x")  # the spec is only built once some file of the cohort exists
    for given, want in (({}, (0.5, 448)), ({"patch_size": 256}, (0.5, 256)),
                        ({"preset_geometry": "trident"}, (0.5, 512))):
        with pytest.raises(InputError, match="stop here"):
            extract_stage.extract("wsi", tmp_path / "m.csv", tmp_path / "s.zarr", encoder="conch-v1.5",
                                  progress=False, **given)
        assert (seen["mpp"], seen["patch_size"]) == want


def test_uni_from_the_cache_end_to_end_records_licence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27 "done when": ``extract --encoder uni`` with no --weights finds
    ``models--MahmoodLab--uni/snapshots/<rev>/model.safetensors`` offline, records the items as pretrained with
    UNI's licence in each item's provenance, and ``mmcli doctor`` reports the weights and the licence. (The
    preset is narrowed to 2 blocks for the test's speed, as everywhere in this file.)"""
    from safetensors.torch import save_file

    from helpers.slides import tissue_image, write_aperio
    from mmcli.pipeline.store import open_store

    monkeypatch.setitem(PRESETS, "uni", dataclasses.replace(PRESETS["uni"], args={**PRESETS["uni"].args, "depth": 2}))
    net = random_network("uni", {})
    save_file({k: v.contiguous() for k, v in published("uni", net).items()}, str(tmp_path / "m.st"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache(tmp_path / "hub", "models--MahmoodLab--uni", {"model.safetensors": tmp_path / "m.st"})
    write_aperio(tmp_path / "s.svs", tissue_image(448, 448, 0.5, seed=2), 0.5)
    (tmp_path / "m.csv").write_text("patient_id,modality,path\nP1,wsi,s.svs\n")
    res = CliRunner().invoke(app, ["extract", "--modality", "wsi", "--manifest", str(tmp_path / "m.csv"), "--store",
                                   str(tmp_path / "s.zarr"), "--encoder", "uni", "--no-progress", "--no-qc",
                                   "--runtime", "torch", "--precision", "fp32", "--min-tissue-area", "0"])
    assert res.exit_code == 0, res.output
    st = open_store(tmp_path / "s.zarr", "r")
    (eid,) = st.encoders("wsi")
    (key,) = list(st.iter_items("wsi", eid))
    a = st.read_item("wsi", eid, key.patient_id, key.item_id).attrs
    assert a["pretrained"] is True and a["weights_source"] == "hf-cache" and a["licence"] == "CC-BY-NC-ND-4.0"
    assert "non-commercial" in a["licence_terms"] and a["gated"] is True
    doc = CliRunner().invoke(app, ["doctor"])
    assert re.search(r"ok +uni: weights", doc.output)
    assert "model.safetensors" in doc.output and "CC-BY-NC-ND-4.0" in doc.output
