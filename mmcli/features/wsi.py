"""WSI extraction: one slide -> tissue mask -> mpp-aware tile plan -> tiles decoded in threads ahead of the
encoder -> (features, coords) for the store, plus a QC image beside the store.

:func:`make_spec` validates the options and names the store group (``encoder_id``) without loading the
network; :class:`WSIExtractor` is what the runner builds once per process (each dask worker loads its
encoder once) and calls per slide.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.encoders.image import PRECISIONS, ImageEncoder, load_state_dict, resolve_device
from mmcli.features.encoders.registry import create_encoder, resolve
from mmcli.features.readers import READER_NAMES, SlideError, open_slide, slide_opener
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


def qc_dir_for(store: str | Path, encoder_id: str) -> Path:
    """QC images live beside the store: ``<store>.qc/<encoder_id>/<patient_id>/<item_id>.png``."""
    p = Path(store).resolve()
    return p.with_name(p.name + ".qc") / encoder_id


def _build_encoder(name: str, weights: str | None, seed: int, device: str, precision: str) -> ImageEncoder:
    try:
        modality, _, _ = resolve(name)
    except ValueError as e:
        raise InputError(f"--encoder: {e}") from e
    if modality != MODALITY:
        raise InputError(f"--encoder {name!r} is a {modality} encoder, not an image (wsi) encoder.")
    try:
        enc = create_encoder(name, weights=weights, seed=seed, device=device, precision=precision)
    except FileNotFoundError as e:
        raise InputError(f"--weights {e.filename}: file not found.") from e
    except ValueError as e:
        raise InputError(f"--encoder {name}: {e}") from e
    if not isinstance(enc, ImageEncoder):
        raise InputError(f"--encoder {name!r} is not an image encoder")
    return enc


def make_spec(
    store: str | Path,
    encoder: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    read_threads: int | None = None,
    mpp: float = 0.5,
    patch_size: int = 224,
    reader: str = "auto",
    default_mpp: float | None = None,
    min_tissue: float = 0.25,
    tissue_threshold: float | None = None,
    min_tissue_area: float | None = None,
    qc: bool = True,
    seed: int = 0,
    feature_dtype: str = "float16",
    torch_threads: int | None = None,
) -> ExtractorSpec:
    """Validate WSI options and return the picklable recipe the runner executes.

    Units: ``mpp`` and ``default_mpp`` in µm/px (0.5 is about 20x, 0.25 about 40x), ``patch_size`` in pixels
    at ``mpp``, ``min_tissue`` a fraction of the tile, ``min_tissue_area`` in µm², ``tissue_threshold`` an
    HSV saturation in [0, 1] (default Otsu). The ``encoder_id`` covers the encoder, its weights and every
    parameter that changes the features (mpp, patch size, tissue settings); reader, device, precision and
    ``default_mpp`` are recorded per item instead.
    """
    _check(mpp > 0, f"--mpp must be positive, got {mpp}")
    _check(patch_size >= 8, f"--patch-size must be at least 8 pixels, got {patch_size}")
    _check(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    _check(read_threads is None or read_threads >= 1, f"--read-threads must be at least 1, got {read_threads}")
    _check(default_mpp is None or default_mpp > 0, f"--default-mpp must be positive, got {default_mpp}")
    _check(0.0 <= min_tissue <= 1.0, f"--min-tissue is a fraction in [0, 1], got {min_tissue}")
    _check(tissue_threshold is None or 0.0 <= tissue_threshold <= 1.0,
           f"--tissue-threshold is a saturation in [0, 1], got {tissue_threshold}")
    _check(reader in ("auto", *READER_NAMES), f"--reader must be auto or one of {READER_NAMES}, got {reader!r}")
    _check(precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {precision!r}")
    _check(device in ("auto", "cpu") or device.startswith("cuda"),
           f"--device must be auto, cpu or cuda, got {device!r}")
    _check(feature_dtype in FEATURE_DTYPES, f"--feature-dtype must be one of {FEATURE_DTYPES}")
    tissue = TissueParams()
    if tissue_threshold is not None:
        tissue = TissueParams(**{**asdict(tissue), "saturation_threshold": float(tissue_threshold)})
    if min_tissue_area is not None:
        _check(min_tissue_area >= 0, f"--min-tissue-area must be >= 0, got {min_tissue_area}")
        tissue = TissueParams(**{**asdict(tissue), "min_area_um2": float(min_tissue_area)})
    weights = str(Path(weights).expanduser().resolve()) if weights else None
    enc = _build_encoder(encoder, weights, seed, device, precision)
    if weights:  # a checkpoint that is no plain state dict (e.g. pickled code) stops the run before any slide
        try:
            load_state_dict(weights)
        except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for bad files
            raise InputError(f"--weights {weights}: {e}") from e
    enc.warn_if_random()
    tile = {"mpp": float(mpp), "patch_size": int(patch_size), "min_tissue": float(min_tissue),
            "tissue": tissue.to_dict()}
    encoder_id = make_encoder_id(enc.name, enc.weights.sha256, {**enc.params(), **tile})
    kwargs = dict(
        encoder=encoder, weights=weights, weights_sha256=enc.weights.sha256, seed=seed, device=device,
        precision=precision, batch_size=batch_size, read_threads=read_threads, mpp=float(mpp),
        patch_size=int(patch_size), reader=reader, default_mpp=default_mpp, min_tissue=float(min_tissue),
        tissue=tissue.to_dict(), qc_dir=str(qc_dir_for(store, encoder_id)) if qc else None,
        feature_dtype=feature_dtype, torch_threads=torch_threads, encoder_id=encoder_id,
    )
    return ExtractorSpec("mmcli.features.wsi:WSIExtractor", kwargs, MODALITY, encoder_id)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


class WSIExtractor(ItemExtractor):
    """Slide -> (tile features (N, D), level-0 coords (N, 2)). Built from :func:`make_spec`'s kwargs."""

    modality = MODALITY

    def __init__(self, encoder: str, weights: str | None, weights_sha256: str | None, seed: int, device: str,
                 precision: str, batch_size: int, read_threads: int | None, mpp: float, patch_size: int,
                 reader: str, default_mpp: float | None, min_tissue: float, tissue: dict[str, Any],
                 qc_dir: str | None, feature_dtype: str, torch_threads: int | None, encoder_id: str) -> None:
        set_torch_threads(torch_threads)
        self.encoder = _build_encoder(encoder, weights, seed, device, precision)
        if self.encoder.weights.sha256 != weights_sha256:  # e.g. a dask worker with another HF cache
            raise ItemError(f"encoder {encoder}: this process resolves weights {self.encoder.weights.describe()} "
                            f"(sha256 {self.encoder.weights.sha256}), but the run was planned with sha256 "
                            f"{weights_sha256}. Fix: give every worker the same --weights file.")
        self._encoder_id = encoder_id
        self.batch_size, self.read_threads = batch_size, read_threads or default_read_threads()
        self.mpp, self.patch_size, self.min_tissue = mpp, patch_size, min_tissue
        self.reader, self.default_mpp = reader, default_mpp
        self.tissue = TissueParams(**tissue)
        self.qc_dir = Path(qc_dir) if qc_dir else None
        self.feature_dtype = np.dtype(feature_dtype)

    @property
    def encoder_id(self) -> str:
        return self._encoder_id

    def encoder_attrs(self) -> dict[str, Any]:
        return {**self.encoder.provenance(), "modality": MODALITY, "mpp": self.mpp, "patch_size": self.patch_size,
                "min_tissue": self.min_tissue, "tissue_params": self.tissue.to_dict()}

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
