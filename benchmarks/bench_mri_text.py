"""MRI and clinical-text extraction benchmark (a script, not a test), in the form of ``bench_wsi.py``. Everything
is measured in one run on one machine, on the same inputs:

MRI (``r3d18``, default preprocessing: RAS, 1.5 mm, 64^3 grid):
(a) mmcli's per-item pipeline (the shared runner's ``process_item``: cache check, lock, read, reorient,
    resample, z-score, encode, atomic store write) volumes/s  ÷  the encoder alone on in-memory preprocessed
    volumes at its best precision;
(b) the pipeline  ÷  a naive script: nibabel ``get_fdata`` (float64), ``scipy.ndimage.zoom`` (cubic) to the
    spacing, crop/pad, ``.npy`` to disk and back, fp32 encoder;
(c) cosine similarity of ``--precision auto`` features to fp32 features.

Text (``minilm-l6``, windows of 256 tokens, stride 64, mean pooling):
(a) the pipeline (read, tokenize into windows, encode, pool, store) notes/s  ÷  the encoder alone on the already
    tokenized windows of the same notes at its best precision;
(b) the pipeline  ÷  a naive script: 200-word pieces, each tokenized and encoded on its own (batch 1, fp32);
(c) cosine of ``auto`` vs fp32 note embeddings.

How: this machine may be shared, and its speed can change several-fold within seconds. So the methods are
interleaved **item by item** (pipeline, encoder fp32, encoder auto, naive on item 1, then on item 2, ...) for
``--rounds`` rounds; each method's time for an item is its best over the rounds, and rates are items / the sum of
those times. (a) is also given as the median of the per-item ratios. A whole ``mmcli extract`` run (progress,
run record included) is timed once for reference.

Volumes are synthetic LAS-oriented NIfTI files (``--source-shape`` voxels at 0.8 x 0.8 x 2.5 mm, a bright
ellipsoid in noise); notes are concatenations of ``mmcli synth`` pathology notes, ~100 to ~1500 tokens long.
Run: ``python benchmarks/bench_mri_text.py [--volumes 12] [--notes 32] [--rounds 3] [--out results.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HEADER = "patient_id,modality,path,item_id\n"


def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": round(float(c.mean()), 5), "min": round(float(c.min()), 5)}


def interleave(n: int, methods: dict[str, Callable[[int], object]], rounds: int) -> dict[str, np.ndarray]:
    """Best-of-``rounds`` seconds of every method on every item, the methods taking turns item by item."""
    best = {k: np.full(n, np.inf) for k in methods}
    for _ in range(rounds):
        for i in range(n):
            for k, fn in methods.items():
                t0 = time.perf_counter()
                fn(i)
                best[k][i] = min(best[k][i], time.perf_counter() - t0)
    return best


def summarise(t: dict[str, np.ndarray], unit: str) -> dict:
    """Rates (items / summed best seconds) and the (a), (b) ratios."""
    n = len(t["pipeline"])
    rates = {k: round(n / float(v.sum()), 3) for k, v in t.items()}
    enc = np.minimum(t["encoder_fp32"], t["encoder_auto"])
    return {
        f"{unit}_per_s": rates,
        "a_pipeline_over_encoder_best": round(float(enc.sum() / t["pipeline"].sum()), 3),
        "a_median_per_item": round(float(np.median(enc / t["pipeline"])), 3),
        "b_pipeline_over_naive": round(float(t["naive_fp32"].sum() / t["pipeline"].sum()), 2),
    }


def _manifest(path: Path, rows: list, modality: str) -> Path:
    path.write_text(HEADER + "".join(f"{r.patient_id},{modality},{r.path},{r.item_id}\n" for r in rows))
    return path


# ---- MRI ------------------------------------------------------------------------------------------------------
def write_volumes(d: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """``n`` LAS NIfTI volumes (int16, gzip) and a manifest of them."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    spacing = (0.8, 0.8, 2.5)
    aff = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    grid = np.stack(np.meshgrid(*[(np.arange(s) - s / 2) * sp for s, sp in zip(shape, spacing)], indexing="ij"))
    lines = [HEADER.strip()]
    for i in range(n):
        r = rng.uniform(20, 45, 3)
        body = ((grid / r[:, None, None, None]) ** 2).sum(0) < 1.0
        vol = rng.rayleigh(15, shape) + body * rng.uniform(300, 600) + body * rng.normal(0, 40, shape)
        nib.save(nib.Nifti1Image(np.clip(vol, 0, 32767).astype(np.int16), aff), str(d / f"v{i:03d}.nii.gz"))
        lines.append(f"P{i:03d},mri,v{i:03d}.nii.gz,T1")
    (d / "mri.csv").write_text("\n".join(lines) + "\n")
    return d / "mri.csv"


def naive_volume(path: Path, spacing: float, shape: tuple[int, int, int], model, tmp: Path) -> None:
    """The way many scripts do it: float64 load, cubic zoom, crop/pad, .npy round trip, fp32."""
    import nibabel as nib
    import torch
    from scipy.ndimage import zoom

    img = nib.load(str(path))
    vol = zoom(img.get_fdata(), np.asarray(img.header.get_zooms()[:3]) / spacing, order=3)
    out = np.zeros(shape, np.float32)
    src = tuple(slice(max(0, (a - b) // 2), max(0, (a - b) // 2) + min(a, b)) for a, b in zip(vol.shape, shape))
    dst = tuple(slice(max(0, (b - a) // 2), max(0, (b - a) // 2) + min(a, b)) for a, b in zip(vol.shape, shape))
    out[dst] = vol[src]
    out = (out - out.mean()) / (out.std() + 1e-6)
    np.save(tmp / "v.npy", out)
    with torch.inference_mode():
        model(torch.from_numpy(np.load(tmp / "v.npy").transpose(2, 1, 0).copy())[None, None])


def bench_mri(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from mmcli.features.encoders.registry import create_encoder
    from mmcli.features.mri import (
        DEFAULT_SHAPE,
        DEFAULT_SPACING,
        MriParams,
        load_volume,
        make_spec,
        preprocess,
        to_tensor_layout,
    )
    from mmcli.features.runner import process_item
    from mmcli.pipeline.manifest import load_manifest
    from mmcli.pipeline.store import open_store
    from mmcli.stages.extract import extract

    d = work / "mri"
    d.mkdir()
    t0 = time.perf_counter()
    rows = load_manifest(write_volumes(d, args.volumes, tuple(args.source_shape))).rows
    build_s = time.perf_counter() - t0
    spec = make_spec()
    store = str(work / "mri.zarr")
    process_item(spec, rows[0], store, force=True)  # builds the extractor (loads the encoder) once

    params = MriParams(DEFAULT_SPACING, DEFAULT_SHAPE)
    t0 = time.perf_counter()
    vols = [to_tensor_layout(preprocess(load_volume(r.path)[0], params, r.path.name)[0]) for r in rows]
    prep_s = (time.perf_counter() - t0) / len(rows)
    enc = {p: create_encoder("r3d18", precision=p, quiet=True) for p in ("fp32", "auto")}
    feats = {p: np.concatenate([e.encode(v) for v in vols]) for p, e in enc.items()}  # also warms both up
    tmp = work / "npy"
    tmp.mkdir()
    t = interleave(len(rows), {
        "pipeline": lambda i: process_item(spec, rows[i], store, force=True),
        "encoder_fp32": lambda i: enc["fp32"].encode(vols[i]),
        "encoder_auto": lambda i: enc["auto"].encode(vols[i]),
        "naive_fp32": lambda i: naive_volume(rows[i].path, DEFAULT_SPACING[0], DEFAULT_SHAPE, enc["fp32"].model, tmp),
    }, args.rounds)
    st = open_store(store, "r")
    auto = np.concatenate([st.read_item("mri", spec.encoder_id, r.patient_id, "T1").features for r in rows])
    t0 = time.perf_counter()
    run = extract("mri", _manifest(d / "all.csv", rows, "mri"), work / "run.zarr", progress=False)
    run_rate = len(rows) / (time.perf_counter() - t0)
    assert run.count("done") == len(rows), run.problems
    return {
        "volumes": len(rows), "source_shape": list(args.source_shape), "source_spacing_mm": [0.8, 0.8, 2.5],
        "grid": list(DEFAULT_SHAPE), "spacing_mm": list(DEFAULT_SPACING), "build_s": round(build_s, 1),
        "auto_precision": enc["auto"].precision, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        **summarise(t, "volumes"), "whole_extract_run_volumes_per_s": round(run_rate, 3),
        "read_and_preprocess_s_per_volume": round(prep_s, 4),
        "c_cosine_auto_vs_fp32": _cos(auto, feats["fp32"]),
    }


# ---- text -----------------------------------------------------------------------------------------------------
def write_notes(d: Path, n: int, seed: int = 0) -> Path:
    """``n`` notes of 1 to 16 concatenated synthetic pathology reports (~100-1500 tokens)."""
    from mmcli.stages.synth.cohort import draw_cohort
    from mmcli.stages.synth.notes import render_note

    pats = draw_cohort(max(16, n), seed)
    rng = np.random.default_rng(seed)
    lines = [HEADER.strip()]
    for i in range(n):
        k = int(rng.integers(1, 17))
        (d / f"n{i:03d}.txt").write_text("\n".join(render_note(seed, pats[(i + j) % len(pats)]) for j in range(k)))
        lines.append(f"P{i:03d},text,n{i:03d}.txt,note")
    (d / "text.csv").write_text("\n".join(lines) + "\n")
    return d / "text.csv"


def naive_note(text: str, model, tokenizer) -> None:
    """200-word pieces, each tokenized and encoded alone (batch 1, fp32), piece embeddings averaged."""
    import torch

    words = text.split()
    with torch.inference_mode():
        vecs = [model(**tokenizer(" ".join(words[i:i + 200]), truncation=True, max_length=512,
                                  return_tensors="pt")).last_hidden_state.mean(1) for i in range(0, len(words), 200)]
        torch.cat(vecs).mean(0)


def bench_text(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from mmcli.features.encoders.registry import create_encoder
    from mmcli.features.runner import process_item
    from mmcli.features.text import make_spec
    from mmcli.pipeline.manifest import load_manifest
    from mmcli.pipeline.store import open_store
    from mmcli.stages.extract import extract

    d = work / "text"
    d.mkdir()
    rows = load_manifest(write_notes(d, args.notes)).rows
    spec = make_spec()
    store = str(work / "text.zarr")
    process_item(spec, rows[0], store, force=True)
    texts = [Path(r.path).read_text() for r in rows]
    enc = {p: create_encoder("minilm-l6", precision=p) for p in ("fp32", "auto")}
    windows = [enc["auto"].tokenize(t) for t in texts]  # tokenized up front: the encoder alone

    def alone(e, i: int) -> np.ndarray:
        v, c = e.encode_windows(windows[i])
        return (v * c[:, None]).sum(0) / c.sum()

    feats = {p: np.stack([alone(e, i) for i in range(len(texts))]) for p, e in enc.items()}  # + warm-up
    t = interleave(len(rows), {
        "pipeline": lambda i: process_item(spec, rows[i], store, force=True),
        "encoder_fp32": lambda i: alone(enc["fp32"], i),
        "encoder_auto": lambda i: alone(enc["auto"], i),
        "naive_fp32": lambda i: naive_note(texts[i], enc["fp32"].model, enc["fp32"].tokenizer),
    }, args.rounds)
    st = open_store(store, "r")
    auto = np.concatenate([st.read_item("text", spec.encoder_id, r.patient_id, "note").features for r in rows])
    t0 = time.perf_counter()
    run = extract("text", _manifest(d / "all.csv", rows, "text"), work / "run.zarr", progress=False)
    run_rate = len(rows) / (time.perf_counter() - t0)
    assert run.count("done") == len(rows), run.problems
    tokens = [len(enc["auto"].tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts]
    return {
        "notes": len(rows), "windows": int(sum(w["input_ids"].shape[0] for w in windows)),
        "tokens_median": int(np.median(tokens)), "tokens_max": int(max(tokens)), "window": enc["auto"].window,
        "stride": enc["auto"].stride, "auto_precision": enc["auto"].precision, "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(), **summarise(t, "notes"),
        "whole_extract_run_notes_per_s": round(run_rate, 3),
        "c_cosine_auto_vs_fp32": _cos(auto, feats["fp32"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=12)
    ap.add_argument("--source-shape", type=int, nargs=3, default=[192, 192, 48], metavar=("X", "Y", "Z"))
    ap.add_argument("--notes", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each item's best time counts")
    ap.add_argument("--skip", choices=["mri", "text"], action="append", default=[])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="mmcli-bench-mt-"))
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "loadavg_start": os.getloadavg()}}
    try:
        if "mri" not in args.skip:
            res["mri"] = bench_mri(args, work)
            print(json.dumps(res["mri"], indent=2), flush=True)
        if "text" not in args.skip:
            res["text"] = bench_text(args, work)
            print(json.dumps(res["text"], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    res["machine"].update(torch=torch.__version__, loadavg_end=os.getloadavg(),
                          max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
