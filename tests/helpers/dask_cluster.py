"""A real dask cluster for tests: ``dask scheduler`` and single-threaded ``dask worker`` processes (with nannies)
on loopback, started by :func:`cluster` and killed (whole process groups) on exit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers.wsi_runs import THREADS, child_env

DASK = str(Path(sys.executable).with_name("dask"))
# A nanny overrides OMP_NUM_THREADS (and MKL/OpenBLAS) with its own config before it starts the worker process;
# the whole dict set through the environment keeps the upper-case names (per-key variables would be lower-cased).
NANNY_ENV = repr({k: str(THREADS) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})


@dataclass
class Cluster:
    address: str
    scheduler_file: Path
    logs: list[Path]

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so its process group can be killed) in the log's folder."""
    with open(log, "w") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent,
                                start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (a nanny and its worker process), then reap it."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def cluster(folder: Path, worker_env: dict[str, str], n_workers: int = 2, limit_s: float = 180) -> Iterator[Cluster]:
    """A scheduler and ``n_workers`` single-threaded workers on 127.0.0.1; everything is killed on exit."""
    from distributed import Client

    folder.mkdir(parents=True, exist_ok=True)
    sched_file = folder / "scheduler.json"
    env = child_env(DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=NANNY_ENV)
    procs: list[subprocess.Popen] = []
    logs = [folder / "scheduler.log"]
    try:
        procs.append(_spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file",
                             str(sched_file), "--no-dashboard"], env, logs[0]))
        deadline = time.monotonic() + limit_s
        while not sched_file.exists():
            assert procs[0].poll() is None, logs[0].read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.2)
        for i in range(n_workers):
            logs.append(folder / f"worker{i}.log")
            procs.append(_spawn([DASK, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                                 "--nworkers", "1", "--no-dashboard", "--name", f"w{i}",
                                 "--local-directory", str(folder / f"w{i}")], {**env, **worker_env}, logs[-1]))
        with Client(scheduler_file=str(sched_file), timeout="60s") as client:
            client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
            threads = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
            address = client.scheduler.address
        assert set(threads.values()) == {str(THREADS)}, threads
        yield Cluster(address, sched_file, logs)
    finally:
        for p in reversed(procs):
            _stop(p)
