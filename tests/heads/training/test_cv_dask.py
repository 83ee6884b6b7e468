"""Stage 2 on dask (issue 23): folds as dask tasks give the same metrics.json numbers as in-process for the same
seed; a worker SIGKILLed at the start of a fold is restarted by its nanny and the fold reruns, with the same
numbers; ablate's fits as dask tasks give the same table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.dask_cluster import cluster
from helpers.planted_data import make_store
from mmcli.pipeline.store import pid_alive
from mmcli.stages.ablate import ablate
from mmcli.stages.fit import fit

pytestmark = pytest.mark.slow  # worker processes


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("cvdask")
    p = make_store(d / "s.zarr", n=24, task="binary", seed=3, dim=8, tiles=(6, 14), modalities=("wsi", "genes"))
    labels = d / "labels.csv"
    p.labels.reset_index().to_csv(labels, index=False)
    return p, labels


def _numbers(run: Path) -> dict:
    doc = json.loads((run / "metrics.json").read_text())
    return {k: {f: v.get(f) for f in ("mean", "per_fold", "ci_low", "ci_high", "ci_t_low", "ci_t_high")}
            for k, v in doc["metrics"].items()}


def _fit(p, labels, out: Path, **kw) -> dict:
    fit("attention_mil", p.store, labels, out, target="label", folds=3, seed=1, n_boot=50,
        params={"epochs": 3, "max_instances": 8}, **kw)
    return _numbers(out)


def test_local_cluster_folds_equal_in_process(planted, tmp_path):
    p, labels = planted
    here = _fit(p, labels, tmp_path / "here")
    on_dask = _fit(p, labels, tmp_path / "dask", scheduler="local", workers=2, memory_budget="256MB")
    assert on_dask == here
    att_here = (tmp_path / "here" / "attention.csv").read_text()
    assert (tmp_path / "dask" / "attention.csv").read_text() == att_here


def test_a_worker_killed_mid_fold_is_retried(planted, tmp_path):
    p, labels = planted
    here = _fit(p, labels, tmp_path / "here")
    token = tmp_path / "fault.fired"
    with cluster(tmp_path / "cluster", {"MMCLI_FAULT": "cv.fold:1", "MMCLI_FAULT_ONCE": str(token)}) as c:
        got = _fit(p, labels, tmp_path / "dask", scheduler=c.address)
        logs = c.log_text()
    assert token.is_file(), "no worker reached the fault point"
    dead = int(token.read_text())
    assert not pid_alive(dead) and f"Worker process {dead} was killed by signal 9" in logs, logs
    assert got == here


def test_ablate_cells_on_dask_equal_in_process(planted, tmp_path):
    p, labels = planted
    kw = dict(target="label", modalities=["wsi", "genes"], heads=("xgboost",), folds=3, seed=0, n_boot=50,
              params={"n_estimators": 10}, compare_best=False)
    here = ablate(p.store, labels, tmp_path / "here", **kw)
    there = ablate(p.store, labels, tmp_path / "dask", scheduler="local", workers=2, **kw)
    cols = ["subset", "head", "mean", "ci_low", "ci_high", "n_patients", "status"]
    assert here[cols].equals(there[cols]) and (here["status"] == "ok").all()
