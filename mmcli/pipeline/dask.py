"""dask for both stages: one way to get a client for ``--scheduler local | ADDRESS | FILE``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import InputError


def connect(scheduler: str, workers: int | None = None) -> tuple[Any, Any]:
    """(client, cluster or None) for ``scheduler``: ``"local"`` (a LocalCluster of ``workers`` processes), a
    scheduler address (``tcp://host:8786``) or the JSON file that ``dask scheduler --scheduler-file`` wrote."""
    from distributed import Client, LocalCluster

    if scheduler == "local":
        n = workers or os.cpu_count() or 1
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
