"""The before-encoding options of ``extract --modality wsi`` checked together and resolved once (models loaded
strictly, the stain reference fitted, the annotation folder hashed) into a JSON-able ``prep`` dict that the spec
carries to every worker, plus the part of it that enters the encoder_id."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from mmcli.features.qc.annotations import folder_digest
from mmcli.features.qc.artifacts import ArtifactParams
from mmcli.features.qc.segmentation import ARTIFACT_MODEL, SegmentationError, Segmenter, file_sha256
from mmcli.features.qc.stain import StainError, StainNormalizer, StainReference, fit_reference
from mmcli.pipeline.errors import InputError

STAIN_SAMPLE_PIXELS, STAIN_MIN_PIXELS = 4096, 0.05  # see mmcli.features.qc.stain


@lru_cache(maxsize=4)
def _segmenter(name: str, weights: str, sha256: str, device: str) -> Segmenter:
    return Segmenter(name, weights, device)


def load_segmenter(name: str, weights: str, device: str = "cpu") -> Segmenter:
    """The segmenter, loaded once per process, file version and device; :class:`InputError` (exit 2) for a
    missing file or a checkpoint of another layout."""
    try:
        return _segmenter(name, str(Path(weights).resolve()), file_sha256(weights), device)
    except FileNotFoundError as e:
        flag = "--artifact-weights" if name == ARTIFACT_MODEL else "--tissue-weights"
        raise InputError(f"{flag} {weights}: file not found. The weights are never downloaded: put the "
                         f"published {name} checkpoint there.") from e
    except SegmentationError as e:
        msg = str(e)
        if name == ARTIFACT_MODEL:
            msg = msg.replace("--tissue-weights", "--artifact-weights")
        raise InputError(msg) from e


def artifact_params(opts: Any) -> ArtifactParams:
    return ArtifactParams(tuple(opts.remove_artifacts), float(opts.blur_threshold), float(opts.pen_max),
                          float(opts.dark_max), float(opts.artifact_max))


def check_combinations(opts: Any) -> None:
    """Flags that need each other, named with the fix."""
    if opts.tissue_weights and not opts.tissue_model:
        raise InputError("--tissue-weights is read by --tissue-model. Fix: add --tissue-model hest|grandqc.")
    if opts.tissue_model and not opts.tissue_weights:
        raise InputError(f"--tissue-model {opts.tissue_model} needs --tissue-weights FILE (the published "
                         "checkpoint; weights are never downloaded).")
    grandqc = "grandqc" in opts.remove_artifacts
    if grandqc and not opts.artifact_weights:
        raise InputError("--remove-artifacts grandqc needs --artifact-weights FILE (GrandQC's artefact "
                         "checkpoint, GrandQC_MPP1_state_dict.pth; never downloaded).")
    if opts.artifact_weights and not grandqc:
        raise InputError("--artifact-weights is read by the grandqc check. Fix: add grandqc to "
                         "--remove-artifacts, or drop --artifact-weights.")
    if opts.stain_reference and not opts.stain_norm:
        raise InputError("--stain-reference is read by --stain-norm. Fix: add --stain-norm macenko|reinhard.")
    if opts.geojson_classes and not opts.tissue_geojson:
        raise InputError("--geojson-classes filters --tissue-geojson. Fix: add --tissue-geojson DIR.")
    if opts.tissue_geojson and not Path(opts.tissue_geojson).is_dir():
        raise InputError(f"--tissue-geojson {opts.tissue_geojson}: not a folder. Fix: give the folder that holds "
                         "<slide stem>.geojson files.")


def resolve_prep(opts: Any) -> dict[str, Any]:
    """Validate and resolve the before-encoding options of ``opts`` (a ``WsiOptions``); JSON-able."""
    check_combinations(opts)
    prep: dict[str, Any] = {}
    if opts.tissue_model:
        prep["tissue_model"] = load_segmenter(opts.tissue_model, opts.tissue_weights).provenance()
    if opts.remove_artifacts:
        prep["artifacts"] = artifact_params(opts).to_dict()
        if "grandqc" in opts.remove_artifacts:
            prep["artifact_model"] = load_segmenter(ARTIFACT_MODEL, opts.artifact_weights).provenance()
    if opts.stain_norm:
        try:
            ref = fit_reference(opts.stain_norm, opts.stain_reference)
        except FileNotFoundError as e:
            raise InputError(f"--stain-reference {opts.stain_reference}: file not found.") from e
        except StainError as e:
            raise InputError(f"--stain-reference {opts.stain_reference}: {e}.") from e
        prep["stain"] = {**ref.to_dict(), "sample_pixels": STAIN_SAMPLE_PIXELS, "min_stain_pixels": STAIN_MIN_PIXELS}
    if opts.tissue_geojson:
        prep["annotations"] = {"folder": opts.tissue_geojson, "digest": folder_digest(opts.tissue_geojson),
                               "classes": list(opts.geojson_classes)}
    return prep


def id_params(prep: dict[str, Any]) -> dict[str, Any]:
    """What of ``prep`` changes which tiles are encoded or their pixels (the tissue model is in the tile
    parameters, with the plan): part of the encoder_id; empty when nothing is set (ids stay as they were)."""
    out: dict[str, Any] = {}
    if "artifacts" in prep:
        out["artifacts"] = dict(prep["artifacts"])
        if "artifact_model" in prep:
            out["artifacts"]["model_sha256"] = prep["artifact_model"]["sha256"]
    if "stain" in prep:
        st = prep["stain"]
        out["stain"] = {"method": st["method"], "reference": st["sha256"] or st["source"],
                        "sample_pixels": st["sample_pixels"],
                        "min_stain_pixels": st["min_stain_pixels"]}
    if "annotations" in prep:
        out["annotations"] = {"digest": prep["annotations"]["digest"], "classes": prep["annotations"]["classes"]}
    return out


def stain_normalizer(prep: dict[str, Any]) -> StainNormalizer | None:
    st = prep.get("stain")
    if not st:
        return None
    return StainNormalizer(StainReference.from_dict(st), st["sample_pixels"], st["min_stain_pixels"])
