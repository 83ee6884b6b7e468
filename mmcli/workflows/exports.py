"""Exports that a study (and the demo) make from a fitted run: one slide as QuPath GeoJSON with its attention, and
high-resolution attention heatmaps (:mod:`mmcli.stages.heatmap`)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def export_attention_geojson(store: Path, run_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """QuPath GeoJSON of the slide with the most tiles in ``run_dir``'s ``attention.csv``, its tiles carrying
    their out-of-fold attention, and a PNG of the written file drawn over the slide thumbnail.
    Returns ``(geojson, png)``."""
    import pandas as pd

    from mmcli.features.interop.geojson import export_geojson, render_preview
    from mmcli.pipeline.rundir import load_run
    from mmcli.pipeline.store import open_store

    scores = run_dir / "attention.csv"
    att = pd.read_csv(scores, dtype={"patient_id": str, "item_id": str})
    counts = att.groupby(["patient_id", "item_id"]).size()
    pid, item = counts[counts == counts.max()].index[0]  # first by id among the largest slides
    eid = load_run(run_dir).encoder_ids.get("wsi")
    summary = export_geojson(store, out_dir, "wsi", eid, scores, items={(pid, item)})
    if summary.failed or not summary.written:
        raise RuntimeError(f"GeoJSON export of {pid}/{item} failed: {summary.failed}")
    gj = Path(summary.written[0])
    attrs = open_store(store, "r").item_attrs("wsi", summary.encoder_id, pid, item) or {}
    slide = (attrs.get("source_fingerprint") or {}).get("path")
    png = render_preview(gj, gj.with_suffix(".png"), slide if slide and Path(slide).is_file() else None)
    return gj, png


def export_heatmaps(study: Any, spec: Any, echo: Callable[[str], None]) -> list[str]:
    """The high-resolution heatmaps of one study export (``exports.heatmaps``) into ``OUT/heatmaps/<run>``;
    returns the files written."""
    from mmcli.stages.heatmap import HeatmapOptions
    from mmcli.stages.heatmap import export_heatmaps as run

    out = study.out / "heatmaps" / spec.run
    summary = run(study.run_dir(spec.run), out, patients=spec.patients, options=HeatmapOptions(**spec.options),
                  store=study.store, log=echo)
    for line in summary.lines():
        echo(line)
    return [str(p) for p in summary.written]
