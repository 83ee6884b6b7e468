"""Serving test helpers: a strong token, an audit key, a real uvicorn server in a thread configured as
``mmcli serve`` configures it, and the cheapest fitted run (xgboost on one table)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import uvicorn

from mmcli.stages.serve.audit import AuditKey
from mmcli.stages.serve.options import ServeOptions
from mmcli.stages.serve.server import bind, server_config

TOKEN = "Zq8vN3kR_x1LmP7tYb2WcH9dJf4Gs6Ae0UoIuVnKyTQ"  # as secrets.token_urlsafe(32) makes them
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY_BYTES = b"4f1c2b9e8d7a6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c"
KEY = AuditKey(KEY_BYTES)
TABLE_IDS = [f"T{i:02d}" for i in range(24)]


@contextmanager
def running(app, options: ServeOptions | None = None) -> Iterator[str]:
    """uvicorn serving ``app`` in a thread on a free loopback port, configured by :func:`server_config` (the
    limits and timeouts of ``mmcli serve``); stopped (and joined) on exit. Yields the base URL."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, options or ServeOptions(), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive()


def table_store(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A store with one 5-column table ``genes`` for :data:`TABLE_IDS`, and a binary labels CSV."""
    from mmcli.pipeline.store import open_store

    rng = np.random.default_rng(seed)
    y = np.arange(len(TABLE_IDS)) % 2
    x = rng.normal(size=(len(TABLE_IDS), 5))
    x[:, 0] += 1.5 * y
    store = folder / "t.zarr"
    open_store(store).write_table("genes", pd.DataFrame(x, index=pd.Index(TABLE_IDS, name="patient_id"),
                                                        columns=[f"g{j}" for j in range(5)]))
    labels = folder / "labels.csv"
    pd.DataFrame({"patient_id": TABLE_IDS, "y": np.where(y == 1, "pos", "neg")}).to_csv(labels, index=False)
    return store, labels


FIT_ARGS = ["--head", "xgboost", "--target", "y", "--folds", "2", "--n-boot", "2", "--seed", "0",
            "--param", "n_estimators=3", "--param", "max_depth=1"]


def table_run(folder: Path) -> tuple[Path, Path, Path]:
    """(run, store, labels): the cheapest fitted run, xgboost on :func:`table_store`."""
    from typer.testing import CliRunner

    from mmcli.cli import app

    store, labels = table_store(folder)
    run = folder / "run"
    res = CliRunner().invoke(app, ["fit", "--store", str(store), "--labels", str(labels), "--out", str(run),
                                   *FIT_ARGS])
    assert res.exit_code == 0, res.output
    return run, store, labels
