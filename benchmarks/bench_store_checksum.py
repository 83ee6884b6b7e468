"""What the per-array checksums of the feature store cost (issue 25, item 2), as ratios measured in one run.

For ``--items`` WSI-like items of ``--rows`` x ``--dim`` float16 features (plus int64 coords) on each backend:

* ``checksum / write``: the time to compute both arrays' CRC-32C over the time of ``write_item`` (which includes
  it);
* ``checksum / read``: the CRC-32C time over the time of ``read_item`` (which includes it);
* ``resume check / metadata check``: ``is_cached(check_data=True)`` (the runner's resume check: the item read
  whole and checked) over the metadata-only ``is_cached``.

Not shown: the cost against extracting an item (an encoder pass over ``rows`` tiles takes minutes on a CPU, so the
resume check is small against the extraction it saves), nor a cold page cache (the files were just written).

    python benchmarks/bench_store_checksum.py --items 8 --rows 10000 --dim 1024
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from mmcli.pipeline.store import open_store
from mmcli.pipeline.store.checksum import array_checksum


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _timings(s, arrays: list, repeat: int) -> dict[str, float]:
    """Seconds (best of ``repeat``, summed over the items) to write, read and cache-check every item in ``s``."""
    keys = [("wsi", "e", f"P{i}", "a") for i in range(len(arrays))]
    return {
        "write": sum(_best(lambda k=k, f=f, c=c: s.write_item(*k, f, c), repeat) for k, (f, c) in zip(keys, arrays)),
        "read": sum(_best(lambda k=k: s.read_item(*k), repeat) for k in keys),
        "metadata_check": sum(_best(lambda k=k: s.is_cached(*k), repeat) for k in keys),
        "resume_check": sum(_best(lambda k=k: s.is_cached(*k, check_data=True), repeat) for k in keys),
    }


def run(items: int, rows: int, dim: int, repeat: int, folder: Path) -> dict:
    rng = np.random.default_rng(0)
    arrays = [(rng.normal(size=(rows, dim)).astype(np.float16), rng.integers(0, 10**6, size=(rows, 2)))
              for _ in range(items)]
    out: dict = {"items": items, "rows": rows, "dim": dim, "mb_per_item": arrays[0][0].nbytes / 1e6,
                 "cpu": platform.processor() or platform.machine()}
    crc = sum(_best(lambda f=f, c=c: (array_checksum(f), array_checksum(c)), repeat) for f, c in arrays)
    for name in ("s.zarr", "s.h5"):
        store = open_store(folder / name)
        seconds = {"checksum": crc, **_timings(store, arrays, repeat)}
        out[store.backend] = {"seconds": seconds, "checksum_over_write": crc / seconds["write"],
                              "checksum_over_read": crc / seconds["read"],
                              "resume_check_over_metadata_check": seconds["resume_check"] / seconds["metadata_check"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per measurement")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(args.items, args.rows, args.dim, args.repeat, Path(d)), indent=2))


if __name__ == "__main__":
    main()
