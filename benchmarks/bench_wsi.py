"""WSI extraction benchmark (a script, not a test). Everything is measured in one run on one machine:

(a) ``mmcli extract`` tiles/s  ÷  the encoder alone on in-memory tiles at its best precision   (target >= 0.9)
(b) ``mmcli extract`` tiles/s  ÷  a naive pipeline: PNG patches to disk, reload, fp32          (target >= 3)
(c) cosine similarity of ``--precision auto`` features to fp32 features, same tiles           (target >= 0.99)
(d) peak RSS of ``mmcli extract`` on a >= 50k-tile slide, and on a slide ~10x smaller          (flat, < 2 GB)

(a)-(c) use the default encoder (``resnet50_trunc``, 224 px at 0.5 µm/px) on the same slide and the same tiles.
(d) runs each slide in a fresh subprocess with a tiny encoder (``timm:test_resnet``, 32 px tiles at 2 µm/px,
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


def naive(slide: Path, coords: np.ndarray, size: int, model, mean, std, batch: int, tmp: Path) -> float:
    """The way many scripts do it: every tile to a PNG file, reloaded, torchvision transforms, fp32."""
    import openslide
    import torch
    from torchvision import transforms

    t0 = time.perf_counter()
    s = openslide.OpenSlide(str(slide))
    files = []
    for k, (x, y) in enumerate(coords):
        p = tmp / f"tile_{k:06d}.png"
        s.read_region((int(x), int(y)), 0, (size, size)).convert("RGB").save(p)
        files.append(p)
    s.close()
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    with torch.inference_mode():
        for i in range(0, len(files), batch):
            x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files[i:i + batch]])
            model(x)
    return _rate(len(coords), time.perf_counter() - t0)


def throughput(args: argparse.Namespace, work: Path) -> dict:
    """(a)-(c). Machine load from other processes drifts, so the pipeline and the encoder alone are timed in
    alternating rounds and (a) is the median of the per-round ratios."""
    import torch

    from mmcli.features.encoders.registry import create_encoder
    from mmcli.features.readers import open_slide
    from mmcli.pipeline.store import open_store
    from mmcli.stages.extract import extract

    side = int(np.ceil((np.sqrt(args.tiles) + 2) * args.patch_size / TILE)) + 4  # tissue + 2 glass tiles a side
    t0 = time.perf_counter()
    slide = write_bench_slide(work / "bench.svs", side, side)
    warm = write_bench_slide(work / "warm.svs", 8, 8)
    build_s = time.perf_counter() - t0
    store = work / "auto.zarr"
    common = dict(encoder=args.encoder, patch_size=args.patch_size, mpp=0.5, batch_size=args.batch_size,
                  qc=True, progress=False)
    # a cohort run loads its encoder once: the first (warm-up) slide pays for that, as in real runs
    extract("wsi", _manifest(work, warm, "W"), store, **common)
    m = _manifest(work, slide)

    enc_auto = create_encoder(args.encoder, precision="auto")
    pipe_rates, auto_rates, ratios = [], [], []
    tiles = coords = feats_auto = None
    for r in range(args.rounds):
        t0 = time.perf_counter()
        summary = extract("wsi", m, store, force=r > 0, **common)
        pipe_s = time.perf_counter() - t0
        if tiles is None:
            item = open_store(store, "r").read_item("wsi", summary.encoder_id, "P1", slide.stem)
            coords, feats_auto = item.coords, item.features.astype(np.float32)
            with open_slide(slide) as rd:
                tiles = np.stack([rd.read_region(int(x), int(y), 0, args.patch_size, args.patch_size)
                                  for x, y in coords])
        n = len(coords)  # every method below encodes exactly these tiles
        pipe_rates.append(_rate(n, pipe_s))
        rate, _ = encoder_alone(enc_auto, tiles, args.batch_size)
        auto_rates.append(rate)
        ratios.append(pipe_rates[-1] / rate)
    fp32 = create_encoder(args.encoder, precision="fp32")
    fp32_rate, ref = encoder_alone(fp32, tiles, args.batch_size)
    best_is_fp32 = fp32_rate > max(auto_rates)
    if best_is_fp32:  # the encoder alone is faster in fp32 here: compare against that
        ratios = [p / fp32_rate for p in pipe_rates]

    png = work / "png"
    png.mkdir()
    naive_rate = naive(slide, coords, args.patch_size, fp32.module, fp32.mean, fp32.std, args.batch_size, png)
    shutil.rmtree(png)

    cos = (feats_auto * ref).sum(1) / (np.linalg.norm(feats_auto, axis=1) * np.linalg.norm(ref, axis=1))
    pipe = float(np.median(pipe_rates))
    return {
        "slide": {"level0_px": [side * TILE] * 2, "build_s": round(build_s, 1)},
        "tiles": n, "encoder": args.encoder, "patch_size": args.patch_size, "mpp": 0.5, "rounds": args.rounds,
        "auto_precision": enc_auto.runtime()["precision"], "torch_threads": torch.get_num_threads(),
        "tiles_per_s": {"mmcli_extract": [round(x, 2) for x in pipe_rates],
                        "encoder_alone_auto": [round(x, 2) for x in auto_rates],
                        "encoder_alone_fp32": round(fp32_rate, 2), "naive_png_fp32": round(naive_rate, 2)},
        "a_pipeline_over_encoder_best": round(float(np.median(ratios)), 3),
        "a_per_round": [round(x, 3) for x in ratios],
        "b_pipeline_over_naive": round(pipe / naive_rate, 2),
        "c_cosine_auto_vs_fp32": {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5)},
    }


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
    ap.add_argument("--tiles", type=int, default=256, help="about this many tiles for (a)-(c)")
    ap.add_argument("--encoder", default="resnet50_trunc")
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating pipeline / encoder-alone rounds for (a)")
    ap.add_argument("--big-tiles", type=int, default=50_000, help="tiles of the big slide in (d)")
    ap.add_argument("--skip", choices=["throughput", "memory"], action="append", default=[])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="mmcli-bench-"))
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()}}
    try:
        if "throughput" not in args.skip:
            res["throughput"] = throughput(args, work)
            print(json.dumps(res["throughput"], indent=2), flush=True)
        if "memory" not in args.skip:
            res["memory"] = memory(args, work)
            print(json.dumps(res["memory"], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    res["machine"]["torch"] = torch.__version__
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
