"""WSI extraction benchmark (a script, not a test). Everything is measured in one run on one machine:

(a) ``mmcli extract`` (default runtime and precision; slide item time) tiles/s  ÷  the BEST float encoder
    alone on the same in-memory tiles: torch eager fp32 (and bf16 where the CPU has it), torch.compile, OpenVINO
(b) ``mmcli extract --precision int8`` tiles/s  ÷  that best float encoder alone, with int8's fidelity cosine
(c) peak RSS of ``mmcli extract`` on a 60k-tile slide and on a slide 10x smaller              (flat, < 2 GB)
(e) the int8 run is a second encoder on an already-planned slide: its item says ``tile_plan: reused``
read-side share: in ``mmcli extract`` at the default runtime, the seconds the encoder waits for the reader
    threads (reading, decoding, resizing) and the reader threads' CPU seconds, each ÷ the encoder's compute
    seconds on the same slide (item attrs ``read_wait_seconds``, ``read_cpu_seconds``,
    ``encoder_compute_seconds``); also the reader alone (no encoder) in tiles/s

(f) before a tile is encoded: ``mmcli extract`` tiles/s with ``--stain-norm macenko``, ``--stain-norm reinhard``
    and ``--remove-artifacts blur,pen,dark``, each ÷ the same run without (slide item seconds, tile plan reused,
    configurations interleaved, ``--rounds`` rounds, medians; also per CPU second of the process, the figure that
    a busy shared machine does not blur); and the blur detector's calibration: the
    sharpness score of 64-px tiles of real tissue texture (scikit-image's IHC image drawn as H&E, sensor
    noise, JPEG q90) at Gaussian blurs of 0-3 px (percentiles)

(a), (b), (e) use the default encoder (``resnet50_trunc``, 224 px at 0.5 µm/px) on the same slide and tiles.
(c) runs each slide in a fresh subprocess with a tiny encoder (``timm:test_resnet``, 32 px tiles at 2 µm/px,
i.e. 128 level-0 px per tile) so that 50k tiles finish in minutes on a laptop CPU; memory does not depend on
the encoder's speed, and the only per-tile state (coords, features N x D) is reported alongside.

Slides are synthetic Aperio SVS files written tile by tile with tifffile (JPEG, 256 px tiles, levels 1/4/16),
so building a 50k-tile slide needs little memory. Run: ``python benchmarks/bench_wsi.py [--tiles 256]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

TILE = 256  # JPEG tile of the written slides
GLASS = np.array([242, 240, 244], np.float32)


# ---- synthetic slides -------------------------------------------------------------------------------------
def _textures(k: int = 12, seed: int = 0) -> list[np.ndarray]:
    """H&E-like 256 px textures: pink stroma with purple nuclei and colour noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        base = np.array([226, 150, 190], np.float32) + rng.normal(0, 8, 3)
        img = np.empty((TILE, TILE, 3), np.float32)
        img[:] = base
        for _ in range(int(rng.integers(40, 120))):
            x, y = rng.integers(0, TILE - 8, 2)
            r = int(rng.integers(3, 7))
            img[y:y + r * 2, x:x + r * 2] = (90, 50, 140) + rng.normal(0, 10, 3)
        img += rng.normal(0, 7, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def write_bench_slide(path: Path, tiles_x: int, tiles_y: int, mpp: float = 0.5, margin: int = 2) -> Path:
    """An Aperio SVS of ``tiles_x x tiles_y`` JPEG tiles (256 px); tissue everywhere except a ``margin`` of
    glass tiles. Written tile by tile (and its 4x / 16x levels from pre-shrunk textures): memory stays small."""
    tex = _textures()
    glass = np.broadcast_to(GLASS.astype(np.uint8), (TILE, TILE, 3)).copy()

    def kind(i: int, j: int) -> int:  # -1 = glass, else a texture index
        if i < margin or j < margin or i >= tiles_y - margin or j >= tiles_x - margin:
            return -1
        return (i * 7919 + j * 104729) % len(tex)

    def level_tiles(f: int):
        small = {-1: glass[: TILE // f, : TILE // f]}
        for t, img in enumerate(tex):
            small[t] = np.asarray(Image.fromarray(img).resize((TILE // f, TILE // f), Image.BOX))
        ny, nx = -(-tiles_y // f), -(-tiles_x // f)
        for ty in range(ny):
            for tx in range(nx):
                out = np.empty((TILE, TILE, 3), np.uint8)
                out[:] = glass
                for a in range(f):
                    for b in range(f):
                        i, j = ty * f + a, tx * f + b
                        if i < tiles_y and j < tiles_x:
                            s = TILE // f
                            out[a * s:(a + 1) * s, b * s:(b + 1) * s] = small[kind(i, j)]
                yield out

    w, h = tiles_x * TILE, tiles_y * TILE
    head = f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q=80"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(level_tiles(1), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                  compressionargs={"level": 80}, photometric="rgb", metadata=None,
                  description=f"{head}|AppMag = {round(10 / mpp)}|MPP = {mpp:.4f}")
        thumb = np.broadcast_to(GLASS.astype(np.uint8), (max(1, h // 64), max(1, w // 64), 3)).copy()
        tif.write(thumb, compression="jpeg", photometric="rgb", metadata=None, description=f"{head} -> thumbnail")
        for f in (4, 16):
            lw, lh = w // f, h // f  # exact level size; edge tiles are padded by the writer's tiling
            tif.write(level_tiles(f), shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                      compressionargs={"level": 80}, photometric="rgb", metadata=None,
                      description=f"{head} -> {w // f}x{h // f} JPEG/RGB Q=80")
    return path


def _manifest(d: Path, slide: Path, pid: str = "P1") -> Path:
    m = d / f"manifest_{pid}.csv"
    m.write_text(f"patient_id,modality,path,item_id\n{pid},wsi,{slide},{slide.stem}\n")
    return m


# ---- (a)-(c) throughput and precision --------------------------------------------------------------------
def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def encoder_alone(enc, tiles: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """tiles/s of the encoder on in-memory uint8 tiles (one warm-up batch first) and its features."""
    enc.encode(tiles[:batch])
    t0 = time.perf_counter()
    feats = np.concatenate([enc.encode(tiles[i:i + batch]) for i in range(0, len(tiles), batch)])
    return _rate(len(tiles), time.perf_counter() - t0), feats


def _item(store: Path, eid: str, pid: str, item: str) -> tuple[dict, np.ndarray, np.ndarray]:
    from mmcli.pipeline.store import open_store

    it = open_store(store, "r").read_item("wsi", eid, pid, item)
    return dict(it.attrs), it.coords, it.features.astype(np.float32)


def throughput(args: argparse.Namespace, work: Path) -> dict:
    """(a), (b), (e) in one run: the pipeline (slide item time from the item attrs that the run record and the
    store keep) against every float encoder-alone configuration on the same in-memory tiles, and int8."""
    import torch

    from mmcli.features.encoders.openvino_rt import cosine_rows
    from mmcli.features.encoders.registry import create_encoder
    from mmcli.features.encoders.runtime import cpu_has_bf16
    from mmcli.features.readers import open_slide
    from mmcli.stages.extract import extract

    side = int(np.ceil((np.sqrt(args.tiles) + 2) * args.patch_size / TILE)) + 4  # tissue + 2 glass tiles a side
    t0 = time.perf_counter()
    slide = write_bench_slide(work / "bench.svs", side, side)
    warm = write_bench_slide(work / "warm.svs", 8, 8)
    build_s = time.perf_counter() - t0
    common = dict(encoder=args.encoder, patch_size=args.patch_size, mpp=0.5, batch_size=args.batch_size,
                  qc=True, progress=False)
    m, mw = _manifest(work, slide), _manifest(work, warm, "W")
    # (a) the default: runtime auto, precision auto. A cohort run loads its encoder once: warm it on a small slide
    store = work / "auto.zarr"
    extract("wsi", mw, store, **common)
    eid = extract("wsi", m, store, **common).encoder_id
    attrs, coords, feats_auto = _item(store, eid, "P1", slide.stem)
    n = len(coords)
    pipe_rate = _rate(n, attrs["seconds"])
    with open_slide(slide) as rd:
        tiles = np.stack([rd.read_region(int(x), int(y), 0, args.patch_size, args.patch_size) for x, y in coords])
    # the encoder alone, every float configuration this machine offers, on the same tiles
    alone: dict[str, float] = {}
    precs = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    ref = None
    for prec in precs:
        enc = create_encoder(args.encoder, precision=prec, runtime="torch")
        alone[f"torch_eager_{prec}"], f = encoder_alone(enc, tiles, args.batch_size)
        ref = f if prec == "fp32" else ref
    if not args.no_compile:
        for prec in precs:
            enc = create_encoder(args.encoder, precision=prec, runtime="torch-compile")
            t1 = time.perf_counter()
            enc.encode(tiles[:args.batch_size])  # compiles
            alone[f"compile_s_{prec}"] = round(time.perf_counter() - t1, 1)
            alone[f"torch_compile_{prec}"], _ = encoder_alone(enc, tiles, args.batch_size)
    ov = create_encoder(args.encoder, precision="auto", runtime="openvino")
    ov_prec = ov.runtime()["precision"]
    alone[f"openvino_{ov_prec}"], _ = encoder_alone(ov, tiles, args.batch_size)
    best_name, best = max(((k, v) for k, v in alone.items() if not k.startswith("compile_s")), key=lambda kv: kv[1])
    # (b) int8, a second encoder in the same store: calibrated on this cohort (the warm-up and the bench slide,
    # tile plans reused), then the pipeline again with the quantised model already there (timed)
    both = work / "both.csv"
    both.write_text(m.read_text() + "".join(mw.read_text().splitlines(keepends=True)[1:]))
    t1 = time.perf_counter()
    eid8 = extract("wsi", both, store, precision="int8", **common).encoder_id
    int8_run_s = time.perf_counter() - t1
    first8, _, _ = _item(store, eid8, "P1", slide.stem)
    extract("wsi", m, store, precision="int8", force=True, **common)
    a8, _, feats8 = _item(store, eid8, "P1", slide.stem)
    int8_rate = _rate(n, a8["seconds"])
    enc8 = create_encoder(args.encoder, precision="fp32", runtime="openvino")
    enc8.int8_model = a8["int8"]["model"]
    int8_alone, _ = encoder_alone(enc8, tiles, args.batch_size)
    cos_auto = cosine_rows(feats_auto, ref)
    cos8 = cosine_rows(feats8, ref)
    return {
        "slide": {"level0_px": [side * TILE] * 2, "build_s": round(build_s, 1)},
        "tiles": n, "encoder": args.encoder, "patch_size": args.patch_size, "mpp": 0.5,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "default_runtime": attrs["runtime"], "default_precision": attrs["precision"],
        "tiles_per_s": {"mmcli_extract_default": round(pipe_rate, 2), "mmcli_extract_int8": round(int8_rate, 2),
                        **{f"alone_{k}": round(v, 2) for k, v in alone.items()},
                        "alone_openvino_int8": round(int8_alone, 2)},
        "item_seconds": {"default": attrs["seconds"], "default_plan_s": attrs["plan_seconds"],
                         "default_encode_s": attrs["encode_seconds"], "int8": a8["seconds"]},
        "best_float_alone": best_name,
        "a_pipeline_default_over_best_float_alone": round(pipe_rate / best, 3),
        "b_pipeline_int8_over_best_float_alone": round(int8_rate / best, 3),
        "b_int8_fidelity_heldout": a8["int8"]["fidelity"],
        "b_int8_vs_fp32_on_bench_tiles": {"min": round(float(cos8.min()), 5),
                                          "median": round(float(np.median(cos8)), 5)},
        "b_int8_first_run_s_incl_calibration": round(int8_run_s, 1),
        "default_vs_fp32_cosine": {"min": round(float(cos_auto.min()), 5)},
        "read_side_default": read_side(attrs),
        "e_second_encoder_tile_plan": first8["tile_plan"],
    }


# ---- read-side share --------------------------------------------------------------------------------------
def read_side(attrs: dict) -> dict:
    """Where the pipeline's encode loop spent its time, from one slide item's attrs."""
    comp = attrs["encoder_compute_seconds"]
    return {"encoder_compute_s": comp, "read_wait_s": attrs["read_wait_seconds"],
            "read_cpu_s": attrs["read_cpu_seconds"], "read_threads": attrs["read_threads"],
            "wait_share_of_encoder": round(attrs["read_wait_seconds"] / comp, 3) if comp else None,
            "read_cpu_share_of_encoder": round(attrs["read_cpu_seconds"] / comp, 3) if comp else None}


def reader_alone(slide: Path, coords: np.ndarray, plan_attrs: dict, batch: int, threads: int) -> dict:
    """The reader threads with no encoder: tiles/s and CPU seconds per tile."""
    from mmcli.features.readers import slide_opener
    from mmcli.features.tiling import TilePlan, iter_tile_batches

    plan = TilePlan(coords, np.ones(len(coords), np.float32), plan_attrs["level"], plan_attrs["level_downsample"],
                    plan_attrs["read_size"], plan_attrs["patch_size"], plan_attrs["patch_size_level0"],
                    plan_attrs["mpp"], plan_attrs["slide_mpp"], plan_attrs["min_tissue"])
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    n = sum(len(b) for _, b in iter_tile_batches(slide_opener(slide, plan_attrs["reader"]), plan, batch, threads,
                                                stats=stats))
    wall = time.perf_counter() - t0
    return {"tiles_per_s": round(_rate(n, wall), 1), "cpu_ms_per_tile": round(1000 * stats["read_cpu_s"] / n, 2),
            "threads": threads}


def read_share(args: argparse.Namespace, work: Path) -> dict:
    """The read-side share alone (no encoder-alone runs): default ``mmcli extract`` on a slide of about
    ``--tiles`` tissue tiles, ``--rounds`` times into fresh stores (after a warm-up slide), medians."""
    from mmcli.stages.extract import extract

    side = int(np.ceil((np.sqrt(args.tiles) + 2) * args.patch_size / TILE)) + 4
    slide = write_bench_slide(work / "read.svs", side, side)
    warm = write_bench_slide(work / "readwarm.svs", 8, 8)
    m, mw = _manifest(work, slide), _manifest(work, warm, "W")
    common = dict(encoder=args.encoder, patch_size=args.patch_size, mpp=0.5, batch_size=args.batch_size,
                  qc=True, progress=False)
    rounds = []
    for r in range(args.rounds):
        store = work / f"read{r}.zarr"
        extract("wsi", mw, store, **common)  # a cohort run loads its encoder once
        eid = extract("wsi", m, store, **common).encoder_id
        attrs, coords, _ = _item(store, eid, "P1", slide.stem)
        rec = {**read_side(attrs), "tiles": len(coords), "runtime": attrs["runtime"],
               "precision": attrs["precision"], "item_tiles_per_s": attrs["tiles_per_s"],
               "reader_alone": reader_alone(slide, coords, attrs, args.batch_size, attrs["read_threads"])}
        print(json.dumps(rec), flush=True)
        rounds.append(rec)
    med = {k: float(np.median([r[k] for r in rounds])) for k in ("wait_share_of_encoder",
                                                                 "read_cpu_share_of_encoder", "item_tiles_per_s")}
    med["reader_alone_tiles_per_s"] = float(np.median([r["reader_alone"]["tiles_per_s"] for r in rounds]))
    med["reader_cpu_ms_per_tile"] = float(np.median([r["reader_alone"]["cpu_ms_per_tile"] for r in rounds]))
    return {"median": med, "rounds": rounds}


# ---- (f) before a tile is encoded ------------------------------------------------------------------------------
QC_CONFIGS = {"macenko": {"stain_norm": "macenko"}, "reinhard": {"stain_norm": "reinhard"},
              "artifacts": {"remove_artifacts": "blur,pen,dark"}}


def qc_overhead(args: argparse.Namespace, work: Path) -> dict:
    """Throughput of the before-encoding steps relative to the plain run, measured interleaved in one process."""
    from mmcli.stages.extract import extract

    side = int(np.ceil((np.sqrt(args.qc_tiles) + 2) * args.patch_size / TILE)) + 4
    slide = write_bench_slide(work / "qc.svs", side, side)
    warm = write_bench_slide(work / "qcwarm.svs", 8, 8)
    m, mw = _manifest(work, slide), _manifest(work, warm, "W")
    common = dict(encoder=args.encoder, patch_size=args.patch_size, mpp=0.5, batch_size=args.batch_size,
                  qc=True, progress=False)
    store = work / "qc.zarr"
    configs = {"plain": {}, **QC_CONFIGS}
    for kw in configs.values():  # load the encoder, fit the references, plan the slides
        extract("wsi", mw, store, **common, **kw)
        extract("wsi", m, store, **common, **kw)
    rounds = []
    names = list(configs)
    for r in range(args.rounds):
        rec = {}
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            cpu0 = _cpu_s()
            eid = extract("wsi", m, store, force=True, **common, **configs[name]).encoder_id
            cpu = _cpu_s() - cpu0
            attrs, coords, _ = _item(store, eid, "P1", slide.stem)
            read = attrs.get("tile_qc", {}).get("candidates", len(coords))
            rec[name] = {"tiles_read": read, "tiles_kept": len(coords), "seconds": attrs["seconds"],
                         "tiles_per_s": round(_rate(read, attrs["seconds"]), 2),
                         "tiles_per_cpu_s": round(_rate(read, cpu), 3)}
        rec["ratio"] = {k: round(rec[k]["tiles_per_s"] / rec["plain"]["tiles_per_s"], 3) for k in QC_CONFIGS}
        rec["cpu_ratio"] = {k: round(rec[k]["tiles_per_cpu_s"] / rec["plain"]["tiles_per_cpu_s"], 3)
                            for k in QC_CONFIGS}
        print(json.dumps(rec), flush=True)
        rounds.append(rec)
    med = {k: float(np.median([r["ratio"][k] for r in rounds])) for k in QC_CONFIGS}
    cpu = {k: float(np.median([r["cpu_ratio"][k] for r in rounds])) for k in QC_CONFIGS}
    return {"tiles": rounds[0]["plain"]["tiles_read"], "encoder": args.encoder, "median_ratio_to_plain": med,
            "median_cpu_ratio_to_plain": cpu,
            "rounds": rounds, "blur_calibration": blur_calibration()}


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (reader threads and encoder): the throughput a dedicated CPU
    would see, where wall time on a shared machine also counts other processes."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def blur_calibration(tiles_side: int = 16, seed: int = 0) -> dict:
    """Sharpness percentiles of 64-px tiles of real texture (the built-in stain reference, scikit-image's IHC image
    drawn as H&E, mirror-tiled) with sensor noise (sd 1.5) and JPEG q90, sharp and Gaussian-blurred."""
    import io

    from scipy import ndimage

    from mmcli.features.qc.artifacts import tile_scores
    from mmcli.features.qc.stain import builtin_reference_image

    ref = builtin_reference_image().astype(np.float32)
    n = tiles_side * 64
    img = np.pad(ref, ((0, n - 512), (0, n - 512), (0, 0)), mode="symmetric")
    rng = np.random.default_rng(seed)
    out = {}
    for sigma in (0.0, 1.0, 1.5, 2.0, 3.0):
        a = img if sigma == 0 else ndimage.gaussian_filter(img, (sigma, sigma, 0))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a + rng.normal(0, 1.5, a.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                                                  quality=90)
        a = np.asarray(Image.open(buf))
        t = np.stack([a[y:y + 64, x:x + 64] for y in range(0, n, 64) for x in range(0, n, 64)])
        sc = tile_scores(t)["sharpness"]
        out[f"sigma_{sigma}"] = {q: round(float(np.percentile(sc, v)), 1)
                                 for q, v in (("p10", 10), ("median", 50), ("p90", 90), ("max", 100))}
    return out


# ---- (d) memory --------------------------------------------------------------------------------------------
_CHILD = """
import json, sys, time
import torch, timm
from mmcli.stages.extract import extract

def hwm_mb():  # peak RSS of this process image (ru_maxrss would include the parent's peak before exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = hwm_mb()
t0 = time.perf_counter()
s = extract("wsi", sys.argv[1], sys.argv[2], encoder="timm:test_resnet", patch_size=32, mpp=2.0, batch_size=256,
            progress=False)
o = s.outcomes[0]
print(json.dumps({"status": o.status, "reason": o.reason, "tiles": o.n, "seconds": time.perf_counter() - t0,
                  "rss_after_imports_mb": round(base, 1),
                  "peak_rss_mb": hwm_mb()}))
"""


def memory(args: argparse.Namespace, work: Path) -> dict:
    out = {}
    for label, n_tiles in (("small", args.big_tiles // 10), ("big", args.big_tiles)):
        side = int(np.ceil(np.sqrt(n_tiles * 1.2) / 2)) + 4  # 2 x 2 analysis tiles of 128 px per JPEG tile
        t0 = time.perf_counter()
        slide = write_bench_slide(work / f"mem_{label}.svs", side, side)
        build_s = time.perf_counter() - t0
        m = _manifest(work, slide, label)
        res = subprocess.run([sys.executable, "-c", _CHILD, str(m), str(work / f"mem_{label}.zarr")],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        rec.update(level0_px=side * TILE, file_mb=round(slide.stat().st_size / 1e6, 1), build_s=round(build_s, 1))
        rec["tiles_per_s"] = round(rec["tiles"] / rec["seconds"], 1)
        rec["peak_rss_mb"] = round(rec["peak_rss_mb"], 1)
        rec["seconds"] = round(rec["seconds"], 1)
        out[label] = rec
        slide.unlink()
    out["features_mb_at_1024d_fp16"] = round(out["big"]["tiles"] * 1024 * 2 / 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=400, help="about this many tissue tiles for (a), (b), (e)")
    ap.add_argument("--encoder", default="resnet50_trunc")
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for minutes)")
    ap.add_argument("--big-tiles", type=int, default=60_000, help="tiles of the big slide in (c)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the read-side share")
    ap.add_argument("--qc-tiles", type=int, default=128, help="about this many tissue tiles for (f)")
    ap.add_argument("--skip", choices=["throughput", "read", "memory", "qc"], action="append", default=[])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="mmcli-bench-"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
                             "python": platform.python_version()}}
    try:
        if "throughput" not in args.skip:
            res["throughput"] = throughput(args, work)
            print(json.dumps(res["throughput"], indent=2), flush=True)
        if "read" not in args.skip:
            res["read_side"] = read_share(args, work)
            print(json.dumps(res["read_side"]["median"], indent=2), flush=True)
        if "qc" not in args.skip:
            res["f_before_encoding"] = qc_overhead(args, work)
            print(json.dumps({k: v for k, v in res["f_before_encoding"].items() if k != "rounds"}, indent=2),
                  flush=True)
        if "memory" not in args.skip:
            res["c_memory"] = memory(args, work)
            print(json.dumps(res["c_memory"], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    res["machine"]["torch"] = torch.__version__
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
