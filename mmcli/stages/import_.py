"""``mmcli import``: CLAM / TRIDENT / STAMP tile-feature files (or slide embeddings) into the store, through the
shared runner (cache, per-item locks, failure isolation, run record, optional dask), so a re-import skips unchanged
files."""
from __future__ import annotations

from pathlib import Path

from mmcli.features.interop.formats import FORMATS, get_format
from mmcli.features.interop.importer import make_import_spec, match_rows, one_encoder, slide_info
from mmcli.features.runner import RunSummary, run_extraction
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import params_hash
from mmcli.pipeline.io import write_json
from mmcli.pipeline.manifest import load_manifest


def import_features(
    fmt: str,
    source: str | Path,
    manifest: str | Path,
    store: str | Path,
    encoder_id: str | None = None,
    modality: str = "wsi",
    mpp: float | None = None,
    force: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    patch_size: int | None = None,
    patch_level: int = 0,
) -> RunSummary:
    """Import the feature file of every ``modality`` row of ``manifest`` found under ``source``.

    ``mpp`` is the slides' level-0 µm/px, needed only to turn micrometre coords (STAMP's) into pixels when the
    slides themselves are not reachable (their own mpp is used when they are). ``patch_size`` / ``patch_level``
    state the tile size (px at that level, CLAM's vocabulary) where the files do not (CLAM's h5_files without
    patches/ beside them); without them it is derived from the coords stride. Rows without a file are reported as
    missing (exit 1); the rest are imported. Files of several encoders are refused (exit 2). Slide embeddings are
    stored as the ``slide`` modality.
    """
    if mpp is not None and not mpp > 0:
        raise InputError(f"--mpp must be a positive number of µm per level-0 pixel, got {mpp}")
    if patch_size is not None and patch_size < 1:
        raise InputError(f"--patch-size must be a positive number of pixels, got {patch_size}")
    if patch_level < 0:
        raise InputError(f"--patch-level must be a pyramid level >= 0, got {patch_level}")
    m = load_manifest(manifest)
    rows = sorted(m.for_modality(modality) + m.missing_for(modality), key=lambda r: r.row)
    if not rows:
        raise InputError(f"{manifest}: no rows of modality {modality!r}. Fix: list the slides as {modality} rows.")
    matched = match_rows(rows, Path(source), fmt)
    if matched.found and len(matched.lacking) == len(matched.found):
        key = get_format(fmt).features_key
        raise InputError(f"no {fmt} feature file under {source} matches a slide of {manifest}: the "
                         f"{len(matched.found)} file(s) named for its slides lack the dataset '{key}' (e.g. "
                         f"{matched.lacking[0].path}). Fix: check --from and --format.")
    if not matched.found:
        raise InputError(f"no {fmt} feature file under {source} matches a slide of {manifest} (looked for "
                         f"<slide stem>.h5 and <item_id>.h5, e.g. {matched.missing[0].path.name}). "
                         "Fix: check --from and --format.")
    one_encoder(get_format(fmt), matched.found)
    info_file = None
    needs_info = (FORMATS.entry(fmt.lower()).meta["coords"] == "um" and mpp is None) or (patch_size and patch_level)
    if needs_info:
        keys = {(r.patient_id, r.item_id) for r in matched.found}
        table = slide_info([r for r in rows if (r.patient_id, r.item_id) in keys])
        if table:
            runs = Path(store).with_name(Path(store).name + ".runs")
            info_file = write_json(runs / f"import-slide-info-{params_hash(table)}.json", table)
    spec = make_import_spec(fmt, matched.found, encoder_id, modality, info_file, mpp, patch_size, patch_level)
    _check_dim(store, spec.modality, spec.encoder_id, int(spec.kwargs["dim"]))
    return run_extraction(matched.found, spec, store, force=force, scheduler=scheduler, workers=workers,
                          missing=matched.missing, progress=progress, unit="slide")


def _check_dim(store: str | Path, modality: str, encoder_id: str, dim: int) -> None:
    """Refuse to mix dimensions under one encoder_id (a --encoder-id reused for other features)."""
    from mmcli.pipeline.store import open_store

    if not Path(store).exists():
        return
    have = open_store(store, "r").encoder_attrs(modality, encoder_id).get("dim")
    if have is not None and int(have) != dim:
        raise InputError(f"{store}: encoder_id {encoder_id!r} already holds {have}-d features; these files are "
                         f"{dim}-d (feature dim mismatch). Fix: choose another --encoder-id.")
