"""MRI extraction: NIfTI loading (nibabel), preprocessing and the MRI :class:`ItemExtractor`.

Preprocessing of one volume, in this order (all units millimetres, arrays indexed ``[x, y, z]``):

1. **load** with nibabel (``.nii``, ``.nii.gz``; any format nibabel reads). A 4-D image uses volume
   ``volume_index`` (default 0, with a warning); trailing singleton axes are dropped; any other rank is refused.
2. **reorient to RAS** (array axes run towards the patient's Right, Anterior, Superior) by exact axis
   permutation and flips (``nibabel.as_closest_canonical``: no interpolation).
3. **anti-alias** axes that will be downsampled (Gaussian, sigma = (factor - 1) / 2 voxels, as scikit-image does).
4. **resample** to ``spacing`` onto a grid of ``shape`` voxels centred on the volume's centre, i.e. crop or pad
   (``nibabel.processing.conform``, trilinear by default; padding takes the volume's minimum, i.e. air).
5. **z-score inside the foreground**: mean and standard deviation over voxels above an Otsu threshold,
   applied to the whole grid (background ends up negative, the foreground has mean 0 and sd 1).

The encoder gets ``(1, 1, Z, Y, X)`` float32 (slices first). No image data is stored: only the features and
the provenance (source spacing, orientation, shape, output affine, foreground statistics).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from mmcli.features.encoders.runtime import RUNTIMES, Prefetcher, check_backend
from mmcli.features.modalities import ExtractorOptions, coerce, register
from mmcli.features.runner import ExtractorSpec, ItemError, ItemExtractor, ItemResult, ProgressFn, set_torch_threads
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import file_sha256, make_encoder_id
from mmcli.pipeline.manifest import ManifestRow

DEFAULT_SPACING: tuple[float, float, float] = (1.5, 1.5, 1.5)
DEFAULT_SHAPE: tuple[int, int, int] = (64, 64, 64)  # 96 mm cube at 1.5 mm: one breast; raise for larger FOVs
DEFAULT_ENCODER = "r3d18"


@dataclass(frozen=True)
class MriParams:
    """Preprocessing parameters; every one of them is part of the encoder_id. Validated by
    :class:`MriOptions` (the CLI's way in); built directly only by code that knows its values."""

    spacing: tuple[float, float, float] = DEFAULT_SPACING  # mm, RAS axes x, y, z
    shape: tuple[int, int, int] = DEFAULT_SHAPE  # voxels, RAS axes x, y, z
    volume_index: int = 0  # which volume of a 4-D image
    order: int = 1  # spline order of the resampling (1 = trilinear)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"spacing_mm": [float(s) for s in d["spacing"]], "shape": [int(s) for s in d["shape"]],
                "volume_index": int(d["volume_index"]), "order": int(d["order"])}


def parse_triple(value: Any, kind: type, what: str) -> Any:
    """``"1.5"`` -> (1.5, 1.5, 1.5); ``"96,96,64"`` / ``"96x96x64"`` / ``(96, 96, 64)`` -> a 3-tuple of ``kind``.
    Anything else is returned as is (for the model to refuse)."""
    if value is None:
        return None
    parts = [p for p in str(value).replace("x", ",").split(",") if p.strip()] if isinstance(value, str) \
        else list(value) if isinstance(value, (tuple, list)) else [value]
    try:
        nums = tuple(float(p) for p in parts)
        if kind is int and any(n != int(n) for n in nums):
            raise ValueError("not whole numbers")
        nums = tuple(kind(n) for n in nums)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"expected one number or three separated by commas for --{what}") from e
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3:
        raise ValueError(f"expected one number or three (x,y,z) for --{what}, got {len(nums)}")
    return nums


Spacing = Annotated[float, Field(gt=0, allow_inf_nan=False)]
GridSize = Annotated[int, Field(ge=8)]


class MriOptions(ExtractorOptions):
    """Options of ``extract --modality mri``. Preprocessing, encoder, weights (or the init seed without them)
    make the ``encoder_id``; device, runtime, float precision and threads do not (OpenVINO and torch features
    have cosine >= 0.999: see tests/features/test_runtimes_mri_text.py); they are recorded per item."""

    encoder: str = Field(DEFAULT_ENCODER, min_length=1, description="a volume encoder: r3d18")
    weights: str | None = Field(None, description="encoder weights file: .safetensors, or a torch state dict "
                                "read with weights_only=True (default: a seeded random init, with a warning)")
    seed: int = Field(0, description="seed of the random init used when no weights exist, an integer")
    spacing: tuple[Spacing, Spacing, Spacing] = Field(
        DEFAULT_SPACING, description="voxel spacing after resampling in mm, one number > 0 (isotropic) or X,Y,Z "
        "in RAS order")
    shape: tuple[GridSize, GridSize, GridSize] = Field(
        DEFAULT_SHAPE, description="grid in voxels that the RAS volume is centre-cropped/padded to, one integer "
        ">= 8 or X,Y,Z")
    volume_index: int | None = Field(None, ge=0, description="volume of a 4-D image to encode, an integer >= 0 "
                                     "(default: 0, with a warning)")
    order: int = Field(1, ge=0, le=5, description="spline order of the resampling, 0..5 (1 = trilinear)")
    runtime: Literal[RUNTIMES] = Field(  # type: ignore[valid-type]
        "auto", description=f"inference runtime, one of {' | '.join(RUNTIMES)}; auto = OpenVINO on a CPU when "
        "installed, else torch")

    @field_validator("spacing", mode="before")
    @classmethod
    def _spacing(cls, v: Any) -> Any:
        return parse_triple(v, float, "spacing")

    @field_validator("shape", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        return parse_triple(v, int, "shape")

    @field_validator("weights", mode="before")
    @classmethod
    def _absolute(cls, v: Any) -> Any:
        return str(Path(v).expanduser().resolve()) if v else None

    def params(self) -> MriParams:
        return MriParams(self.spacing, self.shape, self.volume_index or 0, self.order)


# ---- loading ------------------------------------------------------------------------------------------------
def load_volume(path: str | Path, volume_index: int | None = None) -> tuple[Any, list[str]]:
    """A 3-D nibabel image of ``path`` and warnings. Raises :class:`ItemError` naming the file when it is
    unreadable or of the wrong rank; ``FileNotFoundError`` when it does not exist."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file", str(path))
    warnings: list[str] = []
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for bad files
        raise ItemError(f"{path.name}: not a readable NIfTI/volume file ({type(e).__name__}: {e})") from e
    if not hasattr(img, "affine") or img.affine is None:
        raise ItemError(f"{path.name}: image has no spatial affine; cannot place it in RAS space")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is a 3-D volume
        shape = shape[:-1]
    if len(shape) == 4:
        n = shape[3]
        k = 0 if volume_index is None else int(volume_index)
        if k >= n:
            raise ItemError(f"{path.name}: --volume-index {k} out of range for a 4-D image with {n} volumes")
        if volume_index is None:
            warnings.append(f"{path.name}: 4-D image of shape {shape}; using volume 0 of {n} "
                            "(choose another with --volume-index)")
        img = img.slicer[:, :, :, k]
    elif len(shape) == 3:
        if len(img.shape) > 3:
            img = img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
    else:
        raise ItemError(f"{path.name}: wrong rank: a {len(shape)}-D image of shape {tuple(img.shape)}; "
                        "MRI extraction needs a 3-D volume (or a 4-D series, of which one volume is used)")
    if min(img.shape[:3]) < 1:
        raise ItemError(f"{path.name}: empty image of shape {tuple(img.shape)}")
    return img, warnings


def read_data(img: Any, name: str) -> np.ndarray:
    """Voxel data as float32; a truncated or corrupt file raises :class:`ItemError` naming it."""
    try:
        return np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # noqa: BLE001 - truncated gzip, short files, bad scaling
        raise ItemError(f"{name}: voxel data cannot be read (corrupt or truncated file: {type(e).__name__}: {e})"
                        ) from e


# ---- preprocessing ------------------------------------------------------------------------------------------
def preprocess(img: Any, params: MriParams, name: str = "volume") -> tuple[np.ndarray, dict[str, Any], list[str]]:
    """RAS, resampled, cropped/padded, foreground z-scored volume ``(X, Y, Z)`` float32, its info and warnings."""
    import nibabel as nib
    from nibabel.processing import conform
    from scipy.ndimage import gaussian_filter

    warnings: list[str] = []
    data = read_data(img, name)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        warnings.append(f"{name}: {bad} non-finite voxel(s) set to 0")
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if not float(data.max()) > float(data.min()):
        raise ItemError(f"{name}: constant image (all voxels {float(data.min())}); nothing to encode")
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = nib.affines.voxel_sizes(affine)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ItemError(f"{name}: invalid voxel-to-world affine (voxel sizes {zooms.tolist()})")
    info: dict[str, Any] = {
        "source_shape": [int(s) for s in data.shape],
        "source_spacing_mm": [round(float(z), 5) for z in zooms],
        "source_axcodes": "".join(nib.aff2axcodes(affine)),
        "source_obliquity_deg": round(float(np.degrees(np.max(nib.affines.obliquity(affine)))), 3),
    }
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    canon_data = np.asarray(canon.dataobj, dtype=np.float32)
    canon_zooms = nib.affines.voxel_sizes(canon.affine)
    factors = np.asarray(params.spacing) / canon_zooms
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    if np.any(sigma > 0):
        canon_data = gaussian_filter(canon_data, sigma=sigma, mode="nearest")
    background = float(canon_data.min())
    out = conform(nib.Nifti1Image(canon_data, canon.affine), out_shape=params.shape, voxel_size=params.spacing,
                  order=params.order, cval=background, orientation="RAS")
    vol = np.asarray(out.dataobj, dtype=np.float32)
    vol, fg = zscore_foreground(vol)
    if fg["foreground_sd"] == 0.0:
        warnings.append(f"{name}: no contrast inside the {params.shape} grid (is --shape too small?); "
                        "encoded as all zeros")
    info.update(
        shape=[int(s) for s in vol.shape], spacing_mm=[float(s) for s in params.spacing],
        axcodes="".join(nib.aff2axcodes(out.affine)), affine=np.round(out.affine, 5).tolist(), **fg,
    )
    return vol, info, warnings


def zscore_foreground(vol: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Z-score with mean/sd of the foreground (voxels above Otsu's threshold). A uniform foreground is scaled
    by the whole grid's sd; a constant grid becomes zeros (reported with ``foreground_sd`` 0)."""
    from skimage.filters import threshold_otsu

    lo, hi = float(vol.min()), float(vol.max())
    if not hi > lo:
        return np.zeros_like(vol, dtype=np.float32), {"foreground_threshold": lo, "foreground_fraction": 1.0,
                                                      "foreground_mean": lo, "foreground_sd": 0.0}
    thr = float(threshold_otsu(vol))
    mask = vol > thr
    if mask.sum() < max(8, 0.001 * vol.size) or float(vol[mask].std()) == 0.0:
        mask = vol > lo  # degenerate histogram: everything above the minimum
    mean, sd = float(vol[mask].mean()), float(vol[mask].std())
    if sd == 0.0:  # a uniform foreground (phantoms, masks): scale by the whole volume's spread instead
        sd = float(vol.std())
    out = ((vol - mean) / sd).astype(np.float32)
    return out, {"foreground_threshold": round(thr, 5), "foreground_fraction": round(float(mask.mean()), 5),
                 "foreground_mean": round(mean, 5), "foreground_sd": round(sd, 5)}


def to_tensor_layout(vol: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` RAS volume -> ``(1, 1, Z, Y, X)`` contiguous float32 for the 3-D CNN."""
    return np.ascontiguousarray(vol.transpose(2, 1, 0)[None, None], dtype=np.float32)


# ---- encoder id and the extractor ---------------------------------------------------------------------------
def mri_encoder_id(encoder: str, weights: str | Path | None, params: MriParams, seed: int) -> tuple[str, str | None]:
    """``(encoder_id, weights_sha256)``: the id covers the encoder, its weights (or the random-init seed) and
    every preprocessing parameter."""
    sha = file_sha256(weights) if weights else None
    extra: dict[str, Any] = dict(params.to_dict())
    if sha is None:
        extra["seed"] = int(seed)
    return make_encoder_id(encoder, sha, extra), sha


class MriExtractor(ItemExtractor):
    """One NIfTI file -> one 512-d feature row (``features`` shape ``(1, D)``, no coords). Built from
    :func:`make_spec`'s kwargs: the options as JSON, validated again here (e.g. in a dask worker)."""

    modality = "mri"

    def __init__(self, options: dict[str, Any]) -> None:
        from mmcli.features.encoders.registry import create_encoder

        self.options = opts = MriOptions.from_json(options, context="mri extractor options")
        set_torch_threads(opts.torch_threads)
        self.params = opts.params()
        self.volume_index = opts.volume_index
        self._id, self.weights_sha256 = mri_encoder_id(opts.encoder, opts.weights, self.params, opts.seed)
        self.encoder = create_encoder(opts.encoder, weights=opts.weights, device=opts.device,
                                      precision=opts.precision, seed=opts.seed, runtime=opts.runtime,
                                      threads=opts.torch_threads)
        if getattr(self.encoder, "modality", "mri") != "mri":
            raise InputError(f"encoder {opts.encoder!r} is not a volume encoder")
        self._ahead = Prefetcher(self._prepare)

    @property
    def encoder_id(self) -> str:
        return self._id

    def encoder_attrs(self) -> dict[str, Any]:
        return {**self.encoder.provenance(), "preprocessing": self.params.to_dict(),
                "options": self.options.to_json()}

    def _prepare(self, path: Path) -> tuple[np.ndarray, dict[str, Any], list[str]]:
        """Read and preprocess one volume: ``(encoder input (1, 1, Z, Y, X), info, warnings)``."""
        img, warnings = load_volume(path, self.volume_index)
        vol, info, more = preprocess(img, self.params, Path(path).name)
        return to_tensor_layout(vol), info, warnings + more

    def prefetch(self, row: ManifestRow) -> None:
        """Read and preprocess ``row``'s volume in the background while the encoder runs on this one."""
        self._ahead.ahead(str(row.path), row.path)

    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        if progress:
            progress(0, 2)
        x, info, warnings = self._ahead.take(str(row.path), row.path)
        if progress:
            progress(1, 2)
        feats = self.encoder.encode(x)
        if not np.isfinite(feats).all():
            raise ItemError(f"{Path(row.path).name}: encoder produced non-finite features")
        if progress:
            progress(2, 2)
        info["volume_index"] = self.params.volume_index
        return ItemResult(feats.astype(np.float32), None, {"mri": info, **self.encoder.runtime()}, warnings)


@register("mri", options=MriOptions, unit="step", aliases=("mr", "radiology"))
def make_spec(store: str | Path | None = None, options: MriOptions | None = None, *,
              cohort: Any = None, **given: Any) -> ExtractorSpec:
    """Picklable recipe of an :class:`MriExtractor` from a :class:`MriOptions` (or its fields as keywords);
    the encoder_id is computed without loading the model. ``store`` and ``cohort`` (the manifest rows) are not
    needed."""
    from mmcli.features.encoders.registry import resolve

    opts: MriOptions = coerce(options, MriOptions, given)
    modality, _, _ = resolve(opts.encoder)
    if modality != "mri":
        raise InputError(f"encoder {opts.encoder!r} encodes {modality}, not MRI volumes. Fix: use --encoder r3d18.")
    check_backend(opts.runtime, opts.device)  # a runtime that cannot run here: exit 2 before any item
    if opts.weights and opts.encoder == DEFAULT_ENCODER:
        from mmcli.features.encoders.volume import check_r3d18_weights

        check_r3d18_weights(opts.weights)  # a bad file is a usage error (exit 2), not a failure of every item
    elif opts.weights and not Path(opts.weights).is_file():
        raise InputError(f"{opts.weights}: weights file not found. Fix: check --weights.")
    elif not opts.weights and opts.encoder == DEFAULT_ENCODER:
        from mmcli.features.encoders.runtime import r3d18_weights_fix, warn_random_init

        warn_random_init(DEFAULT_ENCODER, opts.seed, "no --weights given",
                         r3d18_weights_fix() + ".")
    encoder_id, _ = mri_encoder_id(opts.encoder, opts.weights, opts.params(), opts.seed)
    return ExtractorSpec("mmcli.features.mri:MriExtractor", {"options": opts.to_json()}, "mri", encoder_id)
