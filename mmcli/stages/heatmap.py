"""High-resolution attention heatmaps of a fitted run (``mmcli export --format heatmap``), as CLAM's
``create_heatmaps`` makes them: the slide is tiled again with overlapping tiles, each tile is encoded by the
run's own encoder and scored by the run's fitted model, and every output pixel gets the mean score of the tiles
that cover it.

For each chosen slide:

1. **Tiles.** The stored tiles (those that passed tissue detection at extraction) define the tissue; a grid of
   the same tile size (level-0 px) with stride ``size * (1 - overlap)`` is laid over it, starting at the first
   stored tile, and a grid tile is kept when its centre lies on a stored tile. With ``overlap 0`` the grid is
   the stored tiles exactly; with 0.5 each tissue pixel is covered by about 4 tiles, with 0.9 by about 100.
2. **Features.** Read like at extraction (same pyramid level, read size and resize) and encoded by the encoder
   the store recorded (its options, weights and seed, so the same weights sha256; an int8 extraction is
   re-encoded in fp32).
3. **Scores.** The fitted model scores the overlapping bag of that slide alone: its attention over the tiles
   (``FittedModel.attention``, the same call as ``mmcli predict --attention``). A slide's bag is scored on its
   own, so for a patient with several slides the attention is normalised within the slide. ``normalise
   percentile`` (default, as CLAM) turns the scores into within-slide percentiles in (0, 1].
4. **Averaging.** Each output pixel (at ``heatmap_mpp`` µm/px, over the whole slide or ``region``) is the mean
   score of the tiles whose level-0 footprint covers it (an exact box-sum via 2-D cumulative sums); pixels no
   tile covers are transparent (NaN in the scores file).

Outputs per slide, in ``out/<patient_id>/``: ``<item>.heatmap.png`` (the colour map over the slide at that
resolution), ``<item>.heatmap.ome.tif`` (the same image as a tiled pyramidal OME-TIFF with its physical pixel
size: QuPath, OpenSlide-like viewers and napari open it), ``<item>.scores.tif`` (float32 mean scores, NaN
outside the tiles) and ``<item>.heatmap.json`` (region, resolution, downsample, overlap, tiles, encoder, model:
what is needed to lay the heatmap over the slide).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from mmcli.pipeline.errors import InputError, MmcliError
from mmcli.pipeline.options import Options

MAX_PIXELS = 200_000_000  # output pixels per slide (W x H) before a coarser --heatmap-mpp or a --region is asked for
PYRAMID_MIN = 256  # the pyramid stops when a level's shorter side would fall below this


class HeatmapOptions(Options):
    """How ``mmcli export --format heatmap`` tiles, scores and draws (CLAM's heatmap settings)."""

    overlap: float = Field(0.5, ge=0, le=0.95, description="share of a tile's side shared with its neighbours, "
                           "0..0.95 (0.5: about 4 tiles per pixel; CLAM's high-resolution heatmaps use 0.9); tiles "
                           "are re-read and re-encoded at this overlap")
    heatmap_mpp: float = Field(2.0, gt=0, allow_inf_nan=False, description="resolution of the written heatmap in "
                               "µm/px, > 0 (2.0 is about 5x; the slide's own mpp gives full resolution)")
    region: str | None = Field(None, description="X,Y,W,H in level-0 pixels: only this region (default: the whole "
                               "slide)")
    heatmap_formats: list[Literal["png", "tiff"]] = Field(["png", "tiff"], description="png (colour map over the "
                                                          "slide) and/or tiff (pyramidal OME-TIFF, and the float "
                                                          "scores)")
    alpha: float = Field(0.5, ge=0, le=1, description="opacity of the colour map over the slide, 0..1")
    cmap: str = Field("jet", description="the matplotlib colour map (CLAM's heatmaps: jet)")
    normalise: Literal["percentile", "raw"] = Field("percentile", description="the scores drawn: percentile "
                                                    "(within-slide percentiles in (0, 1], as CLAM) | raw (the "
                                                    "model's attention)")
    max_tiles: int = Field(100_000, ge=1, description="refuse a slide with more overlapping tiles than this "
                           "(lower --overlap or give a --region)")
    batch_size: int = Field(64, ge=1, description="tiles per encoder batch")

    @field_validator("heatmap_formats", mode="before")
    @classmethod
    def _formats(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @field_validator("cmap")
    @classmethod
    def _cmap(cls, v: str) -> str:
        import matplotlib

        if v not in matplotlib.colormaps:
            raise ValueError("not a matplotlib colour map (e.g. jet, viridis, magma, RdBu_r)")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.replace(" ", "").split(",")
        if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError("X,Y,W,H: four integers in level-0 pixels, e.g. 1000,2000,4096,4096")
        x, y, w, h = (int(p) for p in parts)
        if x < 0 or y < 0 or w <= 0 or h <= 0:
            raise ValueError("X, Y >= 0 and W, H > 0")
        return f"{x},{y},{w},{h}"

    def box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The region ``(x, y, w, h)`` clipped to a slide of level-0 ``size``; the whole slide by default."""
        w0, h0 = size
        if self.region is None:
            return 0, 0, w0, h0
        x, y, w, h = (int(p) for p in self.region.split(","))
        if x >= w0 or y >= h0:
            raise InputError(f"--region {self.region}: outside the slide ({w0} x {h0} level-0 px).")
        return x, y, min(w, w0 - x), min(h, h0 - y)


# ---- tiles and averaging (pure, tested on their own) ----------------------------------------------------------
def overlapping_tiles(stored: np.ndarray, size: int, overlap: float) -> np.ndarray:
    """(N, 2) int64 level-0 top-left corners of the overlapping grid over the stored tiles (module doc, step 1):
    stride ``max(1, round(size * (1 - overlap)))`` from the first stored tile, kept where the tile's centre lies
    on a stored tile's footprint."""
    stored = np.asarray(stored, dtype=np.int64).reshape(-1, 2)
    if not len(stored):
        return stored
    stride = max(1, round(size * (1 - overlap)))
    x0, y0 = stored.min(axis=0)
    x1, y1 = stored.max(axis=0)
    xs = np.arange(x0, x1 + 1, stride, dtype=np.int64)
    ys = np.arange(y0, y1 + 1, stride, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    cand = np.c_[gx.ravel(), gy.ravel()]
    # a centre lies on a stored tile when floor((centre - stored origin) / size) hits a stored grid cell; stored
    # tiles sit on a grid of step ``size`` (CLAM / TRIDENT / mmcli); other layouts fall back to a direct test
    centres = cand + size // 2
    cells = {(int(a), int(b)) for a, b in (stored - stored.min(axis=0)) // size}
    on_grid = ((stored - stored.min(axis=0)) % size == 0).all()
    if on_grid:
        rel = (centres - stored.min(axis=0)) // size
        keep = np.array([(int(a), int(b)) in cells for a, b in rel], dtype=bool)
    else:
        keep = np.zeros(len(cand), dtype=bool)
        for sx, sy in stored:
            keep |= (centres[:, 0] >= sx) & (centres[:, 0] < sx + size) & (centres[:, 1] >= sy) & \
                (centres[:, 1] < sy + size)
    return cand[keep]


def average_scores(coords: np.ndarray, size: int, scores: np.ndarray, box: tuple[int, int, int, int],
                   downsample: float) -> np.ndarray:
    """(H, W) float32 mean score per output pixel of ``box`` (level-0 ``x, y, w, h``) at ``downsample`` level-0
    px per output pixel; NaN where no tile covers the pixel. A tile covers the output pixels whose area its
    level-0 footprint ``[x, x + size)`` overlaps (rows likewise)."""
    bx, by, bw, bh = box
    W, H = max(1, math.ceil(bw / downsample)), max(1, math.ceil(bh / downsample))
    acc = np.zeros((H + 1, W + 1), np.float64)
    cnt = np.zeros((H + 1, W + 1), np.float64)
    c0 = np.floor((coords[:, 0] - bx) / downsample).astype(np.int64)
    r0 = np.floor((coords[:, 1] - by) / downsample).astype(np.int64)
    c1 = np.ceil((coords[:, 0] + size - bx) / downsample).astype(np.int64)
    r1 = np.ceil((coords[:, 1] + size - by) / downsample).astype(np.int64)
    c0, c1 = np.clip(c0, 0, W), np.clip(c1, 0, W)
    r0, r1 = np.clip(r0, 0, H), np.clip(r1, 0, H)
    ok = (c1 > c0) & (r1 > r0)
    s = np.asarray(scores, np.float64)[ok]
    r0, r1, c0, c1 = r0[ok], r1[ok], c0[ok], c1[ok]
    for grid, v in ((acc, s), (cnt, np.ones_like(s))):  # a difference array per box, summed twice below
        np.add.at(grid, (r0, c0), v)
        np.add.at(grid, (r0, c1), -v)
        np.add.at(grid, (r1, c0), -v)
        np.add.at(grid, (r1, c1), v)
    acc = acc.cumsum(0).cumsum(1)[:H, :W]
    cnt = np.rint(cnt.cumsum(0).cumsum(1)[:H, :W])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan).astype(np.float32)


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Within-slide percentiles in (0, 1] (ties share their mean rank), as CLAM's heatmaps."""
    from scipy.stats import rankdata

    return rankdata(scores) / max(len(scores), 1)


def overlay(background: np.ndarray, heat: np.ndarray, cmap: str, alpha: float) -> np.ndarray:
    """RGB uint8: ``cmap(heat)`` blended over ``background`` with ``alpha`` where ``heat`` is finite."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.nan_to_num(np.clip(heat, 0, 1)))[..., :3] * 255
    out = background.astype(np.float32)
    m = np.isfinite(heat)
    out[m] = (1 - alpha) * out[m] + alpha * colours[m]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    """A tiled (256 px), zlib-compressed pyramidal OME-TIFF of ``rgb`` with its physical pixel size; each
    sub-resolution halves the previous one (stored as SubIFDs, as OME-TIFF pyramids are), down to
    :data:`PYRAMID_MIN` px on the shorter side. Written atomically."""
    import tifffile
    from PIL import Image

    from mmcli.pipeline.io import atomic_write_with

    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= PYRAMID_MIN:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.BILINEAR)))
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            tif.write(levels[0], subifds=len(levels) - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                      metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                                "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}, **opts)
            for k, lvl in enumerate(levels[1:], start=1):
                f = 2 ** k
                tif.write(lvl, subfiletype=1, resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)), **opts)

    return atomic_write_with(path, write)


# ---- one run ---------------------------------------------------------------------------------------------------
@dataclass
class HeatmapSummary:
    out: Path
    written: list[Path] = field(default_factory=list)
    slides: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        out = [f"{s['patient_id']}/{s['item_id']}: {s['tiles']} tiles at overlap {s['overlap']} "
               f"(stored {s['stored_tiles']}), {s['width']} x {s['height']} px at {s['heatmap_mpp']} µm/px -> "
               f"{', '.join(Path(p).name for p in s['files'])}" for s in self.slides]
        return out + [f"failed: {item}: {why}" for item, why in self.failed]


def _bag_modality(model: Any) -> str:
    bags = [s.name for s in model.specs if s.kind == "bag"]
    if not bags:
        raise InputError(f"head {model.name!r} has no tile bags, so no tile attention. Fix: --run a fit of "
                         "attention_mil (or fusion_mlp with pool=attention).")
    return bags[0]


def _chosen(run: Any, fs: Any, modality: str, encoder_id: str, patients: Sequence[str] | None,
            items: Sequence[str] | None, n_default: int = 3) -> list[tuple[str, str]]:
    """``(patient, item)`` pairs: ``items`` (``PID/ITEM``), else every slide of ``patients``, else every slide
    of the ``n_default`` patients with the highest out-of-fold score."""
    if items:
        out = []
        for it in items:
            pid, sep, item = it.partition("/")
            if not sep or not pid or not item:
                raise InputError(f"--items {it!r}: expected PATIENT_ID/ITEM_ID, e.g. BRCA-0001/BRCA-0001_1")
            out.append((pid, item))
        return out
    if not patients:
        import pandas as pd

        if run.predictions is None:
            raise InputError(f"{run.path}: no predictions.csv to choose patients from. Fix: give --patients.")
        order = pd.Series(run.score(), index=run.predictions["patient_id"].astype(str)).sort_values(ascending=False)
        have = set(fs.patients(modality, encoder_id))
        patients = [p for p in order.index if p in have][:n_default]
    out = []
    for pid in patients:
        its = [k.item_id for k in fs.items_of(modality, encoder_id, pid)]
        if not its:
            raise InputError(f"--patients {pid}: no {modality} item of encoder {encoder_id} in the store.")
        out += [(pid, i) for i in its]
    return out


def export_heatmaps(run_dir: str | Path, out: str | Path, *, patients: Sequence[str] | None = None,
                    items: Sequence[str] | None = None, options: HeatmapOptions | None = None,
                    store: str | Path | None = None, log: Callable[[str], None] | None = None) -> HeatmapSummary:
    """Heatmaps of the chosen slides of a fitted run (module doc) into ``out``; one slide that fails is named in
    the summary (exit 1) and the others go on. ``store``: the run's own by default."""
    from mmcli.heads.fitted import FittedModel
    from mmcli.pipeline.rundir import load_run
    from mmcli.pipeline.store import open_store

    opts = options or HeatmapOptions()
    run = load_run(run_dir)
    store_path = Path(store) if store is not None else (Path(run.store) if run.store else None)
    if store_path is None or not store_path.exists():
        raise InputError(f"the run's feature store {store_path} is not reachable. Fix: pass --store.")
    model = FittedModel.load(run_dir)
    modality = _bag_modality(model)
    encoder_id = run.encoder_ids.get(modality)
    fs = open_store(store_path, "r")
    if not encoder_id or encoder_id not in fs.encoders(modality):
        raise InputError(f"{store_path}: no {modality} features of the run's encoder {encoder_id}.")
    summary = HeatmapSummary(Path(out))
    encoder = _Encoder(fs, modality, encoder_id)
    for pid, item in _chosen(run, fs, modality, encoder_id, patients, items):
        try:
            summary.slides.append(_slide(model, fs, modality, encoder_id, encoder, pid, item, opts, Path(out),
                                         summary.written))
            if log:
                log(summary.lines()[len(summary.slides) - 1])
        except MmcliError as e:  # this slide's problem (unreachable, changed, no such item): the others go on
            summary.failed.append((f"{pid}/{item}", str(e)))
    return summary


class _Encoder:
    """The store's encoder of one encoder_id, rebuilt from its recorded options (built on first use)."""

    def __init__(self, fs: Any, modality: str, encoder_id: str) -> None:
        self.attrs = fs.encoder_attrs(modality, encoder_id) or {}
        if "options" not in self.attrs:
            raise InputError(f"{modality}/{encoder_id}: the store does not record the encoder's options (imported "
                             "features?), so its tiles cannot be re-encoded. Fix: heatmaps need features "
                             "extracted by mmcli.")
        self._enc: Any = None
        self.note = ""

    def get(self) -> Any:
        if self._enc is None:
            from mmcli.features.encoders import create_encoder
            from mmcli.features.wsi import WsiOptions

            opts = WsiOptions.from_json(self.attrs["options"], context="the store's wsi options")
            precision = "fp32" if opts.precision == "int8" else opts.precision
            self._enc = create_encoder(opts.encoder, weights=opts.weights, seed=opts.seed, device=opts.device,
                                       precision=precision, runtime="torch" if opts.precision == "int8" else
                                       opts.runtime, threads=opts.torch_threads)
            want = self.attrs.get("weights_sha256")
            if self._enc.weights.sha256 != want:
                raise InputError(f"encoder {opts.encoder}: this machine resolves weights "
                                 f"{self._enc.weights.describe()} (sha256 {self._enc.weights.sha256}), the store's "
                                 f"features came from sha256 {want}. Fix: make the same weights available.")
            if opts.precision == "int8":
                self.note = "stored features are int8; re-encoded in fp32"
        return self._enc


def _slide(model: Any, fs: Any, modality: str, encoder_id: str, encoder: _Encoder, pid: str, item: str,
           opts: HeatmapOptions, out: Path, written: list[Path]) -> dict[str, Any]:
    from mmcli.features.readers import open_slide
    from mmcli.pipeline.fingerprint import same_source, source_fingerprint

    it = fs.read_item(modality, encoder_id, pid, item)
    a = it.attrs
    fp = a.get("source_fingerprint") or {}
    path = fp.get("path")
    if not path or not Path(path).is_file():
        raise InputError(f"slide file not reachable: {path}")
    if not same_source(fp, source_fingerprint(path)):
        raise InputError(f"{path} changed since extraction: its tiles no longer match the stored ones")
    need = ("patch_size_level0", "level", "read_size", "patch_size", "slide_mpp")
    if any(a.get(k) is None for k in need) or it.coords is None or not len(it.coords):
        raise InputError(f"{pid}/{item}: the item lacks tile coords or tiling attrs {need}")
    size0 = int(a["patch_size_level0"])
    with open_slide(path, "auto") as reader:
        box = opts.box(reader.dimensions)
        d = opts.heatmap_mpp / float(a["slide_mpp"])
        W, H = max(1, math.ceil(box[2] / d)), max(1, math.ceil(box[3] / d))
        if W * H > MAX_PIXELS:
            raise InputError(f"{W} x {H} output pixels at --heatmap-mpp {opts.heatmap_mpp}: more than "
                             f"{MAX_PIXELS:,}. Fix: a coarser --heatmap-mpp or a --region.")
        bx, by, bw, bh = box
        coords = overlapping_tiles(it.coords, size0, opts.overlap)
        inside = ((coords[:, 0] + size0 > bx) & (coords[:, 0] < bx + bw) & (coords[:, 1] + size0 > by)
                  & (coords[:, 1] < by + bh))
        coords = coords[inside]
        if not len(coords):
            raise InputError(f"{pid}/{item}: no tile of the slide lies in --region {opts.region}")
        if len(coords) > opts.max_tiles:
            raise InputError(f"{len(coords)} overlapping tiles, more than --max-tiles {opts.max_tiles}. Fix: lower "
                             "--overlap or give a --region.")
        feats = _encode(encoder.get(), path, reader.name, coords, a, opts.batch_size, it.features.dtype)
        raw = _attention(model, fs, modality, encoder_id, pid, item, feats, coords)
        scores = percentiles(raw) if opts.normalise == "percentile" else raw
        heat = average_scores(coords, size0, scores, box, d)
        background = _background(reader, box, d, W, H)
    stem = out / pid / item
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = []
    rgb = overlay(background, heat, opts.cmap, opts.alpha)
    if "png" in opts.heatmap_formats:
        from PIL import Image

        from mmcli.pipeline.io import atomic_write_with

        files.append(atomic_write_with(stem.with_name(f"{item}.heatmap.png"),
                                       lambda t: Image.fromarray(rgb).save(t, format="PNG")))
    if "tiff" in opts.heatmap_formats:
        import tifffile

        from mmcli.pipeline.io import atomic_write_with

        files.append(write_pyramid(stem.with_name(f"{item}.heatmap.ome.tif"), rgb, opts.heatmap_mpp))
        files.append(atomic_write_with(stem.with_name(f"{item}.scores.tif"), lambda t: tifffile.imwrite(
            t, heat, resolution=(1e4 / opts.heatmap_mpp, 1e4 / opts.heatmap_mpp), resolutionunit="CENTIMETER",
            compression="zlib")))
    info = {"patient_id": pid, "item_id": item, "slide": str(path), "encoder_id": encoder_id,
            "model": str(model.path), "region_level0": list(box), "heatmap_mpp": opts.heatmap_mpp,
            "slide_mpp": float(a["slide_mpp"]), "downsample": d, "width": W, "height": H, "overlap": opts.overlap,
            "tile_size_level0": size0, "tiles": int(len(coords)), "stored_tiles": int(len(it.coords)),
            "normalise": opts.normalise, "cmap": opts.cmap, "alpha": opts.alpha,
            "score_range": [float(np.min(raw)), float(np.max(raw))], "note": encoder.note or None,
            "files": [str(f) for f in files]}
    from mmcli.pipeline.io import atomic_write_text

    files.append(atomic_write_text(stem.with_name(f"{item}.heatmap.json"), json.dumps(info, indent=2)))
    info["files"] = [str(f) for f in files]
    written += files
    return info


def _encode(enc: Any, path: str, reader_name: str, coords: np.ndarray, a: dict[str, Any], batch_size: int,
            dtype: Any) -> np.ndarray:
    """Features of ``coords`` read as at extraction (level, read size, resize), in the stored dtype."""
    from mmcli.features.readers import slide_opener
    from mmcli.features.tiling import TilePlan, iter_tile_batches

    plan = TilePlan(coords=coords, tissue=np.ones(len(coords), np.float32), level=int(a["level"]),
                    level_downsample=float(a.get("level_downsample") or 1.0), read_size=int(a["read_size"]),
                    patch_size=int(a["patch_size"]), patch_size_level0=int(a["patch_size_level0"]),
                    target_mpp=float(a.get("mpp") or 0), slide_mpp=float(a["slide_mpp"]),
                    min_tissue=float(a.get("min_tissue") or 0))
    parts = [np.asarray(enc.encode(batch)) for _, batch in iter_tile_batches(slide_opener(path, reader_name), plan,
                                                                             batch_size)]
    return np.concatenate(parts).astype(dtype)


def _attention(model: Any, fs: Any, modality: str, encoder_id: str, pid: str, item: str, feats: np.ndarray,
               coords: np.ndarray) -> np.ndarray:
    """The model's attention over ``feats`` as the one bag of ``pid`` (the slide alone), through a scratch store
    holding that bag and the patient's other modalities (a fusion head needs them)."""
    import tempfile

    from mmcli.pipeline.store import open_store

    with tempfile.TemporaryDirectory(prefix="mmcli-heatmap-") as tmp:
        scratch = open_store(Path(tmp) / "bag.zarr", "a")
        scratch.write_item(modality, encoder_id, pid, item, feats, coords, {})
        for spec in model.specs:
            if spec.name == modality:
                continue
            if spec.source == "table":
                table = fs.read_table(spec.name)
                rows = [p for p in table.index if str(p) == pid]
                if rows:
                    scratch.write_table(spec.name, table.loc[rows])
                continue
            for key in fs.items_of(spec.name, spec.encoder_id, pid) if spec.encoder_id else []:
                o = fs.read_item(spec.name, spec.encoder_id, pid, key.item_id)
                scratch.write_item(spec.name, spec.encoder_id, pid, key.item_id, o.features, o.coords, {})
        cohort, left_out = model.cohort(scratch, [pid])
        if left_out or not len(cohort):
            raise InputError(f"{pid}: the model cannot score this patient from its features (missing modality)")
        att = model.attention(cohort).get(modality) or [None]
    if att[0] is None or len(att[0]) != len(feats):
        raise InputError(f"{pid}/{item}: the model gave no attention for the overlapping tiles")
    return np.asarray(att[0], dtype=np.float64)


def _background(reader: Any, box: tuple[int, int, int, int], d: float, W: int, H: int) -> np.ndarray:
    """(H, W, 3) uint8 of the slide over ``box`` at ``d`` level-0 px per pixel, read in strips from the best
    pyramid level (memory bounded by a strip, not the region)."""
    from PIL import Image

    from mmcli.features.tiling import choose_level

    bx, by, bw, bh = box
    level = choose_level(reader.level_downsamples, d)
    ds = float(reader.level_downsamples[level])
    lw, lh = max(1, math.ceil(bw / ds)), max(1, math.ceil(bh / ds))
    out = np.empty((H, W, 3), np.uint8)
    rows = max(1, int((1 << 24) // max(lw, 1) * H / lh))
    for r in range(0, H, rows):
        r1 = min(H, r + rows)
        ly0, ly1 = math.floor(r * lh / H), min(lh, math.ceil(r1 * lh / H))
        strip = reader.read_region(bx, by + round(ly0 * ds), level, lw, max(1, ly1 - ly0))
        box_px = (0.0, r * lh / H - ly0, float(lw), r1 * lh / H - ly0)
        out[r:r1] = np.asarray(Image.fromarray(strip).resize((W, r1 - r), Image.BILINEAR, box=box_px))
    return out
