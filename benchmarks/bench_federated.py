"""Federated vs centralised: ``mmcli federate`` on 2 and 3 planted synthetic sites, classification or survival.

Sites come from tests/helpers/federated.py, 300/250/200 patients with feature offsets 0 / +0.5 / -0.5 (a scanner /
batch effect that per-site standardisation removes):

- ``--task classification`` (``site_store``): balanced classes ``pos`` / ``neg``; ``pos`` adds ``--shift`` to the
  signal features (default 0.3: a weak signal). Metric: AUROC.
- ``--task survival`` (``survival_site_store``): latent z shifts the signal features by ``--shift`` * z (default
  0.6) and sets the hazard exp(``--beta`` z). Metric: Harrell's c-index.

FedAvg, ``fusion_mlp``, ``--rounds`` x ``--local-epochs``; prints and optionally writes (``--out``) the pooled and
per-site metric [95% bootstrap CI], federated and centralised (trained on the pooled training patients for
rounds x local-epochs epochs). Needs the extra: pip install -e ".[federated]".

    python benchmarks/bench_federated.py --task classification --out fed_clf.json
    python benchmarks/bench_federated.py --task survival --out fed_surv.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's site generators
from helpers.federated import site_store, survival_site_store  # noqa: E402
from mmcli.stages.federate import federate  # noqa: E402

SITES = (("a", 300, 1, 0.0), ("b", 250, 2, 0.5), ("c", 200, 3, -0.5))
DEFAULT_SHIFT = {"classification": 0.3, "survival": 0.6}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("classification", "survival"), default="survival")
    ap.add_argument("--beta", type=float, default=0.7, help="survival: log hazard ratio per SD of the latent z")
    ap.add_argument("--shift", type=float, default=None,
                    help="signal strength in the features (default: 0.3 classification, 0.6 survival)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--engine", default="local")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="the split and training seed of federate")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    a = ap.parse_args(argv)
    shift = DEFAULT_SHIFT[a.task] if a.shift is None else a.shift
    survival = a.task == "survival"
    metric = "c_index" if survival else "auroc"
    rows: dict = {"task": a.task, "shift": shift, "beta": a.beta if survival else None, "rounds": a.rounds,
                  "local_epochs": a.local_epochs, "engine": a.engine, "seed": a.seed}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if survival:
            frames = [survival_site_store(d / f"site_{s}.zarr", s, n, seed, off, beta=a.beta, shift=shift)
                      for s, n, seed, off in SITES]
            task_kw = {"time": "os_months", "event": "os_event"}
        else:
            frames = [site_store(d / f"site_{s}.zarr", s, n, seed, off, shift=shift) for s, n, seed, off in SITES]
            task_kw = {"target": "label"}
        pd.concat(frames).to_csv(d / "labels.csv", index=False)
        for k, strategy in ((2, "fedavg"), (3, "fedavg")):
            doc = federate("fusion_mlp", [d / f"site_{s}.zarr" for s, *_ in SITES[:k]], d / "labels.csv",
                           d / f"out{k}", **task_kw, rounds=a.rounds, local_epochs=a.local_epochs,
                           strategy=strategy, engine=a.engine, n_boot=a.n_boot, seed=a.seed,
                           params={"batch_size": 32, "lr": 5e-3})
            rows[f"{k}_sites"] = {"comparison": doc["comparison"], "seconds": doc["seconds"],
                                  "flower_version": doc["flower_version"],
                                  "sites": {n: {m: s[m][metric] for m in ("federated", "centralised")}
                                            | {"n_test": s["n_test"]} for n, s in doc["sites"].items()},
                                  "n_test": doc["pooled"]["n_test"]}
            c = doc["comparison"]
            label = "c-index" if survival else "AUROC"
            print(f"{k} sites: pooled {label} federated {_fmt(c['federated'])} [{_fmt(c['federated_ci'][0])}, "
                  f"{_fmt(c['federated_ci'][1])}] centralised {_fmt(c['centralised'])} "
                  f"[{_fmt(c['centralised_ci'][0])}, {_fmt(c['centralised_ci'][1])}] ({doc['seconds']} s)",
                  flush=True)
            for n, s in rows[f"{k}_sites"]["sites"].items():
                print(f"    site {n} (test {s['n_test']}): federated {_fmt(s['federated']['mean'])} "
                      f"centralised {_fmt(s['centralised']['mean'])}", flush=True)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
