"""mpp-aware tiling and the streaming tile reader.

Tiles are ``patch_size`` pixels at ``target_mpp`` µm/px. Each covers ``patch_size_level0`` level-0 pixels;
it is read from the lowest-resolution pyramid level that is still at least as fine as the target and
resized to ``patch_size``. Coordinates are always level-0 pixels (x, y) of the tile's top-left, as CLAM
and TRIDENT store them.

:func:`iter_tile_batches` reads and decodes tiles in a thread pool ahead of the consumer (the encoder),
keeping a bounded number of batches in flight, so memory does not grow with slide size.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one slide are and how to read them."""

    coords: np.ndarray  # (N, 2) int64, level-0 (x, y) of each tile's top-left
    tissue: np.ndarray  # (N,) float32, tissue fraction of each tile
    level: int  # pyramid level read from
    level_downsample: float
    read_size: int  # pixels read at ``level`` (square)
    patch_size: int  # pixels given to the encoder (square)
    patch_size_level0: int
    target_mpp: float
    slide_mpp: float
    min_tissue: float

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def upsampled(self) -> bool:
        """True when the target is finer than the scan (tiles are interpolated up)."""
        return self.read_size < self.patch_size

    def attrs(self) -> dict[str, Any]:
        """Tile parameters as stored with each item (TRIDENT-like names where they exist)."""
        return {
            "mpp": self.target_mpp,
            "patch_size": self.patch_size,
            "patch_size_level0": self.patch_size_level0,
            "level": self.level,
            "level_downsample": round(self.level_downsample, 6),
            "read_size": self.read_size,
            "slide_mpp": self.slide_mpp,
            "min_tissue": self.min_tissue,
            "target_magnification": round(10.0 / self.target_mpp, 3),
            "level0_magnification": round(10.0 / self.slide_mpp, 3),
        }


def choose_level(level_downsamples: tuple[float, ...] | list[float], downsample: float) -> int:
    """Lowest-resolution level whose downsample does not exceed ``downsample`` (0 when upsampling): never
    upsample from a coarser level. The one rule for tile reads, reader thumbnails and the report's tiles."""
    best = 0
    for i, d in enumerate(level_downsamples):
        if d <= downsample * (1 + 1e-3):
            best = i
    return best


def grid(level0_size: tuple[int, int], tile_level0: int) -> np.ndarray:
    """Top-left level-0 corners of a non-overlapping grid of whole tiles, row-major, (N, 2) int64."""
    w, h = level0_size
    xs = np.arange(0, w - tile_level0 + 1, tile_level0, dtype=np.int64)
    ys = np.arange(0, h - tile_level0 + 1, tile_level0, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, scale: tuple[float, float], coords: np.ndarray, tile_level0: int) -> np.ndarray:
    """Fraction of mask pixels inside each tile (summed-area table; tile edges rounded to mask pixels)."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int32)  # masks are at most 8192 x 8192: counts fit in int32
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=sat[1:, 1:])
    sx, sy = scale
    x0 = np.clip(np.round(coords[:, 0] / sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.round(coords[:, 1] / sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + tile_level0) / sx).astype(np.int64), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + tile_level0) / sy).astype(np.int64), y0 + 1), 1, h)
    s = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (s / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def plan_tiles(
    level_dimensions: tuple[tuple[int, int], ...],
    level_downsamples: tuple[float, ...],
    slide_mpp: float,
    target_mpp: float = 0.5,
    patch_size: int = 224,
    mask: np.ndarray | None = None,
    mask_scale: tuple[float, float] = (1.0, 1.0),
    min_tissue: float = 0.25,
) -> TilePlan:
    """Plan the tiles of one slide: level, read size and the grid tiles whose tissue fraction is at least
    ``min_tissue`` and above zero (every grid tile when ``mask`` is None)."""
    if target_mpp <= 0 or patch_size <= 0 or slide_mpp <= 0:
        raise ValueError(f"mpp and patch size must be positive (mpp={target_mpp}, slide mpp={slide_mpp}, "
                         f"patch size={patch_size})")
    ds = target_mpp / slide_mpp
    tile0 = max(1, round(patch_size * ds))
    level = choose_level(level_downsamples, ds)
    lds = float(level_downsamples[level])
    read = max(1, round(tile0 / lds))
    coords = grid(level_dimensions[0], tile0)
    if mask is None:
        frac = np.ones(len(coords), np.float32)
    else:
        frac = tissue_fractions(mask, mask_scale, coords, tile0)
    keep = (frac >= min_tissue) & (frac > 0)  # with a mask, a tile without any tissue is never kept
    return TilePlan(coords[keep], frac[keep], level, lds, read, patch_size, tile0, float(target_mpp),
                    float(slide_mpp), float(min_tissue))


# ---- streaming reads ------------------------------------------------------------------------------------
def default_read_threads() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _resize(tile: np.ndarray, size: int) -> np.ndarray:
    if tile.shape[0] == size and tile.shape[1] == size:
        return tile
    # PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.BILINEAR))


def _resize_torch(batch: Any, size: int) -> Any:
    """(B, h, w, 3) uint8 tensor (e.g. on the GPU, from cuCIM) to (B, size, size, 3) uint8."""
    import torch
    import torch.nn.functional as F

    if batch.shape[1] == size and batch.shape[2] == size:
        return batch
    x = batch.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def iter_tile_batches(
    opener: Callable[[], Any],
    plan: TilePlan,
    batch_size: int = 64,
    threads: int | None = None,
    pin_memory: bool = False,
    max_bytes: int = 512 << 20,
    stats: dict[str, float] | None = None,
    transform: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, batch)`` in tile order; ``batch`` is uint8 ``(b, P, P, 3)`` (numpy, or a pinned
    ``torch`` tensor with ``pin_memory``, or a CUDA tensor from a GPU-decoding reader).

    ``transform``, when given, runs in the reader thread on the numpy batch (GPU tiles are copied to the host
    first) and what it returns is yielded instead (no pinning: the caller does that); artefact QC and stain
    normalisation run there, beside the encoder.

    ``threads`` reader threads (each with its own slide handle from ``opener``) decode whole batches ahead
    of the consumer; at most ``max_bytes`` of decoded batches (and at least two) are in flight.
    ``stats``, when given, accumulates ``read_cpu_s`` (CPU time of the reader threads: reading, decoding,
    resizing) and ``read_wall_s`` (their wall time, summed over threads).
    """
    n, p = plan.n, plan.patch_size
    if n == 0:
        return
    threads = threads or default_read_threads()
    batch_bytes = batch_size * p * p * 3
    in_flight = max(2, min(2 * threads, max_bytes // max(1, batch_bytes)))
    local = threading.local()
    opened: list[Any] = []
    lock = threading.Lock()

    def reader() -> Any:
        r = getattr(local, "reader", None)
        if r is None:
            r = local.reader = opener()
            with lock:
                opened.append(r)
        return r

    def read_batch(start: int) -> tuple[int, Any]:
        if stats is None:
            return _read_batch(start)
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return _read_batch(start)
        finally:
            with lock:
                stats["read_cpu_s"] = stats.get("read_cpu_s", 0.0) + time.thread_time() - c0
                stats["read_wall_s"] = stats.get("read_wall_s", 0.0) + time.perf_counter() - w0

    def _read_batch(start: int) -> tuple[int, Any]:
        coords = plan.coords[start:start + batch_size]
        tiles = reader().read_regions(coords, plan.level, plan.read_size, plan.read_size)
        first = next(tiles)
        if not isinstance(first, np.ndarray):  # GPU tiles (cuCIM + CUDA): stack and resize on the device
            import torch

            gpu = _resize_torch(torch.stack([first, *tiles]), p)
            return start, gpu if transform is None else transform(gpu.cpu().numpy())
        out = np.empty((len(coords), p, p, 3), np.uint8)
        out[0] = _resize(first, p)
        for i, tile in enumerate(tiles, start=1):
            out[i] = _resize(tile, p)
        if transform is not None:
            return start, transform(out)
        if pin_memory:
            import torch

            return start, torch.from_numpy(out).pin_memory()
        return start, out

    starts = iter(range(0, n, batch_size))
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mmcli-tiles")
    window: deque[Future] = deque()
    try:
        for s in starts:
            window.append(pool.submit(read_batch, s))
            if len(window) >= in_flight:
                break
        while window:
            done = window.popleft().result()
            nxt = next(starts, None)
            if nxt is not None:
                window.append(pool.submit(read_batch, nxt))
            yield done
    finally:
        for f in window:
            f.cancel()
        pool.shutdown(wait=True)
        for r in opened:
            try:
                r.close()
            except Exception:  # noqa: BLE001,S110 - closing a handle must not mask the real error
                pass
