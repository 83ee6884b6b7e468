"""Scale-out plumbing both stages share: memory budgets (``--memory-budget SIZE`` parsed, and the default: a
share of the memory available now) and dask (one way to get a client for ``--scheduler local | ADDRESS | FILE``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import InputError

DEFAULT_SHARE = 0.5  # of the memory available at start: the rest is for the model, batches and other programs
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str | int | None, flag: str = "--memory-budget") -> int | None:
    """``"1GB"``, ``"512MiB"``, ``"2g"``, ``"1.5G"``, a byte count, or ``"auto"`` / None (-> None); binary
    units (1 GB = 2**30 bytes). InputError naming ``flag`` otherwise."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise InputError(f"{flag} {text}: must be above 0. Fix: e.g. {flag} 4GB.")
        return text
    t = str(text).strip().upper().replace(" ", "")
    if t in ("", "AUTO"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMGT]?I?B?)", t)
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"{flag} {text!r}: not a size. Fix: a number with a unit, e.g. {flag} 4GB or 512MB "
                         "(or auto).")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def available_bytes() -> int | None:
    """Memory available to new allocations now (Linux ``MemAvailable``; else physical pages free), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def resolve_budget(text: str | int | None) -> int | None:
    """The budget in bytes: the given size, else :data:`DEFAULT_SHARE` of the memory available now (None when
    that cannot be read: no limit)."""
    given = parse_size(text)
    if given is not None:
        return given
    free = available_bytes()
    return None if free is None else int(free * DEFAULT_SHARE)


def connect(scheduler: str, workers: int | None = None) -> tuple[Any, Any]:
    """(client, cluster or None) for ``scheduler``: ``"local"`` (a LocalCluster of ``workers`` processes), a
    scheduler address (``tcp://host:8786``) or the JSON file that ``dask scheduler --scheduler-file`` wrote."""
    from distributed import Client, LocalCluster

    if scheduler == "local":
        import dask

        n = workers or os.cpu_count() or 1
        # dask starts workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then hands memory back to the OS after
        # nearly every freed tensor, and a fit's torch training ran 1.3-1.8x slower in a worker than in this
        # process on the 2-core build machine (the same fit, one worker, nothing else running). dask's thread
        # caps (OMP_NUM_THREADS=1, ...) are kept.
        environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}).items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    as_file = scheduler.endswith(".json") or "://" not in scheduler and Path(scheduler).is_file()
    try:
        client = Client(scheduler_file=scheduler) if as_file else Client(scheduler)
    except (OSError, TimeoutError, ValueError) as e:
        raise InputError(f"--scheduler {scheduler}: cannot reach a dask scheduler ({type(e).__name__}: {e}). "
                         "Fix: start one (`dask scheduler`), check the address (tcp://HOST:PORT) or the "
                         "scheduler file, or use --scheduler local.") from e
    return client, None
