"""WSI extraction: one slide -> tissue mask -> mpp-aware tile plan -> tiles decoded in threads ahead of the
encoder -> (features, coords) for the store, plus a QC image beside the store.

:class:`WsiOptions` holds every option with its unit and range; :func:`make_spec` validates them once, names the
store group (``encoder_id``) without loading the network and carries the options as JSON to
:class:`WSIExtractor`, which the runner builds once per process (each dask worker loads its encoder once and
re-validates the options) and calls per slide.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from mmcli.features.encoders.image import ImageEncoder
from mmcli.features.encoders.registry import create_encoder, resolve
from mmcli.features.encoders.runtime import load_state_dict, resolve_device
from mmcli.features.modalities import ExtractorOptions, coerce, register
from mmcli.features.readers import READER_CHOICES, SlideError, open_slide, slide_opener
from mmcli.features.runner import ExtractorSpec, ItemError, ItemExtractor, ItemResult, ProgressFn, set_torch_threads
from mmcli.features.tiling import TilePlan, default_read_threads, iter_tile_batches, plan_tiles
from mmcli.features.tissue import TissueParams, qc_image, save_png_atomic, tissue_mask
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import make_encoder_id
from mmcli.pipeline.manifest import ManifestRow

MODALITY = "wsi"
DEFAULT_ENCODER = "resnet50_trunc"
FEATURE_DTYPES = ("float16", "float32")
_FP16_MAX = 65504.0


class WsiOptions(ExtractorOptions):
    """Options of ``extract --modality wsi``. Those that change the features (encoder, weights, seed without
    weights, mpp, patch size, tissue settings) are part of the ``encoder_id``; the rest are recorded per item."""

    encoder: str = Field(DEFAULT_ENCODER, min_length=1, description="an image encoder: resnet50_trunc, "
                         "timm:NAME or timm:hf-hub:ORG/NAME")
    weights: str | None = Field(None, description="encoder weights file: .safetensors, or .pth/.pt read with "
                                "weights_only=True (default: the Hugging Face cache, else a seeded random init)")
    seed: int = Field(0, description="seed of the random init used when no weights exist, an integer")
    batch_size: int = Field(64, ge=1, description="tiles per encoder batch, an integer >= 1")
    read_threads: int | None = Field(None, ge=1, description="tile reading/decoding threads per slide, an "
                                     "integer >= 1 (default: min(8, cores), at least 2)")
    mpp: float = Field(0.5, gt=0, allow_inf_nan=False, description="tile resolution in µm/px, > 0 (0.5 is "
                       "about 20x, 0.25 about 40x)")
    patch_size: int = Field(224, ge=8, description="tile side in pixels at --mpp, an integer >= 8")
    reader: Literal[READER_CHOICES] = Field(  # type: ignore[valid-type]
        "auto", description=f"slide reader, one of {' | '.join(READER_CHOICES)} (auto: cuCIM when installed, "
        "then OpenSlide, then tiffslide)")
    default_mpp: float | None = Field(None, gt=0, allow_inf_nan=False, description="level-0 µm/px assumed for "
                                      "slides without mpp metadata, > 0 (default: such slides fail, named)")
    min_tissue: float = Field(0.25, ge=0, le=1, description="minimum tissue fraction of a kept tile, in [0, 1]")
    tissue_threshold: float | None = Field(None, ge=0, le=1, description="HSV saturation threshold of tissue, in "
                                           "[0, 1] (default: Otsu, floored at 0.06)")
    min_tissue_area: float | None = Field(None, ge=0, allow_inf_nan=False, description="tissue pieces smaller "
                                          "than this are dropped, in µm², >= 0 (default: 20000)")
    qc: bool = Field(True, description="write a QC PNG per slide to <store>.qc/, true | false")
    feature_dtype: Literal[FEATURE_DTYPES] = Field(  # type: ignore[valid-type]
        "float16", description=f"stored feature dtype, one of {' | '.join(FEATURE_DTYPES)}")

    @field_validator("weights", mode="before")
    @classmethod
    def _absolute(cls, v: Any) -> Any:
        """Absolute, so that dask workers in other folders find the same file."""
        return str(Path(v).expanduser().resolve()) if v else None

    def tissue_params(self) -> TissueParams:
        tissue = TissueParams()
        if self.tissue_threshold is not None:
            tissue = replace(tissue, saturation_threshold=float(self.tissue_threshold))
        if self.min_tissue_area is not None:
            tissue = replace(tissue, min_area_um2=float(self.min_tissue_area))
        return tissue


def qc_dir_for(store: str | Path, encoder_id: str) -> Path:
    """QC images live beside the store: ``<store>.qc/<encoder_id>/<patient_id>/<item_id>.png``."""
    p = Path(store).resolve()
    return p.with_name(p.name + ".qc") / encoder_id


def _build_encoder(opts: WsiOptions) -> ImageEncoder:
    name = opts.encoder
    modality, _, _ = resolve(name)
    if modality != MODALITY:
        raise InputError(f"--encoder {name!r} is a {modality} encoder, not an image (wsi) encoder.")
    try:
        enc = create_encoder(name, weights=opts.weights, seed=opts.seed, device=opts.device,
                             precision=opts.precision)
    except FileNotFoundError as e:
        raise InputError(f"--weights {e.filename}: file not found.") from e
    except ValueError as e:
        raise InputError(f"--encoder {name}: {e}") from e
    if not isinstance(enc, ImageEncoder):
        raise InputError(f"--encoder {name!r} is not an image encoder")
    return enc


@register(MODALITY, options=WsiOptions, unit="tile")
def make_spec(store: str | Path, options: WsiOptions | None = None, **given: Any) -> ExtractorSpec:
    """Validate the WSI options (a :class:`WsiOptions`, or its fields as keywords) and return the picklable
    recipe the runner executes.

    The ``encoder_id`` covers the encoder, its weights and every parameter that changes the features (mpp,
    patch size, tissue settings); reader, device, precision and ``default_mpp`` are recorded per item instead.
    """
    opts: WsiOptions = coerce(options, WsiOptions, given)
    enc = _build_encoder(opts)
    if opts.weights:  # a checkpoint that is no plain state dict (e.g. pickled code) stops the run before any slide
        try:
            load_state_dict(opts.weights)
        except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for bad files
            raise InputError(f"--weights {opts.weights}: {e}") from e
    enc.warn_if_random()
    tile = {"mpp": float(opts.mpp), "patch_size": int(opts.patch_size), "min_tissue": float(opts.min_tissue),
            "tissue": opts.tissue_params().to_dict()}
    encoder_id = make_encoder_id(enc.name, enc.weights.sha256, {**enc.params(), **tile})
    kwargs = dict(options=opts.to_json(), weights_sha256=enc.weights.sha256, encoder_id=encoder_id,
                  qc_dir=str(qc_dir_for(store, encoder_id)) if opts.qc else None)
    return ExtractorSpec("mmcli.features.wsi:WSIExtractor", kwargs, MODALITY, encoder_id)


class WSIExtractor(ItemExtractor):
    """Slide -> (tile features (N, D), level-0 coords (N, 2)). Built from :func:`make_spec`'s kwargs: the
    options as JSON (validated again here, e.g. in a dask worker) and what the plan resolved."""

    modality = MODALITY

    def __init__(self, options: dict[str, Any], weights_sha256: str | None, encoder_id: str,
                 qc_dir: str | None) -> None:
        self.options = opts = WsiOptions.from_json(options, context="wsi extractor options")
        set_torch_threads(opts.torch_threads)
        self.encoder = _build_encoder(opts)
        if self.encoder.weights.sha256 != weights_sha256:  # e.g. a dask worker with another HF cache
            raise ItemError(f"encoder {opts.encoder}: this process resolves weights "
                            f"{self.encoder.weights.describe()} (sha256 {self.encoder.weights.sha256}), but the "
                            f"run was planned with sha256 {weights_sha256}. Fix: give every worker the same "
                            "--weights file.")
        self._encoder_id = encoder_id
        self.batch_size, self.read_threads = opts.batch_size, opts.read_threads or default_read_threads()
        self.mpp, self.patch_size, self.min_tissue = opts.mpp, opts.patch_size, opts.min_tissue
        self.reader, self.default_mpp = opts.reader, opts.default_mpp
        self.tissue = opts.tissue_params()
        self.qc_dir = Path(qc_dir) if qc_dir else None
        self.feature_dtype = np.dtype(opts.feature_dtype)

    @property
    def encoder_id(self) -> str:
        return self._encoder_id

    def encoder_attrs(self) -> dict[str, Any]:
        return {**self.encoder.provenance(), "modality": MODALITY, "mpp": self.mpp, "patch_size": self.patch_size,
                "min_tissue": self.min_tissue, "tissue_params": self.tissue.to_dict(),
                "options": self.options.to_json()}

    # ---- one slide -------------------------------------------------------------------------------------------
    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        t0 = time.perf_counter()
        try:
            reader = open_slide(row.path, self.reader, **self._reader_kwargs())
        except SlideError as e:
            raise ItemError(str(e)) from e
        warnings: list[str] = []
        with reader:
            slide_mpp, mpp_source = reader.mpp, "metadata"
            if slide_mpp is None:
                if self.default_mpp is None:
                    raise ItemError(
                        f"slide {row.path} has no microns-per-pixel metadata, so its magnification is unknown. "
                        "Fix: re-run with --default-mpp MPP (its scan resolution, e.g. 0.25 for 40x or 0.5 for "
                        "20x) to use that value for slides without metadata.")
                slide_mpp, mpp_source = float(self.default_mpp), "--default-mpp"
                warnings.append(f"no mpp metadata: used --default-mpp {slide_mpp}")
            try:
                mask, thumb = tissue_mask(reader, slide_mpp, self.patch_size * self.mpp, self.tissue)
                plan = plan_tiles(reader.level_dimensions, reader.level_downsamples, slide_mpp, self.mpp,
                                  self.patch_size, mask.mask, mask.scale, self.min_tissue)
            except SlideError as e:
                raise ItemError(str(e)) from e
            if plan.upsampled:
                warnings.append(f"target {self.mpp} µm/px is finer than the scan ({slide_mpp} µm/px): "
                                "tiles are upsampled")
            if plan.n == 0:
                warnings.append(f"no tissue found in {row.path.name}: stored with 0 tiles")
            qc_path = self._write_qc(row, thumb, mask.mask, plan, mask.scale)
            del thumb
            info = reader.info()
            feats, ran = self._encode(row.path, reader.name, plan, progress, warnings)
        seconds = time.perf_counter() - t0
        attrs = {
            **plan.attrs(), **info, **ran, "mpp_source": mpp_source, "n_tiles": plan.n,
            "tissue_threshold": round(mask.threshold, 5), "tissue_fraction": round(mask.fraction, 5),
            "tissue_thumb_mpp": round(mask.mpp, 4), "feature_dtype": str(feats.dtype),
            "seconds": round(seconds, 3), "tiles_per_s": round(plan.n / seconds, 2) if seconds > 0 else None,
            "qc_png": qc_path,
        }
        return ItemResult(feats, plan.coords, attrs, warnings)

    def _reader_kwargs(self) -> dict[str, Any]:
        """cuCIM options (other readers take none): decode on the GPU when the encoder runs there."""
        cuda = resolve_device(self.encoder.device).startswith("cuda")
        return {"device": "cuda" if cuda else "cpu", "num_workers": self.read_threads}

    def _write_qc(self, row: ManifestRow, thumb: np.ndarray, mask: np.ndarray, plan: TilePlan,
                  scale: tuple[float, float]) -> str | None:
        if self.qc_dir is None:
            return None
        path = self.qc_dir / row.patient_id / f"{row.item_id}.png"
        save_png_atomic(qc_image(thumb, mask, plan.coords, plan.patch_size_level0, scale), path)
        return str(path)

    def _encode(self, path: Path, reader_name: str, plan: TilePlan, progress: ProgressFn | None,
                warnings: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
        enc = self.encoder
        runtime = enc.runtime()
        if plan.n == 0:
            return np.zeros((0, enc.dim), self.feature_dtype), runtime
        opener = slide_opener(path, reader_name, **self._reader_kwargs())
        cuda = runtime["device"].startswith("cuda")
        feats: np.ndarray | None = None
        done = 0
        if progress:
            progress(0, plan.n)
        try:
            for start, batch in iter_tile_batches(opener, plan, self.batch_size, self.read_threads, pin_memory=cuda):
                y = enc.forward(batch).numpy()
                if feats is None:
                    feats = np.empty((plan.n, y.shape[1]), self.feature_dtype)
                if feats.dtype == np.float16 and y.size and np.abs(y).max() > _FP16_MAX:
                    warnings.append("features exceed the float16 range: stored as float32")
                    feats = feats.astype(np.float32)
                feats[start:start + len(y)] = y
                done += len(y)
                if progress:
                    progress(done, plan.n)
        except SlideError as e:
            raise ItemError(f"{e} (after {done} of {plan.n} tiles)") from e
        assert feats is not None and done == plan.n
        return feats, {**runtime, "batch_size": self.batch_size, "read_threads": self.read_threads}
