"""Benchmark: a bounded load test of ``mmcli serve`` on loopback (CPU).

Fits a small ``fusion_mlp`` run on a planted store (a ``wsi`` bag of ``--tiles`` x ``--dim`` features, an ``mri``
vector, a 12-column ``genes`` table; or uses ``--run``/``--store``), starts the real ``mmcli serve`` command
in a subprocess on a free port of 127.0.0.1, then sends ``--requests`` POST /predict requests from
``--concurrency`` concurrent httpx clients (asyncio) and prints:

* client-side latency p50 / p90 / p99 / max (ms) and requests/s over the whole run;
* the server's own latency (arrival to audit line, from the audit log) p50 / p99;
* errors (any status other than 200), and that ``audit verify`` holds for every answered request.

Each request scores one patient sent as features (``--mode payload``: the bag, vector and table in the body)
or by id from the server's store (``--mode store``). The load is bounded: ``--requests`` in total, a 30 s
timeout per request and ``--max-seconds`` for the whole run; the server is stopped (SIGTERM) at the end.
Not a test: figures depend on the machine and its load.

    python benchmarks/bench_serve.py --requests 2000 --concurrency 8

``--by-id-scaling 60,2000`` instead measures, in-process and without HTTP, what one by-id request costs to read
its patient as the store grows: the served read (the patient's own group) against the read before issue 25
(``load_cohort`` over the store, which lists every item of the modality), for a known and an unknown id, on
stores of each size (one 8 x 16 ``wsi`` item per patient and a 5-column table; an xgboost run fit on 60 of
them). Both reads alternate in every round, so the ratio is measured under the same load.

    python benchmarks/bench_serve.py --by-id-scaling 60,2000 --rounds 30
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def build_run(work: Path, patients: int, tiles: int, dim: int, seed: int) -> tuple[Path, Path]:
    """A planted store and a fusion_mlp run fitted on it (a few epochs: the model's quality is not measured)."""
    from mmcli.pipeline.store import open_store
    from mmcli.stages.fit import fit

    rng = np.random.default_rng(seed)
    store = work / "bench.zarr"
    fs = open_store(store, "a")
    ids = [f"S{i:04d}" for i in range(patients)]
    y = np.arange(patients) % 2
    coords = np.stack([np.arange(tiles) * 224, np.zeros(tiles)], 1).astype(np.int64)
    genes = rng.normal(size=(patients, 12))
    for i, pid in enumerate(ids):
        f = rng.normal(size=(tiles, dim)).astype(np.float32)
        f[: max(1, tiles // 10), :4] += 2.0 * y[i]
        fs.write_item("wsi", "bench-wsi", pid, "slide0", f.astype(np.float16), coords)
        fs.write_item("mri", "bench-mri", pid, "T1", (rng.normal(size=(1, 8)) + y[i]).astype(np.float32))
        genes[i, :2] += y[i]
    fs.write_table("genes", pd.DataFrame(genes, index=pd.Index(ids, name="patient_id"),
                                         columns=[f"g{j}" for j in range(12)]))
    labels = pd.DataFrame({"patient_id": ids, "label": np.where(y == 1, "pos", "neg")})
    fit("fusion_mlp", store, labels, work / "run", target="label", folds=2, n_boot=5, seed=seed,
        params={"epochs": 3})
    return work / "run", store


def payloads(store: Path, n: int) -> list[tuple[dict, str]]:
    """(request body as features, the patient id) for the first ``n`` patients of the store."""
    from mmcli.heads.data import load_cohort, resolve_sources
    from mmcli.pipeline.store import open_store

    fs = open_store(store, "r")
    cohort = load_cohort(fs, resolve_sources(fs))
    out = []
    for i, pid in enumerate(cohort.patients[:n]):
        feats = {}
        for name, m in cohort.modalities.items():
            if not m.present[i]:
                continue
            if m.spec.kind == "bag":
                feats[name] = {"features": np.asarray(m.bags[i], dtype=np.float32).tolist()}
            else:
                feats[name] = {"features": [None if np.isnan(v) else float(v) for v in m.vectors[i]]}
        out.append(({"features": feats, "top_k": 5}, pid))
    return out


def start_server(run: Path, store: Path, work: Path) -> tuple[subprocess.Popen, str, str, Path]:
    token = secrets.token_urlsafe(32)
    token_file = work / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    audit = work / "audit" / "audit.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mmcli.cli", "serve", "--model", str(run), "--store", str(store),
                             "--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file),
                             "--audit-log", str(audit), "--audit-key", str(work / "keys" / "audit.key"),
                             "--max-concurrency", "1000"],  # the load test's own connections are not the limit
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    line = ""
    while "serving" not in line:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"mmcli serve did not start: {proc.stderr.read()}")
        line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert match is not None, line
    return proc, match.group(0), token, audit


async def load(url: str, token: str, bodies: list[dict], n: int, concurrency: int, max_seconds: float
               ) -> tuple[list[float], list[int], float]:
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    counter = iter(range(n))
    deadline = time.monotonic() + max_seconds
    headers = {"Authorization": f"Bearer {token}"}

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            t = time.perf_counter()
            try:
                r = await client.post("/predict", json=bodies[i % len(bodies)], headers=headers)
                statuses.append(r.status_code)
            except httpx.HTTPError:
                statuses.append(-1)
            latencies.append((time.perf_counter() - t) * 1000.0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        for _ in range(3):  # warm-up (not counted)
            await client.post("/predict", json=bodies[0], headers=headers)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, statuses, wall


def _reads(served: Any, pid: str) -> list[tuple[str, Any]]:
    """The four timed reads of one round: served and listing, for ``pid`` and for an unknown id."""
    from mmcli.heads.data import load_cohort

    def listing(p: str) -> Any:  # what from_store did before issue 25
        return served.head.align(load_cohort(served.store, served.sources, [p], n_threads=1))

    return [("served", lambda: served.from_store(pid)), ("listing", lambda: listing(pid)),
            ("served_unknown", lambda: served.from_store("NOPE")), ("listing_unknown", lambda: listing("NOPE"))]


def by_id_scaling(work: Path, sizes: list[int], rounds: int, seed: int) -> dict:
    """Median ms per by-id read (served vs the earlier whole-store listing) for stores of ``sizes`` patients."""
    from mmcli.pipeline.store import open_store
    from mmcli.stages.fit import fit
    from mmcli.stages.serve.service import NotFound, ServedModel

    rng = np.random.default_rng(seed)
    biggest = max(sizes)
    ids = [f"S{i:05d}" for i in range(biggest)]
    feats = rng.normal(size=(biggest, 8, 16)).astype(np.float32)
    coords = np.stack([np.arange(8) * 224, np.zeros(8)], 1).astype(np.int64)
    genes = pd.DataFrame(rng.normal(size=(biggest, 5)), index=pd.Index(ids, name="patient_id"),
                         columns=[f"g{j}" for j in range(5)])
    stores = {}
    for n in sizes:
        fs = open_store(work / f"s{n}.zarr", "a")
        for i in range(n):
            fs.write_item("wsi", "bench-wsi", ids[i], "slide0", feats[i], coords)
        fs.write_table("genes", genes.iloc[:n])
        stores[n] = work / f"s{n}.zarr"
    small = min(sizes)
    labels = pd.DataFrame({"patient_id": ids[:small], "label": ["neg", "pos"] * (small // 2) + ["neg"] * (small % 2)})
    fit("xgboost", stores[small], labels, work / "run", target="label", folds=2, n_boot=2, seed=seed,
        params={"n_estimators": 3, "max_depth": 1})
    out: dict = {}
    for n in sizes:
        served = ServedModel(work / "run", stores[n])
        pids = [ids[int(j)] for j in rng.integers(0, n, size=rounds)]
        times: dict[str, list[float]] = {"served": [], "listing": [], "served_unknown": [], "listing_unknown": []}
        for pid in pids:
            for name, read in _reads(served, pid):
                t = time.perf_counter()
                try:
                    read()
                except NotFound:
                    pass
                times[name].append((time.perf_counter() - t) * 1000.0)
        med = {k: round(float(np.median(v)), 2) for k, v in times.items()}
        out[str(n)] = {**{f"{k}_ms": v for k, v in med.items()},
                       "ratio_listing_over_served": round(med["listing"] / med["served"], 1),
                       "ratio_unknown": round(med["listing_unknown"] / med["served_unknown"], 1)}
        print(f"{n} patients: served {med['served']} ms vs listing {med['listing']} ms "
              f"({out[str(n)]['ratio_listing_over_served']}x); unknown id {med['served_unknown']} ms vs "
              f"{med['listing_unknown']} ms", file=sys.stderr)
    return {"by_id_scaling": out, "rounds": rounds, "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--mode", choices=("payload", "store"), default="payload")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--tiles", type=int, default=200, help="instances per bag sent with each request")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", type=Path, help="an existing run folder (with --store) instead of the planted one")
    ap.add_argument("--store", type=Path)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--by-id-scaling", help="comma list of store sizes (patients): measure the by-id read instead")
    ap.add_argument("--rounds", type=int, default=30, help="requests per size for --by-id-scaling")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mmcli.stages.serve.audit import AuditKey, log_files
    from mmcli.stages.serve.verify import verify_log

    if args.by_id_scaling:
        with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
            res = by_id_scaling(Path(tmp), [int(x) for x in args.by_id_scaling.split(",")], args.rounds, args.seed)
        print(json.dumps(res, indent=2))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return res

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        if args.run is not None:
            if args.store is None:
                raise SystemExit("--run needs --store")
            run, store = args.run, args.store
        else:
            run, store = build_run(work, args.patients, args.tiles, args.dim, args.seed)
        prepared = payloads(store, 16)
        bodies = [b for b, _ in prepared] if args.mode == "payload" else [{"patient_id": p, "top_k": 5}
                                                                          for _, p in prepared]
        body_kb = np.mean([len(json.dumps(b)) for b in bodies]) / 1024
        print(f"setup {time.perf_counter() - t:.1f}s; mean body {body_kb:.0f} KB", file=sys.stderr)
        proc, url, token, audit = start_server(run, store, work)
        try:
            lat, status, wall = asyncio.run(load(url, token, bodies, args.requests, args.concurrency,
                                                 args.max_seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        entries = [json.loads(x) for f in log_files(audit) for x in f.read_text().splitlines()]
        verified = verify_log(audit, AuditKey.load(work / "keys" / "audit.key")[0]).lines
    a = np.asarray(lat)
    server = np.asarray([e["latency_ms"] for e in entries[3:]])  # without the warm-up requests
    ok = sum(s == 200 for s in status)
    res = {
        "mode": args.mode, "requests": len(a), "concurrency": args.concurrency, "ok": ok, "errors": len(a) - ok,
        "tiles": args.tiles, "dim": args.dim, "mean_body_kb": round(float(body_kb), 1),
        "wall_s": round(wall, 2), "requests_per_s": round(len(a) / wall, 1),
        "latency_ms": {q: round(float(np.percentile(a, p)), 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(float(a.max()), 1)},
        "server_latency_ms": {"p50": round(float(np.percentile(server, 50)), 1),
                              "p99": round(float(np.percentile(server, 99)), 1)},
        "audit_lines": len(entries), "audit_verified_lines": verified, "cpus": os.cpu_count(),
    }
    print(json.dumps(res, indent=2))
    print(f"{res['requests']} requests x {args.concurrency} concurrent: p50 {res['latency_ms']['p50']} ms, "
          f"p99 {res['latency_ms']['p99']} ms, {res['requests_per_s']} requests/s, {res['errors']} errors")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
