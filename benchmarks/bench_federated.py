"""Federated survival vs centralised: ``mmcli federate --time --event`` on 2 and 3 planted synthetic sites.

Sites come from tests/helpers/federated.py (``survival_site_store``: latent z shifts the signal features and sets
the hazard exp(beta z); each site has a feature offset). Prints and optionally writes the pooled and per-site
c-index [95% bootstrap CI], federated and centralised. Needs the extra: pip install -e ".[federated]".

    python benchmarks/bench_federated_survival.py --rounds 10 --local-epochs 2 --out fed_surv.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's site generator
from helpers.federated import survival_site_store  # noqa: E402
from mmcli.stages.federate import federate  # noqa: E402

SITES = (("a", 300, 1, 0.0), ("b", 250, 2, 0.5), ("c", 200, 3, -0.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beta", type=float, default=0.7, help="log hazard ratio per SD of the latent z")
    ap.add_argument("--shift", type=float, default=0.6, help="signal strength in the features")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--engine", default="local")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    a = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        frames = [survival_site_store(d / f"site_{s}.zarr", s, n, seed, off, beta=a.beta, shift=a.shift)
                  for s, n, seed, off in SITES]
        pd.concat(frames).to_csv(d / "labels.csv", index=False)
        for k, strategy in ((2, "fedavg"), (3, "fedavg")):
            doc = federate("fusion_mlp", [d / f"site_{s}.zarr" for s, *_ in SITES[:k]], d / "labels.csv",
                           d / f"out{k}", time="os_months", event="os_event", rounds=a.rounds,
                           local_epochs=a.local_epochs, strategy=strategy, engine=a.engine, n_boot=a.n_boot,
                           params={"batch_size": 32, "lr": 5e-3})
            rows[f"{k}_sites"] = {"comparison": doc["comparison"], "seconds": doc["seconds"],
                                  "sites": {n: {m: s[m]["c_index"] for m in ("federated", "centralised")}
                                            | {"n_test": s["n_test"]} for n, s in doc["sites"].items()},
                                  "n_test": doc["pooled"]["n_test"]}
            c = doc["comparison"]
            print(f"{k} sites: pooled c-index federated {c['federated']:.3f} [{c['federated_ci'][0]:.3f}, "
                  f"{c['federated_ci'][1]:.3f}] centralised {c['centralised']:.3f} [{c['centralised_ci'][0]:.3f}, "
                  f"{c['centralised_ci'][1]:.3f}] ({doc['seconds']} s)", flush=True)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
