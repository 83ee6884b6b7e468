"""Text encoders from a local folder, the offline Hugging Face cache and the bundled MiniLM; never a download."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mmcli.features.encoders.registry import create_encoder, list_encoders
from mmcli.features.encoders.text import bundled_minilm_path, model_window
from mmcli.features.text import make_spec
from mmcli.pipeline.errors import InputError

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-d BERT saved with save_pretrained, with MiniLM's tokenizer files (a real local model)."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_minilm_path() / name, folder / name)
    return folder


def test_registry_names() -> None:
    names = list_encoders("text")
    assert "minilm-l6" in names and "hf:" in names


def test_local_folder_by_hf_prefix_or_bare_path(tiny_bert: Path) -> None:
    enc = create_encoder(f"hf:{tiny_bert}", device="cpu", precision="fp32")
    assert enc.dim == 32 and enc.name == f"hf:{tiny_bert.name}"
    # no sentence-transformers config: window = min(tokenizer limit 512, 128 position embeddings)
    assert model_window(tiny_bert) == 128 and enc.window == 128 and enc.stride == 32
    vec, stats = enc.embed("word " * 300)
    # 300 tokens, windows of 126 (+2 specials) advancing by 126 - 32: 1 + ceil((300 - 126) / 94) = 3
    assert vec.shape == (32,) and np.isfinite(vec).all() and stats == {"n_chunks": 3, "n_tokens": 300}
    spec_prefixed, spec_bare = make_spec(encoder=f"hf:{tiny_bert}"), make_spec(encoder=str(tiny_bert))
    assert spec_prefixed.encoder_id == spec_bare.encoder_id
    assert spec_bare.encoder_id != make_spec().encoder_id


def test_offline_hf_cache_name(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-bert" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_bert, snap)
    (cache / "models--acme--tiny-bert" / "refs").mkdir()
    (cache / "models--acme--tiny-bert" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    enc = create_encoder("hf:acme/tiny-bert", device="cpu", precision="fp32")
    assert enc.folder == snap and enc.name == "hf:acme/tiny-bert"
    assert make_spec(encoder="hf:acme/tiny-bert").encoder_id.startswith("hf_acme_tiny-bert-")


def test_uncached_names_fail_clearly_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError, match="neither a local folder nor in the offline Hugging Face cache"):
        make_spec(encoder="hf:acme/never-downloaded")
    with pytest.raises(InputError, match="not text"):
        make_spec(encoder="r3d18")


def test_bad_window_settings(tiny_bert: Path) -> None:
    with pytest.raises(InputError, match="stride"):
        create_encoder(f"hf:{tiny_bert}", device="cpu", max_tokens=64, stride=62)
    with pytest.raises(InputError, match="pooling"):
        make_spec(pooling="max")


def test_checkpoint_missing_weights_is_said_loudly(tiny_bert: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Weights that transformers has to initialise randomly get the one random-init warning of the image and
    volume encoders, and the items say pretrained=false."""
    from safetensors.torch import load_file, save_file

    from mmcli.features.encoders import runtime

    partial = tmp_path / "partial"
    shutil.copytree(tiny_bert, partial)
    sd = load_file(str(partial / "model.safetensors"))
    sd.pop("encoder.layer.1.output.dense.weight")
    save_file(sd, str(partial / "model.safetensors"), metadata={"format": "pt"})
    runtime._WARNED.clear()
    enc = create_encoder(str(partial), device="cpu", precision="fp32")
    said = capsys.readouterr().err + caplog.text
    assert said.count("NO PRETRAINED WEIGHTS for encoder 'hf:partial'") == 1
    assert "encoder.layer.1.output.dense.weight" in said
    assert enc.provenance()["pretrained"] is False
    assert create_encoder(str(tiny_bert), device="cpu", precision="fp32").provenance()["pretrained"] is True


def test_the_loss_type_notice_is_silenced(tiny_bert: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Issue 29 item 13: tracing the model (OpenVINO, torch.compile) reads ``loss_function``, and transformers then
    printed "`loss_type=None` was set in the config but it is unrecognized" during note encoding. The encoder
    installs a filter for that one message on transformers' logger; other messages still pass."""
    import logging

    enc = create_encoder(f"hf:{tiny_bert}", device="cpu")
    logger = logging.getLogger("transformers.modeling_utils")

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, None, None)

    assert not logger.filter(record("`loss_type=None` was set in the config but it is unrecognized."))
    assert logger.filter(record("some other warning"))
    _ = enc.model.loss_function  # what tracing does
    assert "loss_type" not in capfd.readouterr().err
