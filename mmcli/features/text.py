"""Clinical-note extraction: reading ``.txt`` notes and the text :class:`ItemExtractor`.

A note is read as UTF-8 (a BOM is dropped; Windows-1252 is accepted with a warning) and encoded by a frozen
transformers model in overlapping windows (see :mod:`mmcli.features.encoders.text`). The item stores the
**per-window** embeddings as its ``N`` rows, ``features`` of shape ``(N, dim)`` float32, with, per window, in the
item attrs: ``text.window_chars`` (the window's ``[start, end)`` character offsets in the decoded note, from the
tokenizer's offset mapping) and ``row_weights`` (its token count, special tokens included). Vector heads pool the
rows by that token-weighted mean (:func:`mmcli.heads.data.load_cohort`), which is exactly the one embedding
per note that earlier versions stored as ``(1, dim)``; the report uses the windows to show which passages drive
a prediction. The layout is part of the ``encoder_id`` (:data:`ITEM_LAYOUT`), so windowed items never mix
with pooled ``(1, dim)`` items of older stores under one id (those stay readable under their own id).

Data protection: the note's text never reaches the store, the run record or an error message. Items hold only
the embeddings, character offsets, token counts and provenance (model, weights hash, window, token and window
counts, source fingerprint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from mmcli.features.encoders.runtime import RUNTIMES, check_backend
from mmcli.features.encoders.text import POOLINGS
from mmcli.features.modalities import ExtractorOptions, coerce, register
from mmcli.features.runner import ExtractorSpec, ItemError, ItemExtractor, ItemResult, ProgressFn, set_torch_threads
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import make_encoder_id
from mmcli.pipeline.manifest import ManifestRow

DEFAULT_ENCODER = "minilm-l6"
MAX_NOTE_BYTES = 50 * 1024 * 1024  # a larger ".txt" is almost surely not a clinical note
MAX_NOTE_CHARS = 200_000  # about 50k tokens, a few hundred windows: seconds, not the 20 min of a 5 MB note
# part of the encoder_id: items are per-window rows (not one pooled row, as before this layout existed)
ITEM_LAYOUT = {"rows": "windows"}


class TextOptions(ExtractorOptions):
    """Options of ``extract --modality text``. The model, its window, stride and pooling make the
    ``encoder_id``; device, precision, batch size and threads do not."""

    encoder: str = Field(DEFAULT_ENCODER, min_length=1, description="a text encoder: minilm-l6, hf:NAME (offline "
                         "Hugging Face cache) or a local model folder")
    max_tokens: int | None = Field(None, ge=3, description="window in tokens, special tokens included, an integer "
                                   ">= 3 (default: the model's own, 256 for minilm-l6)")
    stride: int | None = Field(None, ge=0, description="tokens shared by consecutive windows of a long note, an "
                               "integer >= 0 and below --max-tokens (default: max-tokens / 4)")
    pooling: Literal[POOLINGS] = Field(  # type: ignore[valid-type]
        "mean", description=f"token pooling per window, one of {' | '.join(POOLINGS)}")
    batch_size: int = Field(16, ge=1, description="windows per encoder batch, an integer >= 1")
    runtime: Literal[RUNTIMES] = Field(  # type: ignore[valid-type]
        "auto", description=f"inference runtime, one of {' | '.join(RUNTIMES)}; auto = OpenVINO on a CPU when "
        "installed, else torch")
    max_note_chars: int = Field(MAX_NOTE_CHARS, ge=1, description="characters of a note that are encoded, an "
                                "integer >= 1; a longer note is cut there, with a warning, and the cut is recorded "
                                "in the item (its encoding time grows with its length)")

    @model_validator(mode="after")
    def _stride_below_window(self) -> TextOptions:
        if self.max_tokens is not None and self.stride is not None and self.stride >= self.max_tokens:
            raise ValueError(f"--stride {self.stride} must be below --max-tokens {self.max_tokens}")
        return self


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


def bound_note(text: str, max_chars: int, name: str) -> tuple[str, dict[str, int] | None, list[str]]:
    """``text`` cut to its first ``max_chars`` characters; the cut (``{"chars_kept", "chars_original"}``, None
    when nothing was cut) and a warning naming the file (never its content)."""
    if len(text) <= max_chars:
        return text, None, []
    cut = {"chars_kept": max_chars, "chars_original": len(text)}
    return text[:max_chars], cut, [f"{name}: {len(text)} characters, only the first {max_chars} are encoded "
                                   "(--max-note-chars)"]


def resolve_text_encoder(encoder: str | None) -> tuple[str, dict[str, Any], Path]:
    """``(encoder name, factory kwargs, model folder)`` for ``--encoder``: a registered name such as
    ``minilm-l6``, ``hf:NAME_OR_FOLDER``, or a bare local model folder."""
    from mmcli.features.encoders.registry import resolve
    from mmcli.features.encoders.text import bundled_minilm_path, resolve_model_dir

    name = encoder or DEFAULT_ENCODER
    try:
        modality, _, extra = resolve(name)  # a local folder is routed to hf:
    except InputError as e:
        raise InputError(f"{e} Or pass hf:NAME or a local model folder.") from e
    if modality != "text":
        raise InputError(f"encoder {name!r} encodes {modality}, not text. Fix: use --encoder minilm-l6 or hf:NAME.")
    folder = resolve_model_dir(extra["model_name"]) if "model_name" in extra else bundled_minilm_path()
    return name, extra, folder


def text_encoder_id(encoder: str | None, max_tokens: int | None, stride: int | None, pooling: str) -> str:
    """Encoder id (model name + weights hash + window/stride/pooling), computed without loading the model."""
    from mmcli.features.encoders.text import display_name, model_weights_sha256, text_encoder_params

    name, extra, folder = resolve_text_encoder(encoder)
    shown = display_name(extra["model_name"]) if "model_name" in extra else name
    params = {**text_encoder_params(folder, max_tokens, stride, pooling), **ITEM_LAYOUT}
    return make_encoder_id(shown, model_weights_sha256(folder), params)


def window_chars(enc: Any) -> np.ndarray:
    """``(W, 2)`` int64 ``[start, end)`` character span of each window of :meth:`HFTextEncoder.tokenize`'s
    output: from the first to the last text token's offsets (special and padding tokens have empty spans)."""
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64)  # (W, L, 2)
    real = (np.asarray(enc["attention_mask"]) > 0) & (offsets[..., 1] > offsets[..., 0])
    starts = np.where(real, offsets[..., 0], np.iinfo(np.int64).max).min(axis=1)
    ends = np.where(real, offsets[..., 1], -1).max(axis=1)
    empty = ~real.any(axis=1)
    starts[empty], ends[empty] = 0, 0
    return np.stack([starts, ends], axis=1)


def embed_windows(encoder: Any, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Per-window embeddings ``(W, dim)`` float32, token counts ``(W,)`` (special tokens included), character
    spans ``(W, 2)`` and the stats of ``encoder.embed`` (``n_chunks``, ``n_tokens``).
    ``pool_windows(vecs, counts)`` is ``encoder.embed(text)[0]``, bit for bit."""
    vecs, counts, enc, stats = encoder.windows(text)  # tokenised ahead when the extractor prefetched this note
    return np.asarray(vecs, dtype=np.float32), np.asarray(counts, dtype=np.float64), window_chars(enc), stats


def pool_windows(vecs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The note's one embedding: the token-weighted mean of its windows (float64 arithmetic, float32 result),
    the formula of :meth:`HFTextEncoder.embed` and of :func:`mmcli.heads.data.load_cohort`'s ``row_weights``."""
    counts = np.asarray(counts, dtype=np.float64)
    return ((vecs * counts[:, None]).sum(0) / counts.sum()).astype(np.float32)


class TextExtractor(ItemExtractor):
    """One note -> its window embeddings (``(N, dim)``, offsets and token counts in the attrs); empty notes are
    reported, not encoded. Built from
    :func:`make_spec`'s kwargs: the options as JSON, validated again here (e.g. in a dask worker)."""

    modality = "text"

    def __init__(self, options: dict[str, Any]) -> None:
        from mmcli.features.encoders.registry import create_encoder

        self.options = opts = TextOptions.from_json(options, context="text extractor options")
        set_torch_threads(opts.torch_threads)
        name, _, _ = resolve_text_encoder(opts.encoder)
        self.encoder = create_encoder(name, device=opts.device, precision=opts.precision,
                                      max_tokens=opts.max_tokens, stride=opts.stride, pooling=opts.pooling,
                                      batch_size=opts.batch_size, runtime=opts.runtime, threads=opts.torch_threads)
        self._id = text_encoder_id(opts.encoder, opts.max_tokens, opts.stride, opts.pooling)

    @property
    def encoder_id(self) -> str:
        return self._id

    def encoder_attrs(self) -> dict[str, Any]:
        return {**self.encoder.provenance(), "options": self.options.to_json()}

    def prefetch(self, row: ManifestRow) -> None:
        """Read and tokenise the next note in the background while the encoder runs on this one."""
        self.encoder.prefetch(lambda: bound_note(read_note(row.path)[0], self.options.max_note_chars, "")[0])

    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        text, warnings = read_note(row.path)
        text, cut, more = bound_note(text, self.options.max_note_chars, Path(row.path).name)
        vecs, counts, spans, stats = embed_windows(self.encoder, text)
        del text  # nothing below may see the note
        if not np.isfinite(vecs).all():
            raise ItemError(f"{Path(row.path).name}: encoder produced non-finite features")
        if progress:
            progress(1, 1)
        # offsets and token counts only: the windows' text stays in the note file
        attrs: dict[str, Any] = {"text": {**stats, "truncated": cut, "window_chars": spans.tolist()},
                                 "row_weights": [int(c) for c in counts], **self.encoder.runtime()}
        return ItemResult(vecs, None, attrs, warnings + more)


@register("text", options=TextOptions, unit="note", aliases=("notes", "note", "clinical_notes", "reports"))
def make_spec(store: str | Path | None = None, options: TextOptions | None = None, *,
              cohort: Any = None, **given: Any) -> ExtractorSpec:
    """Picklable recipe of a :class:`TextExtractor` from a :class:`TextOptions` (or its fields as keywords);
    resolves the model folder and encoder_id up front. ``store`` and ``cohort`` (the manifest rows) are not
    needed."""
    opts: TextOptions = coerce(options, TextOptions, given)
    check_backend(opts.runtime, opts.device)  # a runtime that cannot run here: exit 2 before any item
    encoder_id = text_encoder_id(opts.encoder, opts.max_tokens, opts.stride, opts.pooling)
    return ExtractorSpec("mmcli.features.text:TextExtractor", {"options": opts.to_json()}, "text", encoder_id)
