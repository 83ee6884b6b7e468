"""The stage-1 registries (encoders, slide readers, h5 formats, modalities): unknown names list the choices, and a
lookup imports only the module that defines the name (checked in a fresh interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcli.features.encoders.registry import ENCODERS, create_encoder, list_encoders, resolve, route
from mmcli.features.interop.formats import FORMATS, get_format
from mmcli.features.modalities import MODALITIES
from mmcli.features.readers import READER_CHOICES, READERS, reader_order
from mmcli.pipeline.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of the interesting modules it imported."""
    watch = ["torch", "transformers", "mmcli.features.encoders.image", "mmcli.features.encoders.volume",
             "mmcli.features.encoders.text", "mmcli.features.wsi", "mmcli.features.mri", "mmcli.features.text"]
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {watch!r}}}))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_image_encoder_lookup_imports_only_the_image_encoders() -> None:
    seen = _modules_after("from mmcli.features.encoders.registry import create_encoder\n"
                          "enc = create_encoder('resnet50_trunc', device='cpu')\n"
                          "assert enc._module is None\n"
                          "assert enc.encoder_id.startswith('resnet50_trunc-')\n"
                          "assert enc._module is None")
    assert seen["mmcli.features.encoders.image"]
    assert not seen["mmcli.features.encoders.text"] and not seen["mmcli.features.encoders.volume"]
    # the id holds the precision this process computes in, which needs torch's device query; the network itself
    # is built on first use
    assert not seen["transformers"]


def test_prefixed_and_text_lookups_import_their_module_only() -> None:
    seen = _modules_after("from mmcli.features.encoders.registry import resolve\nresolve('timm:resnet18')")
    assert seen["mmcli.features.encoders.image"] and not seen["mmcli.features.encoders.text"]
    seen = _modules_after("from mmcli.features.encoders.registry import resolve\nresolve('hf:org/name')")
    assert seen["mmcli.features.encoders.text"]
    assert not seen["mmcli.features.encoders.image"] and not seen["mmcli.features.encoders.volume"]
    assert not seen["torch"] and not seen["transformers"]


def test_looking_up_a_modality_imports_that_module_and_no_torch() -> None:
    seen = _modules_after("from mmcli.features.modalities import MODALITIES\nm = MODALITIES.get('wsi')\n"
                          "m.build_options({'patch_size': 32})")
    assert seen["mmcli.features.wsi"] and not seen["mmcli.features.mri"] and not seen["mmcli.features.text"]
    assert not seen["torch"]


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(InputError, match=r"unknown encoder 'nope'\. Fix: --encoder takes one of \[.*resnet50_trunc"):
        create_encoder("nope")
    with pytest.raises(InputError, match=r"unknown format 'gigapath'\. Fix: --format takes one of "
                                         r"\['clam', 'stamp', 'trident'\]"):
        get_format("gigapath")
    with pytest.raises(InputError, match=r"unknown modality 'pet'\. Fix: --modality takes one of "
                                         r"\['mri', 'slide', 'text', 'wsi'\]"):
        MODALITIES.get("pet")
    with pytest.raises(ValueError, match=r"unknown reader 'bioformats'; choose one of \['auto', 'cucim', "):
        reader_order("bioformats")


def test_encoder_names_route_by_prefix_and_folder(tmp_path: Path) -> None:
    assert route("resnet50_trunc") == ("resnet50_trunc", {})
    assert route("timm:hf-hub:org/model") == ("timm:", {"model_name": "hf-hub:org/model"})
    assert route("hf:org/model") == ("hf:", {"model_name": "org/model"})
    assert route(str(tmp_path)) == ("hf:", {"model_name": str(tmp_path)})  # a local model folder is text
    assert resolve("timm:resnet18")[0] == "wsi" and resolve("r3d18")[0] == "mri"
    assert resolve("minilm-l6")[0] == "text"
    assert set(list_encoders()) >= {"resnet50_trunc", "timm:", "r3d18", "minilm-l6", "hf:"}
    assert list_encoders("mri") == ["r3d18"]
    assert ENCODERS.describe()["resnet50_trunc"]["modality"] == "wsi"


def test_readers_and_formats_are_registries() -> None:
    assert READER_CHOICES[0] == "auto" and set(READER_CHOICES[1:]) == set(READERS.names())
    assert READERS.describe()["cucim"]["auto_rank"] == 0
    assert {n: FORMATS.entry(n).meta["coords"] for n in FORMATS.names()} == \
        {"clam": "level-0 px", "trident": "level-0 px", "stamp": "um"}
    assert get_format("STAMP").features_key == "feats"


def test_modality_registry_fills_the_options_a_preset_implies() -> None:
    """The preset tiling policy lives on the modality registry (``Modality.implied_options``), not in a
    ``modality == "wsi"`` branch of the extract stage: a preset sets mpp / patch size where the modality takes them,
    a given value wins, and a modality without those options gets nothing implied."""
    import inspect

    from mmcli.stages import extract as extract_stage

    wsi = MODALITIES.get("wsi")
    opts = wsi.build_options({"encoder": "conch-v1.5", "patch_size": None})
    assert (opts.mpp, opts.patch_size) == (0.5, 448)
    assert wsi.build_options({"encoder": "conch-v1.5", "patch_size": 256}).patch_size == 256
    assert wsi.implied_options({"encoder": "resnet50_trunc"}) == {}
    assert MODALITIES.get("text").implied_options({"encoder": "uni"}) == {}  # text takes no mpp / patch size
    assert '== "wsi"' not in inspect.getsource(extract_stage)


def test_preset_and_slide_encoder_lookups_import_no_torch() -> None:
    """Issue 22: preset and slide-encoder names come from their decorators; looking one up imports its module
    only (no torch, no text or volume encoders)."""
    seen = _modules_after("from mmcli.features.encoders.registry import resolve\n"
                          "assert resolve('uni')[0] == 'wsi' and resolve('chief')[0] == 'slide'\n"
                          "from mmcli.features.interop.formats import get_format\nget_format('stamp')")
    assert not seen["torch"] and not seen["transformers"]
    assert not seen["mmcli.features.encoders.text"] and not seen["mmcli.features.encoders.volume"]
