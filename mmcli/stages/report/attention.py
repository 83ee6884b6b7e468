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


@dataclass
class Showcased:
    """A patient the attention section shows: why it was chosen, and what the model said against the truth."""

    patient_id: str
    why: str  # e.g. "most confident correct call", "most confident error"
    said: str  # "predicted TNBC (p = 0.93) · true TNBC"; survival: the risk with its scale, and the outcome
    wrong: bool = False


def _ranked(order: np.ndarray, keep: np.ndarray) -> list[int]:
    return [int(i) for i in order if keep[i]]


def _classification_showcase(run: Run, pid: np.ndarray, with_att: np.ndarray, n: int) -> list[Showcased]:
    """Half (rounded up) the most confident correct calls, half the most confident errors, each labelled; where one
    kind runs short the other fills in. Binary: the correct calls are true positives (highest P(positive))."""
    pred = run.require_predictions()
    classes = run.classes
    probs = run.prob_matrix()
    predicted = probs.argmax(axis=1)
    if "y_pred" in pred:
        lookup = {c: i for i, c in enumerate(classes)}
        given = pred["y_pred"].astype(str).map(lookup)
        if given.notna().all():
            predicted = given.to_numpy(dtype=int)
    truth = run.class_index()
    conf = probs[np.arange(len(probs)), predicted]
    right = predicted == truth
    binary = len(classes) == 2
    good_keep = with_att & right & ((truth == 1) if binary else True)
    if binary and not good_keep.any():  # no true positive has attention: correct calls of either class
        good_keep = with_att & right
    good = _ranked(np.argsort(-(probs[:, 1] if binary else conf), kind="stable"), good_keep)
    bad = _ranked(np.argsort(-conf, kind="stable"), with_att & ~right)
    n_bad = min(len(bad), n // 2)
    n_good = min(len(good), n - n_bad)
    n_bad = min(len(bad), n - n_good)
    good_why = "true positive" if binary and good and truth[good[0]] == 1 else "correct call"
    out = []
    for k, i in enumerate(good[:n_good]):
        out.append(Showcased(pid[i], f"{good_why}, most confident #{k + 1}",
                             f"predicted {classes[predicted[i]]} (p = {conf[i]:.2f}) · true {classes[truth[i]]}"))
    for k, i in enumerate(bad[:n_bad]):
        out.append(Showcased(pid[i], f"error, most confident #{k + 1}",
                             f"predicted {classes[predicted[i]]} (p = {conf[i]:.2f}) · true {classes[truth[i]]}",
                             wrong=True))
    return out


def _ordinal(k: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``12th``, ``13th``, ``21st``, ..."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _survival_showcase(run: Run, pid: np.ndarray, with_att: np.ndarray, n: int) -> list[Showcased]:
    """Half (rounded up) the highest-risk patients who had the event (the model's hits), half the lowest-risk
    patients who had the event anyway (its misses); censored patients fill in where those run short. The risk
    is shown with its scale: the log hazard ratio and its percentile among this run's out-of-fold risks."""
    from scipy.stats import percentileofscore

    pred = run.require_predictions()
    risk = pred["risk"].to_numpy(dtype=float)
    event = pred["event"].to_numpy(dtype=int) == 1
    time = pred["time"].to_numpy(dtype=float)
    unit = f" {run.time_unit}" if run.time_unit else ""
    by_risk = np.argsort(-risk, kind="stable")
    hits = _ranked(by_risk, with_att & event)
    misses = _ranked(by_risk[::-1], with_att & event)
    n_miss = min(len(misses), n // 2)
    hits = [i for i in hits if i not in set(misses[:n_miss])]
    n_hit = min(len(hits), n - n_miss)
    others = _ranked(by_risk, with_att & ~event)[: n - n_hit - n_miss]

    def said(i: int) -> str:
        pct = _ordinal(round(percentileofscore(risk, risk[i], kind="weak")))
        outcome = f"event at {time[i]:g}{unit}" if event[i] else f"censored at {time[i]:g}{unit} (no event seen)"
        return (f"risk {risk[i]:.3g} (log hazard ratio; {pct} percentile of the {len(risk)} out-of-fold "
                f"risks, higher = shorter predicted survival) · {outcome}")

    out = [Showcased(pid[i], f"event, highest predicted risk #{k + 1}", said(i)) for k, i in enumerate(hits[:n_hit])]
    out += [Showcased(pid[i], f"event, lowest predicted risk #{k + 1} (missed)", said(i), wrong=True)
            for k, i in enumerate(misses[:n_miss])]
    out += [Showcased(pid[i], f"censored, highest predicted risk #{k + 1}", said(i)) for k, i in enumerate(others)]
    return out


def _regression_showcase(run: Run, pid: np.ndarray, with_att: np.ndarray, n: int) -> list[Showcased]:
    """Half (rounded up) the closest predictions, half the largest errors (absolute residual), in the target's
    unit."""
    pred = run.require_predictions()
    y, value = pred["y_true"].to_numpy(dtype=float), pred["y_pred"].to_numpy(dtype=float)
    err = np.abs(y - value)
    worst = _ranked(np.argsort(-err, kind="stable"), with_att)
    n_bad = min(len(worst), n // 2)
    best = [i for i in _ranked(np.argsort(err, kind="stable"), with_att) if i not in set(worst[:n_bad])]
    n_good = min(len(best), n - n_bad)
    target = run.config.get("target") or "target"

    def said(i: int) -> str:
        return f"predicted {target} {value[i]:.3g} · observed {y[i]:.3g} (error {value[i] - y[i]:+.3g})"

    out = [Showcased(pid[i], f"closest prediction #{k + 1}", said(i)) for k, i in enumerate(best[:n_good])]
    out += [Showcased(pid[i], f"largest error #{k + 1}", said(i), wrong=True) for k, i in enumerate(worst[:n_bad])]
    return out


def showcase(run: Run, att: pd.DataFrame, n: int) -> list[Showcased]:
    """The patients (with attention) the section shows, chosen deliberately and labelled (module functions
    above); by id, unlabelled, when the run has no usable predictions."""
    with_ids = set(att["patient_id"].astype(str))
    if run.predictions is not None and n > 0:
        try:
            pid = run.predictions["patient_id"].astype(str).to_numpy()
            keep = np.array([p in with_ids for p in pid])
            pick = {"survival": _survival_showcase, "regression": _regression_showcase}.get(
                run.task, _classification_showcase)
            chosen = pick(run, pid, keep, n)
            if chosen:
                return chosen
        except Exception:  # noqa: BLE001 - unusable predictions: fall back to id order
            pass
    return [Showcased(p, "by patient id (no usable predictions)", "") for p in sorted(with_ids)[:n]]


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
    how = ("the highest-risk patients who had the event (the model's hits) and the lowest-risk patients who had it "
           "anyway (its misses); risk is the out-of-fold log hazard ratio, shown with its percentile in this run"
           if run.task == "survival" else
           "the closest out-of-fold predictions and the largest errors (absolute, in the target's unit)"
           if run.task == "regression" else
           "the most confident correct calls (binary: true positives, highest P(positive)) and the most confident "
           "errors, each with its out-of-fold prediction against the truth")
    parts = [f"<p>{n_patients} patients at most, chosen as {how}; per slide the attention heatmap (within-slide "
             f"percentiles) and the {top_k} highest-attention tiles. Attention shows where the model looked, not "
             "that what it saw there is right.</p>"]
    att = att.assign(patient_id=att["patient_id"].astype(str))
    for sc in showcase(run, att, n_patients):
        wrong_word = {"survival": "missed", "regression": "far off"}.get(run.task, "misclassified")
        mark = f"<span class='wrong'>✗ {wrong_word}</span> " if sc.wrong else ""
        parts.append(f"<h3>Patient {html.escape(sc.patient_id)} <small>· {html.escape(sc.why)}</small></h3>"
                     + (f"<p class='said'>{mark}{html.escape(sc.said)}</p>" if sc.said else ""))
        for item, rows in att[att["patient_id"] == sc.patient_id].groupby("item_id", sort=True):
            parts.append(_slide_block(store, run, sc.patient_id, str(item), rows, top_k))
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
