"""WSI extraction: one slide -> tissue mask -> mpp-aware tile plan -> tiles decoded in threads ahead of the
encoder -> (features, coords) for the store, plus a QC image beside the store.

Between plan and encoder the optional before-encoding steps run (:mod:`mmcli.features.qc`): a learned tissue
mask, the annotation filter and GrandQC's artefact mask act on the plan before any tile is read; artefact
checks and stain normalisation act on each batch in the reader threads. Removed tiles are never encoded; every
tile's fate and scores go to the per-tile record beside the store.

:class:`WsiOptions` holds every option with its unit and range; :func:`make_spec` validates them once, names the
store group (``encoder_id``) without loading the network and carries the options as JSON to
:class:`WSIExtractor`, which the runner builds once per process (each dask worker loads its encoder once and
re-validates the options) and calls per slide.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from mmcli.features.encoders.image import ImageEncoder
from mmcli.features.encoders.presets import GEOMETRIES
from mmcli.features.encoders.registry import create_encoder, resolve
from mmcli.features.encoders.runtime import INT8, PRECISIONS, RUNTIMES, load_state_dict, resolve_backend, resolve_device
from mmcli.features.modalities import ExtractorOptions, coerce, register
from mmcli.features.qc.annotations import AnnotationError
from mmcli.features.qc.prep import TilePrep
from mmcli.features.qc.record import TileSelection, record_path, save_record
from mmcli.features.qc.resolve import artifact_params, id_params, resolve_prep, stain_normalizer
from mmcli.features.qc.segmentation import ARTIFACT_MODEL, file_sha256
from mmcli.features.qc.steps import grandqc_artifacts, model_tissue_mask, restrict_to_annotation
from mmcli.features.readers import READER_CHOICES, SlideError, open_slide, slide_opener
from mmcli.features.runner import ExtractorSpec, ItemError, ItemExtractor, ItemResult, ProgressFn, set_torch_threads
from mmcli.features.tileplan import PlanCache, SlidePlan, plan_key, plans_dir_for
from mmcli.features.tiling import TilePlan, default_read_threads, iter_tile_batches, plan_tiles
from mmcli.features.tissue import TissueParams, qc_image, save_png_atomic, tissue_mask
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import make_encoder_id, source_fingerprint
from mmcli.pipeline.manifest import ManifestRow

ARTIFACT_CHECKS = ("blur", "pen", "dark", "grandqc")  # == mmcli.features.qc.artifacts.CHECKS (a test checks)
STAIN_METHODS = ("macenko", "reinhard")
SEG_MODELS = ("hest", "grandqc")
MODALITY = "wsi"
DEFAULT_ENCODER = "resnet50_trunc"
FEATURE_DTYPES = ("float16", "float32")
WSI_PRECISIONS = (*PRECISIONS, INT8)
_FP16_MAX = 65504.0
DETECTIONS = {"tissue": 0}  # tissue detections in this process (a test counter: a reused plan adds none)


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
    preset_geometry: Literal[GEOMETRIES] = Field(  # type: ignore[valid-type]
        "native", description="tiling a foundation-model preset implies when --mpp / --patch-size are not given: "
        "native (the model's input size at its training resolution) | trident (TRIDENT's job grid: 256 px at "
        "20x, 512 for conch-v1.5, resized to the input size in the network)")
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
    precision: Literal[WSI_PRECISIONS] = Field(  # type: ignore[valid-type]
        "auto", description=f"one of {' | '.join(WSI_PRECISIONS)}; auto = fp16 on CUDA, bf16 on CPUs with native "
        "bf16, else fp32; int8 = OpenVINO after NNCF quantisation calibrated on this cohort's tissue tiles "
        "(its own encoder_id)")
    runtime: Literal[RUNTIMES] = Field(  # type: ignore[valid-type]
        "auto", description=f"inference runtime, one of {' | '.join(RUNTIMES)}; auto = OpenVINO on a CPU when "
        "installed, else torch")
    min_cosine: float = Field(0.99, gt=0, le=1, description="int8: least cosine of int8 to fp32 features on "
                              "held-out tissue tiles, in (0, 1]; below it the run is refused")
    calibration_tiles: int = Field(300, ge=8, description="int8: tissue tiles sampled across the cohort's "
                                   "slides to calibrate on (fewer when the cohort has fewer), an integer >= 8")
    # ---- before a tile is encoded (docs/extract.md); each one that is set changes the encoder_id ----
    remove_artifacts: tuple[Literal[ARTIFACT_CHECKS], ...] = Field(  # type: ignore[valid-type]
        (), description="artefact checks that remove tiles, comma-separated: blur (sharpness < --blur-threshold), "
        "pen (ink share >= --pen-max), dark (dark share >= --dark-max), grandqc (GrandQC artefact model, needs "
        "--artifact-weights; share >= --artifact-max) (default: none)")
    blur_threshold: float = Field(6.0, gt=0, allow_inf_nan=False, description="blur: least sharpness of a kept "
                                  "tile (variance of the Laplacian of the smoothed grey tile at --mpp, grey "
                                  "levels²), > 0")
    pen_max: float = Field(0.05, gt=0, le=1, description="pen: share of marker-ink pixels from which a tile is "
                           "removed, in (0, 1]")
    dark_max: float = Field(0.5, gt=0, le=1, description="dark: share of very dark pixels (HSV value < 0.25) from "
                            "which a tile is removed, in (0, 1]")
    artifact_weights: str | None = Field(None, description="grandqc: GrandQC artefact checkpoint "
                                         "(GrandQC_MPP1_state_dict.pth, smp Unet, 8 classes), a local file")
    artifact_max: float = Field(0.25, gt=0, le=1, description="grandqc: share of a tile labelled artefact (folds, "
                                "dark spots, pen, edges/air bubbles, out of focus) from which it is removed, in "
                                "(0, 1]")
    stain_norm: Literal[STAIN_METHODS] | None = Field(  # type: ignore[valid-type]
        None, description="stain normalisation of every tile before the encoder: macenko | reinhard "
        "(default: none)")
    stain_reference: str | None = Field(None, description="--stain-norm: reference image (PNG/JPEG/TIFF of "
                                        "stained tissue) (default: the built-in reference, docs/extract.md)")
    tissue_model: Literal[SEG_MODELS] | None = Field(  # type: ignore[valid-type]
        None, description="learned tissue segmentation instead of the saturation threshold: hest | grandqc "
        "(needs --tissue-weights) (default: none)")
    tissue_weights: str | None = Field(None, description="--tissue-model: the published checkpoint, a local "
                                       "file (hest: deeplabv3_seg_v4.ckpt; grandqc: Tissue_Detection_MPP10.pth)")
    tissue_geojson: str | None = Field(None, description="folder of QuPath/TRIDENT GeoJSON annotations, "
                                       "<slide stem>.geojson in level-0 pixels: only tiles whose centre lies "
                                       "inside are kept")
    geojson_classes: tuple[str, ...] = Field((), description="--tissue-geojson: keep only features of these "
                                             "QuPath classifications, comma-separated, e.g. Tumor (default: all)")

    @field_validator("weights", "artifact_weights", "stain_reference", "tissue_weights", "tissue_geojson",
                     mode="before")
    @classmethod
    def _absolute(cls, v: Any) -> Any:
        """Absolute, so that dask workers in other folders find the same file."""
        return str(Path(v).expanduser().resolve()) if v else None

    @field_validator("remove_artifacts", "geojson_classes", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        """``"blur,pen"`` (the flag) or a list; empty entries dropped, duplicates removed, order kept."""
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            out: list[str] = []
            for x in v:
                x = str(x).strip()
                if x and x not in out:
                    out.append(x)
            return tuple(out)
        return v

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


def _build_encoder(opts: WsiOptions, int8_model: str | None = None) -> ImageEncoder:
    """The image encoder of ``opts``; int8 is the fp32 network on OpenVINO replaced by ``int8_model``."""
    name = opts.encoder
    modality, _, _ = resolve(name)
    if modality != MODALITY:
        raise InputError(f"--encoder {name!r} is a {modality} encoder, not an image (wsi) encoder.")
    int8 = opts.precision == INT8
    if int8 and opts.runtime not in ("auto", "openvino"):
        raise InputError(f"--precision int8 runs on OpenVINO: it does not combine with --runtime {opts.runtime}. "
                         "Fix: --runtime auto or openvino.")
    try:
        resolve_backend("openvino" if int8 else opts.runtime, resolve_device(opts.device))
    except ValueError as e:
        raise InputError(f"--runtime {opts.runtime}" + (" (--precision int8)" if int8 else "") + f": {e}") from e
    try:
        enc = create_encoder(name, weights=opts.weights, seed=opts.seed, device=opts.device,
                             precision="fp32" if int8 else opts.precision,
                             runtime="openvino" if int8 else opts.runtime, threads=opts.torch_threads)
    except FileNotFoundError as e:
        raise InputError(f"--weights {e.filename}: file not found.") from e
    except ValueError as e:
        raise InputError(f"--encoder {name}: {e}") from e
    if not isinstance(enc, ImageEncoder):
        raise InputError(f"--encoder {name!r} is not an image encoder")
    enc.int8_model = int8_model
    return enc


def tile_params(opts: WsiOptions) -> dict[str, Any]:
    """The tiling and tissue parameters: part of the encoder_id and of every tile plan's key (a learned tissue
    model with its weights' sha256 only when one is used, so default ids and plans stay as they were)."""
    params = {"mpp": float(opts.mpp), "patch_size": int(opts.patch_size), "min_tissue": float(opts.min_tissue),
              "tissue": opts.tissue_params().to_dict()}
    if opts.tissue_model and opts.tissue_weights:
        params["tissue_model"] = {"name": opts.tissue_model, "sha256": file_sha256(opts.tissue_weights)}
    return params


@register("wsi", options=WsiOptions, unit="tile")
def make_spec(store: str | Path, options: WsiOptions | None = None, *, cohort: Sequence[ManifestRow] | None = None,
              **given: Any) -> ExtractorSpec:
    """Validate the WSI options (a :class:`WsiOptions`, or its fields as keywords) and return the picklable
    recipe the runner executes.

    The ``encoder_id`` covers the encoder, its weights and every parameter that changes the features (mpp,
    patch size, tissue settings; for int8 also the quantisation); reader, device, runtime and float precision
    are recorded per item instead (bf16 features have cosine >= 0.999 to fp32: see the runtime tests).
    ``cohort`` (the manifest's WSI rows) is needed by ``--precision int8``, which calibrates on its tiles.
    """
    opts: WsiOptions = coerce(options, WsiOptions, given)
    enc = _build_encoder(opts)
    if opts.weights:  # a checkpoint that is no plain state dict (e.g. pickled code) stops the run before any slide
        try:
            load_state_dict(opts.weights)
        except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for bad files
            raise InputError(f"--weights {opts.weights}: {e}") from e
    enc.warn_if_random()
    prep = resolve_prep(opts)  # before-encoding options: checked together, models loaded strictly (exit 2)
    tile = tile_params(opts)
    params = {**enc.params(), **tile, **id_params(prep)}
    int8: dict[str, Any] | None = None
    if opts.precision == INT8:
        params["quantisation"] = {"precision": INT8, "method": "nncf-ptq-performance",
                                  "calibration_tiles": opts.calibration_tiles, "seed": opts.seed}
        encoder_id = make_encoder_id(enc.name, enc.weights.sha256, params)
        int8 = calibrate_int8(store, opts, enc, encoder_id, cohort)
    encoder_id = make_encoder_id(enc.name, enc.weights.sha256, params)
    kwargs = dict(options=opts.to_json(), weights_sha256=enc.weights.sha256, encoder_id=encoder_id,
                  qc_dir=str(qc_dir_for(store, encoder_id)) if opts.qc else None,
                  plan_dir=str(plans_dir_for(store)), int8=int8, prep=prep,
                  record_dir=str(qc_dir_for(store, encoder_id)) if _needs_record(prep) else None)
    return ExtractorSpec("mmcli.features.wsi:WSIExtractor", kwargs, MODALITY, encoder_id)


def _needs_record(prep: dict[str, Any]) -> bool:
    """A per-tile QC record is kept when tiles can be removed (artefact QC, annotations)."""
    return "artifacts" in prep or "annotations" in prep


# ---- int8 -------------------------------------------------------------------------------------------------
def models_dir_for(store: str | Path) -> Path:
    """Cohort-specific models (int8, calibrated on this store's slides) live beside the store."""
    p = Path(store).resolve()
    return p.with_name(p.name + ".models")


def calibrate_int8(store: str | Path, opts: WsiOptions, enc: ImageEncoder, encoder_id: str,
                   cohort: Sequence[ManifestRow] | None) -> dict[str, Any]:
    """Quantise ``enc`` to int8 with NNCF on a seeded sample of the cohort's tissue tiles (once per store and
    encoder_id: later runs reuse the model), check its fidelity on held-out tiles and refuse it below
    ``--min-cosine``. Returns what the extractor and the encoder attrs need."""
    from mmcli.features.encoders import openvino_rt

    dest = models_dir_for(store) / MODALITY / encoder_id
    meta_path = dest / "meta.json"
    if (dest / "model.xml").is_file() and meta_path.is_file():
        info = json.loads(meta_path.read_text())
    else:
        if not cohort:
            raise InputError("--precision int8 calibrates on the cohort's own tissue tiles, and there is no "
                             "slide to sample. Fix: run mmcli extract with a --manifest that lists slides.")
        tiles, slides = calibration_sample(store, opts, cohort)
        if len(tiles) < 16:
            raise InputError(f"--precision int8: only {len(tiles)} tissue tile(s) in the cohort's slides, too few "
                             "to calibrate (16 or more needed). Fix: use --precision auto or fp32.")
        held = max(8, min(64, len(tiles) // 5))
        calib, test = tiles[held:], tiles[:held]
        size = (opts.patch_size, opts.patch_size)
        float_run = enc._runner(size)  # fp32 OpenVINO IR (converted once, cached)
        batches = [calib[i:i + 16] for i in range(0, len(calib), 16)]
        model = openvino_rt.quantize_int8(enc._ov_info["ov_model"], batches)
        q = openvino_rt.CompiledModel(model, INT8, opts.torch_threads)
        fid = openvino_rt.fidelity(float_run, q, [test[i:i + 32] for i in range(0, len(test), 32)])
        info = {"encoder_id": encoder_id, "calibration": {"tiles": int(len(calib)), "slides": slides,
                                                          "seed": opts.seed, "requested": opts.calibration_tiles},
                "fidelity": {"held_out_tiles": fid["n"], "cosine_min": fid["min"],
                             "cosine_median": fid["median"], "cosine_mean": fid["mean"], "reference": "fp32"},
                "openvino": openvino_rt.version(), "nncf": openvino_rt.nncf_version(),
                "float_model": enc._ov_info["ov_model"]}
        openvino_rt.save_atomic(model, dest, info)
    info["model"] = str(dest / "model.xml")
    fid = info["fidelity"]
    _say(f"int8 fidelity [{encoder_id}]: cosine to fp32 on {fid['held_out_tiles']} held-out tissue tiles: "
         f"min {fid['cosine_min']:.5f}, median {fid['cosine_median']:.5f} (calibrated on "
         f"{info['calibration']['tiles']} tiles of {info['calibration']['slides']} slide(s); "
         f"floor --min-cosine {opts.min_cosine})")
    if fid["cosine_min"] < opts.min_cosine:
        raise InputError(f"--precision int8 refused: the int8 features' cosine to fp32 is {fid['cosine_min']:.5f} "
                         f"(min over {fid['held_out_tiles']} held-out tiles; median {fid['cosine_median']:.5f}), "
                         f"below --min-cosine {opts.min_cosine}. Fix: use --precision auto/fp32, or accept the "
                         "loss with a lower --min-cosine.")
    info["min_cosine"] = opts.min_cosine
    return info


def _say(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(escape(msg), highlight=False)


def calibration_sample(store: str | Path, opts: WsiOptions, cohort: Sequence[ManifestRow],
                       max_slides: int = 32) -> tuple[np.ndarray, int]:
    """``(tiles (N, P, P, 3) uint8 in a seeded random order, slides used)``: about ``calibration_tiles`` plus
    a held-out share, spread evenly over up to ``max_slides`` slides chosen with ``--seed``. Tile plans come
    from (and go to) the plan cache, so the extraction that follows does no tissue detection twice.
    Unreadable slides are skipped here (the run reports them)."""
    rng = np.random.default_rng(opts.seed)
    rows = [cohort[i] for i in rng.permutation(len(cohort))[:max_slides]]
    want = opts.calibration_tiles + max(8, min(64, opts.calibration_tiles // 4))
    cache = PlanCache(plans_dir_for(store))
    got: list[np.ndarray] = []
    used = 0
    for k, row in enumerate(rows):
        per = -(-(want - sum(len(t) for t in got)) // (len(rows) - k))
        if per <= 0:
            break
        try:
            with open_slide(row.path, opts.reader) as reader:
                slide_mpp, _, _ = _slide_mpp(reader, row.path, opts.default_mpp)
                sp, _ = slide_plan(reader, source_fingerprint(row.path), slide_mpp, opts, cache)
                if sp.plan.n == 0:
                    continue
                idx = np.sort(rng.choice(sp.plan.n, min(per, sp.plan.n), replace=False))
                sub = replace(sp.plan, coords=sp.plan.coords[idx], tissue=sp.plan.tissue[idx])
                opener = slide_opener(row.path, reader.name)
                got += [b for _, b in iter_tile_batches(opener, sub, 64, opts.read_threads or default_read_threads())]
                used += 1
        except (SlideError, ItemError, OSError, ValueError):
            continue
    if not got:
        return np.zeros((0, opts.patch_size, opts.patch_size, 3), np.uint8), 0
    tiles = np.concatenate(got)
    return tiles[rng.permutation(len(tiles))], used


# ---- one tile plan per slide ------------------------------------------------------------------------------
def _slide_mpp(reader: Any, path: Path, default_mpp: float | None) -> tuple[float, str, list[str]]:
    """``(slide µm/px, where it came from, warnings)``; a slide without mpp and no --default-mpp is an
    :class:`ItemError`."""
    if reader.mpp is not None:
        return float(reader.mpp), "metadata", []
    if default_mpp is None:
        raise ItemError(
            f"slide {path} has no microns-per-pixel metadata, so its magnification is unknown. "
            "Fix: re-run with --default-mpp MPP (its scan resolution, e.g. 0.25 for 40x or 0.5 for "
            "20x) to use that value for slides without metadata.")
    return float(default_mpp), "--default-mpp", [f"no mpp metadata: used --default-mpp {float(default_mpp)}"]


def slide_plan(reader: Any, fingerprint: dict[str, Any], slide_mpp: float, opts: WsiOptions,
               cache: PlanCache | None) -> tuple[SlidePlan, str]:
    """The slide's tissue mask and tile plan and ``"reused"`` (from the cache) or ``"computed"`` (tissue
    detected now, saved to the cache with its QC image)."""
    key = plan_key(fingerprint, {**tile_params(opts), "slide_mpp": slide_mpp})
    if cache is not None and (sp := cache.load(key)) is not None:
        return sp, "reused"
    tissue = opts.tissue_params()
    try:
        if opts.tissue_model:
            mask, thumb = model_tissue_mask(reader, slide_mpp, opts.patch_size * opts.mpp, tissue,
                                            str(opts.tissue_model), str(opts.tissue_weights),
                                            resolve_device(opts.device))
        else:
            mask, thumb = tissue_mask(reader, slide_mpp, opts.patch_size * opts.mpp, tissue)
        DETECTIONS["tissue"] += 1
        plan = plan_tiles(reader.level_dimensions, reader.level_downsamples, slide_mpp, opts.mpp,
                          opts.patch_size, mask.mask, mask.scale, opts.min_tissue)
    except SlideError as e:
        raise ItemError(str(e)) from e
    sp = SlidePlan(plan, mask.mask, mask.scale, mask.threshold, mask.mpp)
    if cache is not None:
        if opts.qc:
            save_png_atomic(qc_image(thumb, mask.mask, plan.coords, plan.patch_size_level0, mask.scale),
                            cache.qc_path(key))
        cache.save(key, sp)  # the plan last: a plan on disk always has its QC image
    del thumb
    return sp, "computed"


class WSIExtractor(ItemExtractor):
    """Slide -> (tile features (N, D), level-0 coords (N, 2)). Built from :func:`make_spec`'s kwargs: the
    options as JSON (validated again here, e.g. in a dask worker) and what the plan resolved (``prep``: the
    before-encoding steps, see :mod:`mmcli.features.qc.resolve`)."""

    modality = MODALITY

    def __init__(self, options: dict[str, Any], weights_sha256: str | None, encoder_id: str,
                 qc_dir: str | None, plan_dir: str | None = None, int8: dict[str, Any] | None = None,
                 prep: dict[str, Any] | None = None, record_dir: str | None = None) -> None:
        self.options = opts = WsiOptions.from_json(options, context="wsi extractor options")
        set_torch_threads(opts.torch_threads)
        self.int8 = int8
        self.encoder = _build_encoder(opts, int8["model"] if int8 else None)
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
        self.plans = PlanCache(plan_dir) if plan_dir else None
        self.feature_dtype = np.dtype(opts.feature_dtype)
        self.prep = dict(prep or {})
        self.record_dir = Path(record_dir) if record_dir else None
        self.artifacts = artifact_params(opts) if opts.remove_artifacts else None
        self.tile_prep = TilePrep(self.artifacts, stain_normalizer(self.prep))
        for key, name, weights in (("tissue_model", opts.tissue_model, opts.tissue_weights),
                                   ("artifact_model", ARTIFACT_MODEL, opts.artifact_weights)):
            planned = self.prep.get(key)
            if planned and file_sha256(str(weights)) != planned["sha256"]:
                raise ItemError(f"{name} weights {weights}: this process reads sha256 {file_sha256(str(weights))}, "
                                f"the run was planned with {planned['sha256']}. Fix: give every worker the same file.")

    @property
    def encoder_id(self) -> str:
        return self._encoder_id

    def encoder_attrs(self) -> dict[str, Any]:
        attrs = {**self.encoder.provenance(), "modality": MODALITY, "mpp": self.mpp, "patch_size": self.patch_size,
                 "min_tissue": self.min_tissue, "tissue_params": self.tissue.to_dict(),
                 "options": self.options.to_json()}
        if self.prep:
            attrs["preprocessing"] = self.prep
        if self.int8:
            attrs.update(precision=INT8, int8={k: v for k, v in self.int8.items() if k != "encoder_id"})
        return attrs

    # ---- one slide -------------------------------------------------------------------------------------------
    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        t0 = time.perf_counter()
        try:
            reader = open_slide(row.path, self.reader, **self._reader_kwargs())
        except SlideError as e:
            raise ItemError(str(e)) from e
        with reader:
            slide_mpp, mpp_source, warnings = _slide_mpp(reader, row.path, self.default_mpp)
            t_plan = time.perf_counter()
            sp, plan_source = slide_plan(reader, source_fingerprint(row.path), slide_mpp, self.options, self.plans)
            plan_s = time.perf_counter() - t_plan
            plan = sp.plan
            if plan.upsampled:
                warnings.append(f"target {self.mpp} µm/px is finer than the scan ({slide_mpp} µm/px): "
                                "tiles are upsampled")
            if plan.n == 0:
                warnings.append(f"no tissue found in {row.path.name}: stored with 0 tiles")
            sel = TileSelection(plan.n)
            ann = self._annotate(row, plan, sel, warnings)
            self._grandqc(reader, slide_mpp, sp, sel)
            todo = replace(plan, coords=plan.coords[sel.to_read], tissue=plan.tissue[sel.to_read])
            info = reader.info()
            t_enc = time.perf_counter()
            feats, ran, kept = self._encode(row.path, reader.name, todo, progress, sel, warnings)
            enc_s = time.perf_counter() - t_enc
            coords = todo.coords[kept]
            qc_path = self._write_qc(row, reader, sp, slide_mpp, sel, ann)
        seconds = time.perf_counter() - t0
        attrs = {
            **plan.attrs(), **info, **ran, "mpp_source": mpp_source, "n_tiles": int(len(coords)),
            "tissue_threshold": round(sp.threshold, 5), "tissue_fraction": round(sp.fraction, 5),
            "tissue_thumb_mpp": round(sp.mask_mpp, 4), "feature_dtype": str(feats.dtype),
            "tile_plan": plan_source, "plan_seconds": round(plan_s, 3), "encode_seconds": round(enc_s, 3),
            "seconds": round(seconds, 3), "tiles_per_s": round(plan.n / seconds, 2) if seconds > 0 else None,
            "qc_png": qc_path,
        }
        record: dict[str, Any] = {}
        if "tissue_model" in self.prep:
            attrs["tissue_model"] = self.prep["tissue_model"]
        if "stain" in self.prep:
            st = self.prep["stain"]
            attrs["stain_norm"] = {**st, "tiles_left_unnormalised": sel.stain_left}
            record["stain_left_unnormalised"] = sel.stain_left
        if ann is not None:
            attrs["annotation"] = {"file": str(ann.path), "sha256": ann.sha256, "features": ann.n_features,
                                   "classes_filter": list(self.options.geojson_classes),
                                   "classes_found": list(ann.classes)}
        if self.record_dir is not None:
            summary = sel.summary(len(coords), self.artifacts)
            path = record_path(self.record_dir, row.patient_id, row.item_id)
            sha = save_record(path, sel.arrays(plan.coords, plan.tissue), summary)
            attrs["tile_qc"] = {**summary, "record": str(path), "record_sha256": sha}
            record.update(tiles_candidates=plan.n, tiles_kept=int(len(coords)), tiles_removed=summary["removed"],
                          tiles_outside_annotation=summary["outside_annotation"])
            if summary["removed"]:
                removed = ", ".join(f"{k} {v}" for k, v in summary["removed"].items())
                warnings.append(f"artefact QC removed {sum(summary['removed'].values())} of {plan.n} tissue "
                                f"tiles ({removed})")
        return ItemResult(feats, coords, attrs, warnings, record)

    def _annotate(self, row: ManifestRow, plan: TilePlan, sel: TileSelection, warnings: list[str]) -> Any:
        """``--tissue-geojson``: tiles whose centre is outside the slide's annotation are not read."""
        if "annotations" not in self.prep:
            return None
        try:
            ann, warning = restrict_to_annotation(self.prep["annotations"]["folder"],
                                                  tuple(self.options.geojson_classes), row.path, plan.coords,
                                                  plan.patch_size_level0, sel)
        except AnnotationError as e:
            raise ItemError(str(e)) from e
        warnings += [warning] if warning else []
        return ann

    def _grandqc(self, reader: Any, slide_mpp: float, sp: SlidePlan, sel: TileSelection) -> None:
        """``--remove-artifacts grandqc``: tiles GrandQC's artefact model covers are not read."""
        if self.artifacts is None or "grandqc" not in self.artifacts.checks or sp.plan.n == 0:
            return
        grandqc_artifacts(reader, slide_mpp, sp.mask.shape, sp.mask_scale, sp.plan.coords,
                          sp.plan.patch_size_level0, sel, self.artifacts.grandqc_max,
                          str(self.options.artifact_weights), resolve_device(self.encoder.device))

    def _reader_kwargs(self) -> dict[str, Any]:
        """cuCIM options (other readers take none): decode on the GPU when the encoder runs there."""
        cuda = resolve_device(self.encoder.device).startswith("cuda")
        return {"device": "cuda" if cuda else "cpu", "num_workers": self.read_threads}

    def _write_qc(self, row: ManifestRow, reader: Any, sp: SlidePlan, slide_mpp: float, sel: TileSelection,
                  ann: Any) -> str | None:
        """This encoder's QC image: a copy of the plan's when no tile was removed and no annotation drawn, else
        drawn from a fresh thumbnail with the removed tiles and the annotation."""
        if self.qc_dir is None:
            return None
        path = self.qc_dir / row.patient_id / f"{row.item_id}.png"
        removed = sel.removed_coords(sp.plan.coords)
        kept = sp.plan.coords[sel.code == 0]
        if not removed and ann is None:
            key = plan_key(source_fingerprint(row.path), {**tile_params(self.options), "slide_mpp": slide_mpp})
            if self.plans is not None and self.plans.copy_qc(key, path):
                return str(path)
        thumb, _ = reader.thumbnail(sp.mask_mpp / slide_mpp, strip_pixels=1 << 21)
        thumb = thumb[:sp.mask.shape[0], :sp.mask.shape[1]]
        img = qc_image(thumb, sp.mask, kept, sp.plan.patch_size_level0, sp.mask_scale, removed=removed,
                       rings=ann.rings() if ann is not None else None)
        save_png_atomic(img, path)
        return str(path)

    def _encode(self, path: Path, reader_name: str, plan: TilePlan, progress: ProgressFn | None,
                sel: TileSelection, warnings: list[str]) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
        """Read, prepare (artefact QC, stain normalisation) and encode the tiles of ``plan``; returns the
        features of the kept tiles, the run's attrs and which of ``plan``'s tiles were kept (bool)."""
        enc = self.encoder
        keep_all = np.zeros(plan.n, bool)
        if plan.n == 0:
            sel.merge_read(keep_all, np.zeros(0, np.int8), {})
            return np.zeros((0, enc.dim), self.feature_dtype), enc.runtime(), keep_all
        opener = slide_opener(path, reader_name, **self._reader_kwargs())
        cuda = resolve_device(enc.device).startswith("cuda")
        feats = np.empty((plan.n, enc.dim), self.feature_dtype)
        done = n_kept = 0
        scores: dict[str, list[np.ndarray]] = {}
        codes: list[np.ndarray] = []
        # where the encoder's time goes: waiting for the reader threads vs computing (item attrs; the benchmark's
        # read-side share)
        read: dict[str, float] = {}
        wait_s = compute_s = 0.0
        if progress:
            progress(0, plan.n)
        batches = iter_tile_batches(opener, plan, self.batch_size, self.read_threads, pin_memory=cuda, stats=read,
                                    transform=self.tile_prep)
        try:
            while True:
                t0 = time.perf_counter()
                nxt = next(batches, None)
                t1 = time.perf_counter()
                wait_s += t1 - t0
                if nxt is None:
                    break
                start, prepared = nxt
                b = len(prepared.keep)
                keep_all[start:start + b] = prepared.keep
                codes.append(prepared.codes)
                for k, v in prepared.scores.items():
                    scores.setdefault(k, []).append(v)
                sel.stain_left += prepared.stain_left
                if len(prepared.tiles):
                    tiles = prepared.tiles
                    if cuda:
                        import torch

                        tiles = torch.from_numpy(tiles).pin_memory()
                    y = enc.forward(tiles).numpy()  # a zero-copy view of encode()
                    if not np.isfinite(y).all():
                        bad = int((~np.isfinite(y).all(axis=1)).sum())
                        raise ItemError(f"{path.name}: encoder produced non-finite features (NaN/inf) for {bad} "
                                        f"of {len(y)} tiles in the batch at tile {start}; nothing written. Fix: "
                                        "try --precision fp32, or check the --weights file.")
                    if feats.dtype == np.float16 and y.size and np.abs(y).max() > _FP16_MAX:
                        warnings.append("features exceed the float16 range: stored as float32")
                        feats = feats.astype(np.float32)
                    feats[n_kept:n_kept + len(y)] = y
                    n_kept += len(y)
                compute_s += time.perf_counter() - t1
                done += b
                if progress:
                    progress(done, plan.n)
        except SlideError as e:
            raise ItemError(f"{e} (after {done} of {plan.n} tiles)") from e
        finally:
            batches.close()
        assert done == plan.n
        sel.merge_read(keep_all, np.concatenate(codes),
                       {k: np.concatenate(v) for k, v in scores.items()})
        return feats[:n_kept], {**enc.runtime(), "batch_size": self.batch_size, "read_threads": self.read_threads,
                                "read_wait_seconds": round(wait_s, 3), "encoder_compute_seconds": round(compute_s, 3),
                                "read_cpu_seconds": round(read.get("read_cpu_s", 0.0), 3)}, keep_all
