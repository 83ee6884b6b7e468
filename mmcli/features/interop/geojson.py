"""QuPath GeoJSON export: per slide a ``FeatureCollection`` (RFC 7946 structure, coordinates in level-0 pixels,
which is how QuPath places imported objects) holding

- the tissue outline as ``annotation`` objects classified ``Tissue``: the union of the slide's tiles, traced
  exactly (holes kept, diagonal neighbours split into separate polygons, so every polygon is valid);
- one ``tile`` object per tile (a square of ``patch_size_level0`` px) classified ``Tile``, whose
  ``measurements`` hold the per-tile scores of a CSV (``patient_id,item_id,index`` + numeric columns, e.g.
  ``attention.csv`` of ``mmcli fit``), which QuPath shows as measurements and can colour by.

File > Import objects from file in QuPath reads these files; ``properties.objectType`` and
``properties.classification`` follow QuPath's own GeoJSON export, and every ``id`` is a UUID (QuPath's object ids
are UUIDs and it replaces any other), the same on every re-export of the same item. :func:`render_preview` draws a
written file back over the slide thumbnail (a PNG), the way it will sit in QuPath.
"""
from __future__ import annotations

import json
import math
import uuid
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.features.interop.exporter import ExportSummary
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import atomic_path, atomic_write_text

MAX_CELLS = 4_000_000  # raster cells of the tile-union trace; coarser (approximate) beyond
TISSUE_COLOR = [80, 160, 80]
TILE_COLOR = [200, 120, 40]
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://mmcli/geojson")


# ---- tile union -> polygons --------------------------------------------------------------------------------
def _rings(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Boundary rings of the filled cells of ``mask`` (row = y, col = x) in cell-corner coordinates.

    Each filled cell contributes its four directed edges (interior on the left in x-right / y-down coordinates);
    an edge shared with a filled neighbour appears in both directions and cancels. The remaining edges form
    closed rings: outer boundaries and hole boundaries wind in opposite directions. At a vertex where two cells
    touch only diagonally the trace turns towards the current cell, and a ring that still meets itself there is
    split into simple loops, so every ring is simple (valid as an OGC/GeoJSON polygon ring)."""
    edges: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    for y, x in zip(ys.tolist(), xs.tolist()):
        py, px = y + 1, x + 1
        if not padded[py - 1, px]:  # top edge, walked right to left (interior below)
            edges[(x + 1, y)].append((x, y))
        if not padded[py, px - 1]:  # left edge, downwards
            edges[(x, y)].append((x, y + 1))
        if not padded[py + 1, px]:  # bottom edge, rightwards
            edges[(x, y + 1)].append((x + 1, y + 1))
        if not padded[py, px + 1]:  # right edge, upwards
            edges[(x + 1, y + 1)].append((x + 1, y))
    rings = []
    while edges:
        start = next((v for v, o in edges.items() if len(o) == 1), next(iter(edges)))  # not a pinch if possible
        ring: list[tuple[int, int]] = []
        prev: tuple[int, int] | None = None
        cur = start
        while True:
            ring.append(cur)
            outs = edges[cur]
            nxt = outs[0]
            if len(outs) > 1 and prev is not None:  # a pinch: turn towards the interior (the current cell)
                dx, dy = cur[0] - prev[0], cur[1] - prev[1]
                inward = (cur[0] + dy, cur[1] - dx)
                nxt = inward if inward in outs else outs[0]
            outs.remove(nxt)
            if not outs:
                del edges[cur]
            prev, cur = cur, nxt
            if cur == start:
                break
        rings += [_simplify(loop) for loop in _split_at_touches(ring) if len(loop) >= 4]
    return rings


def _split_at_touches(ring: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """A ring that passes a vertex twice (a region pinched at a corner) as simple loops: the loop between the two
    passes becomes a ring of its own (an outline, or a hole touching the outline at that point)."""
    loops, stack, pos = [], [], {}
    for v in ring:
        if v in pos:
            i = pos[v]
            loops.append(stack[i:])
            for u in stack[i + 1:]:
                del pos[u]
            stack = stack[: i + 1]
        else:
            pos[v] = len(stack)
            stack.append(v)
    return [*loops, stack]


def _simplify(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop collinear vertices."""
    out = []
    n = len(ring)
    for i, p in enumerate(ring):
        a, b = ring[i - 1], ring[(i + 1) % n]
        if (p[0] - a[0]) * (b[1] - p[1]) - (p[1] - a[1]) * (b[0] - p[0]) != 0:
            out.append(p)
    return out


def _signed_area(ring: list[tuple[float, float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]))


def _inside(pt: tuple[float, float], ring: list[tuple[float, float]]) -> bool:
    x, y = pt
    inside = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def tile_union(coords: np.ndarray, size: float) -> list[list[list[list[float]]]]:
    """Polygons (GeoJSON ``Polygon`` coordinate arrays: exterior ring then holes, closed) covering the union of
    the ``size``-px squares at ``coords`` (level-0 top-left corners)."""
    if len(coords) == 0:
        return []
    c = np.asarray(coords, dtype=np.int64)
    s = int(round(size))
    g = math.gcd(s, *[int(v) for v in np.unique(c - c.min(axis=0))]) or s
    origin = c.min(axis=0)
    span = (c.max(axis=0) - origin + s) // g
    if int(span[0]) * int(span[1]) > MAX_CELLS:  # snap to a coarser grid: outline approximate to 1 cell
        g = int(math.ceil(math.sqrt(int((c.max(axis=0) - origin + s).prod()) / MAX_CELLS)))
        span = (c.max(axis=0) - origin + s) // g + 1
    mask = np.zeros((int(span[1]), int(span[0])), dtype=bool)
    k = max(1, s // g)
    for x, y in ((c - origin) // g).tolist():
        mask[y:y + k, x:x + k] = True
    rings = [[(float(origin[0] + x * g), float(origin[1] + y * g)) for x, y in r] for r in _rings(mask)]
    # outer rings wind one way (negative signed area in x-right/y-down with interior on the left), holes the other
    outers = [r for r in rings if _signed_area(r) < 0]
    holes = [r for r in rings if _signed_area(r) > 0]
    polys: list[list[list[tuple[float, float]]]] = [[r] for r in sorted(outers, key=_signed_area)]
    for h in holes:
        probe = ((h[0][0] + h[1][0]) / 2, (h[0][1] + h[1][1]) / 2)  # an edge midpoint: never on the outline
        owner = next((p for p in reversed(polys) if _inside(probe, p[0])), None)  # the smallest outline around
        if owner is not None:
            owner.append(h)
    # RFC 7946: exterior counter-clockwise, holes clockwise (as seen with y up): reverse rings accordingly
    out = []
    for p in polys:
        rings_out = []
        for i, r in enumerate(p):
            r = r[::-1] if (i == 0) == (_signed_area(r) < 0) else r
            rings_out.append([list(v) for v in r] + [list(r[0])])
        out.append(rings_out)
    return out


# ---- the feature collection ----------------------------------------------------------------------------------
def _box(x: float, y: float, s: float) -> list[list[list[float]]]:
    return [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]  # counter-clockwise (RFC 7946)


def load_scores(path: str | Path) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """Per (patient_id, item_id): tile index -> {column: value} from a CSV with ``patient_id,item_id,index`` and
    numeric score columns (``attention.csv`` of ``mmcli fit`` / ``mmcli predict --attention``)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--scores {p}: file not found.")
    try:
        df = pd.read_csv(p, dtype={"patient_id": str, "item_id": str})
    except Exception as e:  # noqa: BLE001
        raise InputError(f"--scores {p}: not a readable CSV ({e}).") from e
    need = {"patient_id", "item_id", "index"} - set(df.columns)
    if need:
        raise InputError(f"--scores {p}: missing column(s) {sorted(need)}; it needs patient_id,item_id,index and "
                         "score columns (e.g. attention.csv of mmcli fit).")
    cols = [c for c in df.columns if c not in ("patient_id", "item_id", "index")
            and pd.api.types.is_numeric_dtype(df[c])]
    if not cols:
        raise InputError(f"--scores {p}: no numeric score column besides patient_id,item_id,index.")
    idx = pd.to_numeric(df["index"], errors="coerce")
    if idx.isna().any() or (idx < 0).any() or (idx % 1 != 0).any():
        bad = int(np.flatnonzero(idx.isna() | (idx < 0) | (idx % 1 != 0))[0]) + 2
        raise InputError(f"--scores {p}: row {bad}: 'index' must be a tile row number (integer >= 0).")
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for (pid, iid, i), vals in zip(zip(df["patient_id"], df["item_id"], idx.astype(int)),
                                   df[cols].to_dict("records")):
        out[(pid, iid)][int(i)] = {k: float(v) for k, v in vals.items() if v == v}  # NaN left out
    return dict(out)


def object_id(scope: str, kind: str, index: int) -> str:
    """A QuPath object id: a UUID (QuPath replaces any other id on import), stable across re-exports: UUIDv5 of
    the object's ``scope`` (store item and encoder), kind (``tile`` / ``tissue``) and index."""
    return str(uuid.uuid5(ID_NAMESPACE, f"{scope}/{kind}/{index}"))


def feature_collection(coords: np.ndarray, size: float, scores: dict[int, dict[str, float]] | None = None,
                       name: str = "", scope: str = "") -> dict[str, Any]:
    """The QuPath FeatureCollection of one slide; ``scope`` keys its object UUIDs (:func:`object_id`)."""
    feats: list[dict[str, Any]] = []
    scope = scope or name
    for k, poly in enumerate(tile_union(coords, size)):
        feats.append({"type": "Feature", "id": object_id(scope, "tissue", k),
                      "geometry": {"type": "Polygon", "coordinates": poly},
                      "properties": {"objectType": "annotation", "name": f"{name} tissue {k + 1}".strip(),
                                     "classification": {"name": "Tissue", "color": TISSUE_COLOR},
                                     "isLocked": True}})
    for i, (x, y) in enumerate(np.asarray(coords, dtype=float).tolist()):
        props: dict[str, Any] = {"objectType": "tile", "classification": {"name": "Tile", "color": TILE_COLOR},
                                 "measurements": {"tile_index": i, **((scores or {}).get(i, {}))}}
        feats.append({"type": "Feature", "id": object_id(scope, "tile", i),
                      "geometry": {"type": "Polygon", "coordinates": _box(x, y, size)}, "properties": props})
    return {"type": "FeatureCollection", "features": feats}


def export_geojson(store_path: str | Path, out: str | Path, modality: str = "wsi", encoder_id: str | None = None,
                   scores: str | Path | None = None, *,
                   items: Collection[tuple[str, str]] | None = None) -> ExportSummary:
    """``<out>/<slide stem>.geojson`` for every item of ``modality``/``encoder_id`` with coords and tile size
    (only the ``(patient_id, item_id)`` pairs of ``items`` when given)."""
    from mmcli.features.interop.exporter import choose_encoder, item_geometry, slide_name
    from mmcli.pipeline.store import open_store

    table = load_scores(scores) if scores else {}
    store = open_store(store_path, "r")
    eid = choose_encoder(store, modality, encoder_id)
    out = Path(out)
    summary = ExportSummary("geojson", str(store_path), str(out), modality, eid)
    keys = [k for k in store.iter_items(modality, eid) if items is None or (k.patient_id, k.item_id) in items]
    if items is not None and not keys:
        raise InputError(f"none of {sorted(items)} is a {modality} item of encoder {eid} in {store_path}.")
    names = {}
    for key in keys:
        label = f"{key.patient_id}/{key.item_id}"
        item = store.read_item(key.modality, key.encoder_id, key.patient_id, key.item_id)
        geo = item_geometry(item.attrs)
        miss = [f for f, ok in (("coords", item.coords is not None), ("patch_size_level0", "patch_size_level0" in geo))
                if not ok]
        if miss:
            summary.failed.append((label, f"cannot draw tiles: missing {', '.join(miss)}"))
            continue
        stem = slide_name(item.attrs, key.item_id)
        stem = f"{key.patient_id}__{stem}" if stem in names else stem
        names[stem] = label
        sc = table.get((key.patient_id, key.item_id), {})
        if table and not sc:
            summary.warnings.append(f"{label}: no rows in {scores}; tiles written without scores")
        past = [i for i in sc if i >= len(item.coords)]
        if past:
            summary.warnings.append(f"{label}: {len(past)} score rows point past its {len(item.coords)} tiles "
                                    "(ignored)")
        fc = feature_collection(item.coords, geo["patch_size_level0"], sc, stem,
                                scope=f"{modality}/{eid}/{key.patient_id}/{key.item_id}")
        path = out / f"{stem}.geojson"
        atomic_write_text(path, json.dumps(fc, separators=(",", ":"), allow_nan=False))
        summary.written.append(str(path))
    return summary


# ---- preview ---------------------------------------------------------------------------------------------
def render_preview(geojson: str | Path, png: str | Path, slide: str | Path | None = None,
                   score: str = "attention", max_side: int = 1000) -> Path:
    """Draw a written GeoJSON file as QuPath would show it: the slide thumbnail (when ``slide`` is given and
    opens), tissue outlines (holes dashed) and tiles filled by their ``score`` measurement as within-slide
    percentiles (tiles without it hollow). Everything is in level-0 px, so a misplaced tile shows as one."""
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from scipy.stats import rankdata

    from mmcli.features.readers import open_slide

    fc = json.loads(Path(geojson).read_text())
    tissue = [f for f in fc["features"] if f["properties"].get("objectType") == "annotation"]
    tiles = [f for f in fc["features"] if f["properties"].get("objectType") == "tile"]
    fig = Figure(figsize=(8, 6.5), dpi=100)
    ax = fig.subplots()
    if slide is not None:
        with open_slide(str(slide), "auto") as sr:
            w0, h0 = sr.dimensions
            thumb, _ = sr.thumbnail(max(1.0, max(w0, h0) / max_side))
        ax.imshow(thumb, extent=(0, w0, h0, 0), interpolation="bilinear")
        ax.set_xlim(0, w0)
        ax.set_ylim(h0, 0)
    else:
        ax.invert_yaxis()
    vals = np.array([f["properties"].get("measurements", {}).get(score, np.nan) for f in tiles], dtype=float)
    polys = [f["geometry"]["coordinates"][0] for f in tiles]
    have = ~np.isnan(vals)
    if have.any():
        pct = np.full(len(vals), np.nan)
        pct[have] = rankdata(vals[have]) / have.sum()
        filled = PolyCollection([p for p, h in zip(polys, have) if h], array=pct[have], cmap="jet", alpha=0.5,
                                edgecolors="none", clim=(0, 1))
        ax.add_collection(filled)
        fig.colorbar(filled, ax=ax, fraction=0.035, label=f"{score} (within-slide percentile)")
    if (~have).any():
        ax.add_collection(PolyCollection([p for p, h in zip(polys, have) if not h], facecolors="none",
                                         edgecolors="orange", linewidths=0.5))
    for f in tissue:
        for k, ring in enumerate(f["geometry"]["coordinates"]):
            r = np.asarray(ring)
            ax.plot(r[:, 0], r[:, 1], color="lime", lw=1.2, ls="-" if k == 0 else "--")
    if slide is None:
        ax.autoscale_view()
    ax.set_aspect("equal")
    ax.set_title(f"{Path(geojson).name}: {len(tissue)} tissue outline(s), {len(tiles)} tiles "
                 f"({int(have.sum())} with {score})", fontsize=9)
    ax.set_xlabel("level-0 x (px)")
    ax.set_ylabel("level-0 y (px)")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(png)
