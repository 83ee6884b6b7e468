"""Clinical-note extraction: reading ``.txt`` notes and the text :class:`ItemExtractor`.

A note is read as UTF-8 (a BOM is dropped; Windows-1252 is accepted with a warning), encoded by a frozen
transformers model in overlapping windows (see :mod:`mmcli.features.encoders.text`) and pooled into **one**
embedding, stored as ``features`` of shape ``(1, dim)`` float32.

Data protection: the note's text never reaches the store, the run record or an error message. Items hold only
the embedding and provenance (model, weights hash, window, token and window counts, source fingerprint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.runner import ExtractorSpec, ItemError, ItemExtractor, ItemResult, ProgressFn, set_torch_threads
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import make_encoder_id
from mmcli.pipeline.manifest import ManifestRow

DEFAULT_ENCODER = "minilm-l6"
MAX_NOTE_BYTES = 50 * 1024 * 1024  # a larger ".txt" is almost surely not a clinical note


def read_note(path: str | Path) -> tuple[str, list[str]]:
    """Text of a note and warnings. Empty, binary or oversized files raise :class:`ItemError` (no content shown)."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError propagates: reported as "missing"
    if size > MAX_NOTE_BYTES:
        raise ItemError(f"{path.name}: {size} bytes is too large for a clinical note (limit {MAX_NOTE_BYTES})")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise ItemError(f"{path.name}: binary file (NUL bytes), not a text note")
    warnings: list[str] = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
        warnings.append(f"{path.name}: not valid UTF-8; decoded as Windows-1252")
    if not text.strip():
        raise ItemError(f"{path.name}: empty note ({size} bytes, no text after whitespace); nothing to encode")
    return text, warnings


def resolve_text_encoder(encoder: str | None) -> tuple[str, dict[str, Any], Path]:
    """``(registry name, factory kwargs, model folder)`` for ``--encoder``: a registered name such as
    ``minilm-l6``, ``hf:NAME_OR_FOLDER``, or a bare local model folder."""
    from mmcli.features.encoders.registry import resolve
    from mmcli.features.encoders.text import bundled_minilm_path, resolve_model_dir

    name = encoder or DEFAULT_ENCODER
    if Path(name).expanduser().is_dir():
        name = f"hf:{name}"
    try:
        modality, _, extra = resolve(name)
    except ValueError as e:
        raise InputError(f"{e}; or pass hf:NAME / a local model folder") from e
    if modality != "text":
        raise InputError(f"encoder {name!r} encodes {modality}, not text. Fix: use --encoder minilm-l6 or hf:NAME.")
    folder = resolve_model_dir(extra["model_name"]) if "model_name" in extra else bundled_minilm_path()
    return name, extra, folder


def text_encoder_id(encoder: str | None, max_tokens: int | None, stride: int | None, pooling: str) -> str:
    """Encoder id (model name + weights hash + window/stride/pooling), computed without loading the model."""
    from mmcli.features.encoders.text import display_name, model_weights_sha256, text_encoder_params

    name, extra, folder = resolve_text_encoder(encoder)
    shown = display_name(extra["model_name"]) if "model_name" in extra else name
    return make_encoder_id(shown, model_weights_sha256(folder), text_encoder_params(folder, max_tokens, stride,
                                                                                     pooling))


class TextExtractor(ItemExtractor):
    """One note -> one embedding row (``(1, dim)``); empty notes are reported, not encoded."""

    modality = "text"

    def __init__(
        self,
        encoder: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        max_tokens: int | None = None,
        stride: int | None = None,
        pooling: str = "mean",
        batch_size: int = 16,
        torch_threads: int | None = None,
    ) -> None:
        from mmcli.features.encoders.registry import create_encoder

        set_torch_threads(torch_threads)
        name, _, _ = resolve_text_encoder(encoder)
        self.encoder = create_encoder(name, device=device, precision=precision, max_tokens=max_tokens,
                                      stride=stride, pooling=pooling, batch_size=batch_size)
        self._id = text_encoder_id(encoder, max_tokens, stride, pooling)

    @property
    def encoder_id(self) -> str:
        return self._id

    def encoder_attrs(self) -> dict[str, Any]:
        return self.encoder.provenance()

    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        text, warnings = read_note(row.path)
        vec, stats = self.encoder.embed(text)
        del text  # nothing below may see the note
        if not np.isfinite(vec).all():
            raise ItemError(f"{Path(row.path).name}: encoder produced non-finite features")
        if progress:
            progress(1, 1)
        return ItemResult(vec[None, :].astype(np.float32), None, {"text": stats}, warnings)


def make_spec(
    encoder: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    max_tokens: int | None = None,
    stride: int | None = None,
    pooling: str = "mean",
    batch_size: int = 16,
    torch_threads: int | None = None,
) -> ExtractorSpec:
    """Picklable recipe of a :class:`TextExtractor`; resolves the model folder and encoder_id up front."""
    from mmcli.features.encoders.text import POOLINGS

    if pooling not in POOLINGS:
        raise InputError(f"unknown --pooling {pooling!r}; choose one of {POOLINGS}")
    encoder_id = text_encoder_id(encoder, max_tokens, stride, pooling)
    kwargs = dict(encoder=encoder, device=device, precision=precision, max_tokens=max_tokens, stride=stride,
                  pooling=pooling, batch_size=batch_size, torch_threads=torch_threads)
    return ExtractorSpec("mmcli.features.text:TextExtractor", kwargs, "text", encoder_id)
