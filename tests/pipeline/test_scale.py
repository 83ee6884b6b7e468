"""pipeline/scale.py: memory budgets and the local dask cluster's worker environment."""
from __future__ import annotations

import os

import pytest

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.scale import connect, parse_size


def _worker_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_workers_keep_dasks_thread_caps_but_not_its_malloc_trim(monkeypatch):
    """dask's 64 KiB MALLOC_TRIM_THRESHOLD_ slowed torch training in its workers (docs/fit-and-evaluate.md);
    a local cluster leaves it out and keeps the one-thread caps."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a value of the parent's would be inherited instead
    client, cluster = connect("local", 1)
    try:
        (env,) = client.run(_worker_env).values()
    finally:
        client.close()
        cluster.close()
    assert env == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}


def test_sizes_parse_in_binary_units_and_bad_ones_name_the_flag():
    assert parse_size("1GB") == 1 << 30 and parse_size("512MB") == 512 << 20 and parse_size(None) is None
    with pytest.raises(InputError, match="--memory-budget"):
        parse_size("lots")
