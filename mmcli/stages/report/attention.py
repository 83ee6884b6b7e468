"""Attention section of ``report.html``: top-attention tiles and an attention heatmap per slide.

Input: ``attention.csv`` (``patient_id,item_id,index,attention``; ``index`` = row of the tile in that item's
features), the store named in ``config.json`` (tile ``coords``: level-0 pixel x, y of each tile's top-left, and
item attrs ``source_fingerprint.path``, ``patch_size``, ``mpp``, maybe ``patch_size_level0``) and, where the
slide file is reachable, the slide itself, opened with the project's readers
(:func:`mmcli.features.readers.open_slide`, reader ``auto``: cuCIM, OpenSlide or tiffslide). Without the slide
the heatmap is drawn over the tile grid alone and the report says why; without the store the section says so.
Nothing here raises for a missing or unreadable artefact.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.features.readers import SlideReader, open_slide
from mmcli.features.tiling import choose_level
from mmcli.pipeline.rundir import Run, read_csv
from mmcli.stages.report.plots import img_tag as _img
from mmcli.stages.report.plots import new_figure, to_base64

THUMB_MAX = 800  # px, longest side of the heatmap thumbnail
TILE_PX = 160  # px, display size of a top-attention tile


@dataclass
class SlideAttention:
    """Attention of one slide (item) of one patient, aligned with its tiles."""

    patient_id: str
    item_id: str
    modality: str
    coords: np.ndarray  # (n, 2) level-0 px of the tiles that have an attention value
    attention: np.ndarray  # (n,)
    attrs: dict[str, Any]


def _store_path(run: Run) -> Path | None:
    raw = run.config.get("store") or run.config.get("store_path")
    if not raw:
        return None
    p = Path(raw)
    for cand in (p, run.path / p):
        if cand.exists():
            return cand
    return None


def _percentiles(a: np.ndarray) -> np.ndarray:
    """Attention as within-slide percentiles in (0, 1] (as CLAM's heatmaps), robust to a few large weights."""
    from scipy.stats import rankdata

    return rankdata(a) / len(a)


def _tile_size_level0(attrs: dict[str, Any], coords: np.ndarray, slide_mpp: float | None) -> int:
    """Tile side in level-0 px: stored ``patch_size_level0``, else ``patch_size * mpp / slide mpp``, else the
    spacing of the tile grid, else ``patch_size``."""
    if attrs.get("patch_size_level0"):
        return int(attrs["patch_size_level0"])
    ps, mpp = attrs.get("patch_size"), attrs.get("mpp")
    if ps and mpp and slide_mpp:
        return max(1, round(float(ps) * float(mpp) / slide_mpp))
    for axis in (0, 1):
        steps = np.diff(np.unique(coords[:, axis]))
        if len(steps):
            return int(steps.min())
    return int(ps or 256)


def _open_slide(path: str | None) -> tuple[SlideReader | None, str | None]:
    """(slide reader or None, reason when None)."""
    if not path:
        return None, "the item records no source slide path"
    if not Path(path).is_file():
        return None, f"slide file not reachable: {path}"
    try:
        return open_slide(path, "auto"), None
    except Exception as e:  # noqa: BLE001 - any failure to open just means no pixels in the report
        return None, f"slide could not be opened ({type(e).__name__}: {e})"


def _heatmap(sa: SlideAttention, size0: int, slide: SlideReader | None) -> str:
    """Attention percentiles painted over the slide thumbnail (or over the bare tile grid)."""
    pct = _percentiles(sa.attention)
    fig = new_figure(6.0, 4.5)
    ax = fig.subplots()
    if slide is not None:
        w0, h0 = slide.dimensions
        thumb, (sx, _) = slide.thumbnail(max(1.0, max(w0, h0) / THUMB_MAX))
        scale = 1.0 / sx
        heat = np.full(thumb.shape[:2], np.nan)
        ax.imshow(thumb)
    else:
        x_max, y_max = (sa.coords.max(axis=0) + size0).tolist()
        scale = min(1.0, THUMB_MAX / max(x_max, y_max, 1))
        heat = np.full((int(np.ceil(y_max * scale)), int(np.ceil(x_max * scale))), np.nan)
    side = max(1, int(round(size0 * scale)))
    for (x, y), v in zip(sa.coords, pct):
        xs, ys = int(x * scale), int(y * scale)
        heat[ys:ys + side, xs:xs + side] = v
    im = ax.imshow(heat, cmap="jet", alpha=0.45 if slide is not None else 0.9, vmin=0, vmax=1,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.035, label="attention percentile")
    ax.set_title(f"{sa.patient_id} / {sa.item_id}: attention ({len(pct)} tiles)", fontsize=9)
    ax.set_axis_off()
    return to_base64(fig)


def _top_tiles(sa: SlideAttention, size0: int, slide: SlideReader, top_k: int) -> str:
    """The ``top_k`` highest-attention tiles, read from the slide at the pyramid level nearest their size."""
    from PIL import Image

    order = np.argsort(sa.attention)[::-1][:top_k]
    target = int(sa.attrs.get("patch_size") or TILE_PX)
    level = choose_level(slide.level_downsamples, max(1.0, size0 / target))
    ds = float(slide.level_downsamples[level])
    side = max(1, int(round(size0 / ds)))
    cols = min(len(order), 4)
    rows = int(np.ceil(len(order) / cols))
    fig = new_figure(1.9 * cols, 2.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, i in zip(axes, order):
        x, y = (int(v) for v in sa.coords[i])
        tile = Image.fromarray(slide.read_region(x, y, level, side, side))
        ax.imshow(np.asarray(tile.resize((TILE_PX, TILE_PX), Image.BILINEAR)))
        ax.set_title(f"a={sa.attention[i]:.3g} @({x},{y})", fontsize=7)
        ax.set_axis_off()
    for ax in axes[len(order):]:
        ax.set_axis_off()
    return to_base64(fig)


def _patient_notes(run: Run) -> dict[str, str]:
    """Per patient, what the header of its heatmaps says: out-of-fold risk with time/event (survival) or
    P(positive)/max probability with the true class (classification)."""
    pred = run.predictions
    if pred is None:
        return {}
    try:
        scores = run.score()
    except Exception:  # noqa: BLE001 - no scores: no notes
        return {}
    notes = {}
    for i, pid in enumerate(pred["patient_id"].astype(str)):
        row = pred.iloc[i]
        if run.task == "survival":
            ev = "event" if int(row["event"]) == 1 else "censored"
            notes[pid] = f"risk {scores[i]:.3g}; time {row['time']:g}, {ev}"
        else:
            notes[pid] = f"score {scores[i]:.3g}; true class {row.get('y_true', '?')}"
    return notes


def _choose_patients(run: Run, att: pd.DataFrame, n: int) -> list[str]:
    """Top ``n`` patients with attention by out-of-fold score (P(positive)/max prob/risk), else by id."""
    with_att = set(att["patient_id"])
    if run.predictions is not None:
        try:
            scores = pd.Series(run.score(), index=run.predictions["patient_id"])
            ranked = [p for p in scores.sort_values(ascending=False).index if p in with_att]
            if ranked:
                return ranked[:n]
        except Exception:  # noqa: BLE001 - fall back to id order when scores cannot be formed
            pass
    return sorted(with_att)[:n]


def _find_item(store: Any, run: Run, pid: str, item: str) -> tuple[str, Any] | None:
    pairs = list(run.encoder_ids.items()) or [(m, e) for m in store.modalities() for e in store.encoders(m)]
    for m, e in pairs:
        try:
            attrs = store.item_attrs(m, e, pid, item)
            if attrs and attrs.get("complete") is True:
                it = store.read_item(m, e, pid, item)
                if it.coords is not None:
                    return m, it
        except Exception:  # noqa: BLE001 - unsafe ids / unreadable items are reported, not raised
            continue
    return None


def _load_attention(path: Path) -> pd.DataFrame:
    att = read_csv(path)
    missing = {"patient_id", "item_id", "index", "attention"} - set(att.columns)
    if missing:
        raise ValueError(f"{path.name} lacks columns {sorted(missing)}")
    att["index"] = pd.to_numeric(att["index"], errors="coerce")
    att["attention"] = pd.to_numeric(att["attention"], errors="coerce")
    return att.dropna(subset=["index", "attention"])


def attention_section(run: Run, *, n_patients: int = 3, top_k: int = 8) -> str:
    """HTML for the attention section (never raises for missing/unreadable artefacts)."""
    path = run.optional("attention.csv")
    if path is None:
        return "<p class='absent'>No <code>attention.csv</code> in this run (attention heads write it; " \
               "<code>mmcli predict --attention</code> does too).</p>"
    try:
        att = _load_attention(path)
    except Exception as e:  # noqa: BLE001
        return f"<p class='absent'>attention.csv could not be read: {html.escape(str(e))}</p>"
    store_path = _store_path(run)
    if store_path is None:
        where = run.config.get("store") or run.config.get("store_path") or "(not recorded in config.json)"
        return (f"<p class='absent'>attention.csv has {len(att)} rows, but the feature store "
                f"<code>{html.escape(str(where))}</code> is not reachable, so tile positions are unknown.</p>")
    from mmcli.pipeline.store import open_store

    try:
        store = open_store(store_path, "r")
    except Exception as e:  # noqa: BLE001
        return f"<p class='absent'>feature store {html.escape(str(store_path))} could not be opened: " \
               f"{html.escape(str(e))}</p>"
    what = "risk (survival: the patients the model deems most at risk)" if run.task == "survival" else \
        "score (P(positive), or the largest class probability)"
    parts = [f"<p>Patients with the highest out-of-fold {what}, {n_patients} at most; per slide the "
             f"attention heatmap (within-slide percentiles) and the {top_k} highest-attention tiles.</p>"]
    notes = _patient_notes(run)
    for pid in _choose_patients(run, att, n_patients):
        note = f" <small>({html.escape(notes[pid])})</small>" if pid in notes else ""
        parts.append(f"<h3>Patient {html.escape(pid)}{note}</h3>")
        for item, rows in att[att["patient_id"] == pid].groupby("item_id", sort=True):
            parts.append(_slide_block(store, run, pid, str(item), rows, top_k))
    return "\n".join(parts)


def _slide_block(store: Any, run: Run, pid: str, item: str, rows: pd.DataFrame, top_k: int) -> str:
    found = _find_item(store, run, pid, item)
    label = f"{html.escape(pid)}/{html.escape(item)}"
    if found is None:
        return f"<p class='absent'>{label}: no WSI item with tile coords in the store.</p>"
    modality, it = found
    idx = rows["index"].to_numpy(dtype=int)
    ok = (idx >= 0) & (idx < len(it.coords))
    if not ok.all():
        note = f" ({int((~ok).sum())} attention rows point past the item's {len(it.coords)} tiles: ignored)"
    else:
        note = ""
    if not ok.any():
        return f"<p class='absent'>{label}: attention indices do not match the stored tiles{note}.</p>"
    sa = SlideAttention(pid, item, modality, it.coords[idx[ok]], rows["attention"].to_numpy(float)[ok], it.attrs)
    slide_path = (it.attrs.get("source_fingerprint") or {}).get("path") or it.attrs.get("source_path")
    slide, why = _open_slide(slide_path)
    try:
        size0 = _tile_size_level0(sa.attrs, sa.coords, slide.mpp if slide is not None else None)
        out = [f"<div class='slide'><h4>{label} <small>({html.escape(modality)}, tile {size0} px at level 0)"
               f"</small></h4>"]
        if why:
            out.append(f"<p class='absent'>{html.escape(why)}: heatmap drawn over tile positions only, "
                       f"no tile images.</p>")
        if note:
            out.append(f"<p class='absent'>{html.escape(note.strip(' ()'))}</p>")
        out.append(_img(_heatmap(sa, size0, slide), f"attention heatmap {pid}/{item}"))
        if slide is not None:
            out.append(_img(_top_tiles(sa, size0, slide, top_k), f"top attention tiles {pid}/{item}"))
        out.append("</div>")
        return "\n".join(out)
    except Exception as e:  # noqa: BLE001 - a broken slide costs its figure, not the report
        return f"<p class='absent'>{label}: attention figure failed ({html.escape(type(e).__name__)}: " \
               f"{html.escape(str(e))})</p>"
    finally:
        if slide is not None:
            slide.close()
