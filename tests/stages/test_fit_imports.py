"""A table fit imports only what it uses (issue 22): no torch for xgboost or cox, no plotting or decision-curve
library for a fit whose evidence does not draw."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mmcli.features.tabular import ingest_table

PROBE = r"""
import json, sys
from mmcli.stages.fit import fit
fit(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], target="y", folds=3, n_boot=20)
print(json.dumps(sorted(m for m in ("torch", "matplotlib", "dcurves", "lifelines", "statsmodels")
                        if m in sys.modules)))
"""


@pytest.mark.parametrize("head,imports_ok", [("xgboost", set()), ("cox", {"lifelines"})])
def test_table_fit_does_not_import_torch(tmp_path, head, imports_ok):
    rng = np.random.default_rng(0)
    n = 90
    ids = [f"P{i:03d}" for i in range(n)]
    x = rng.normal(size=(n, 5))
    pd.DataFrame(x, columns=[f"c{j}" for j in range(5)]).assign(patient_id=ids).to_csv(tmp_path / "t.csv",
                                                                                       index=False)
    ingest_table(tmp_path / "t.csv", "clinical", tmp_path / "s.zarr")
    labels = pd.DataFrame({"patient_id": ids, "y": (x[:, 0] + rng.normal(size=n) > 0).astype(int)})
    if head == "cox":
        labels = labels.assign(os_months=rng.exponential(20, n).round(1) + 0.1, os_event=labels["y"])
    labels.to_csv(tmp_path / "labels.csv", index=False)
    args = [head, str(tmp_path / "s.zarr"), str(tmp_path / "labels.csv"), str(tmp_path / "run")]
    probe = PROBE if head == "xgboost" else PROBE.replace('target="y"', 'time="os_months", event="os_event"')
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "torch" not in loaded
    assert loaded <= imports_ok, loaded
