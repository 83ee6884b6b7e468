"""One contract for every registered head (scikit-learn's ``parametrize_with_checks`` in spirit): the test list
is the registry, so a new head is checked without editing this file.

For each head and each task it declares: fit on a small planted cohort of the kind it takes, predictions of the
right shape and range, ``save`` / ``load`` giving the same predictions, ``predict_explained`` agreeing with
``predict``, attention over each bag's instances for heads with bag inputs; parameters: every field described
(what `mmcli heads` and the docs show), a bad value an InputError naming ``--param KEY=``, an unknown key listing
the valid ones, the run's own keys refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmcli.heads import HEADS, head_class
from mmcli.heads.base import RUN_PARAMS
from mmcli.heads.data import Cohort, ModalityData, ModalitySpec
from mmcli.heads.targets import survival_target
from mmcli.pipeline.errors import InputError

FAST = {"epochs": 3, "n_estimators": 8, "hidden": 8, "attn_dim": 8, "n_components": 4, "max_instances": 16}
CASES = [(name, task) for name in HEADS.names() for task in head_class(name).tasks]


def _cohort(kind: str, n: int = 36, seed: int = 0) -> tuple[Cohort, np.ndarray]:
    """``n`` patients with a planted signal: a bag modality (bag heads), tables (vector heads), or both."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    rng.shuffle(y)
    pids = [f"P{i:03d}" for i in range(n)]
    mods: dict[str, ModalityData] = {}
    if kind in ("bag", "mixed"):
        bags = []
        for i in range(n):
            bag = rng.normal(size=(int(rng.integers(4, 12)), 6)).astype(np.float32)
            bag[: 2, :3] += 2.0 * y[i]
            bags.append(bag)
        mods["wsi"] = ModalityData(ModalitySpec("wsi", "bag", "store", "enc", 6), np.ones(n, bool), bags=bags,
                                   items=[[("s", len(b))] for b in bags])
    if kind in ("vector", "mixed"):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += 1.5 * y
        mods["genes"] = ModalityData(ModalitySpec("genes", "vector", "table", None, 8,
                                                  tuple(f"g{j}" for j in range(8))), np.ones(n, bool), vectors=x)
    return Cohort(pids, mods), y


def _head(name: str, task: str, y: np.ndarray):
    cls = head_class(name)
    fast = {k: v for k, v in FAST.items() if k in cls.Params.fields()}
    params = cls.user_params(fast).for_run(task=task, n_classes=2 if task == "classification" else 0, seed=0)
    if task == "survival":
        target = survival_target(1.0 + 10.0 * (1 - y) + np.arange(len(y)) % 5, (np.arange(len(y)) % 3 > 0))
    elif task == "regression":
        target = 50.0 + 20.0 * y + np.arange(len(y)) % 7  # a value in its own unit, higher in positives
    else:
        target = y
    return cls(params), target


@pytest.mark.parametrize(("name", "task"), CASES)
def test_fit_predict_save_load(name, task, tmp_path):
    cls = head_class(name)
    cohort, y = _cohort(cls.input_kind)
    head, target = _head(name, task, y)
    head.fit(cohort, target)
    pred = head.predict(cohort)
    if task == "survival":
        assert pred.shape == (len(y),) and np.isfinite(pred).all()
        assert np.corrcoef(pred, y)[0, 1] > 0  # positives die sooner here: higher risk
    elif task == "regression":
        assert pred.shape == (len(y),) and np.isfinite(pred).all()
        assert np.corrcoef(pred, y)[0, 1] > 0 and 40 < pred.mean() < 80  # learnt, in the target's unit
    else:
        assert pred.shape == (len(y), 2) and np.allclose(pred.sum(1), 1) and (pred >= 0).all()
        assert pred[y == 1, 1].mean() > pred[y == 0, 1].mean()  # the planted signal is learnt at all
    head.save(tmp_path / "m")
    again = head_class(name).load(tmp_path / "m")
    np.testing.assert_allclose(again.predict(cohort), pred, rtol=1e-5, atol=1e-6)
    json.dumps(head.get_params())  # config.json can hold every parameter
    both, attention = head.predict_explained(cohort)
    np.testing.assert_allclose(both, pred, rtol=1e-5, atol=1e-6)
    if attention:
        for mod, att in attention.items():
            bags = cohort.modalities[mod].bags
            for i, a in enumerate(att):
                assert a is not None and len(a) == bags.length(i) and np.isfinite(a).all()


@pytest.mark.parametrize("name", HEADS.names())
def test_parameters_are_described_and_errors_name_the_key(name):
    cls = head_class(name)
    for field in cls.Params.fields():
        assert cls.Params.model_fields[field].description, f"{name}: --param {field} has no description"
    numeric = [f for f in cls.Params.fields() if f not in RUN_PARAMS
               and cls.Params.model_fields[f].annotation in (int, float)]
    for field in numeric:
        with pytest.raises(InputError, match=rf"--param {field}=.*\(takes: "):
            cls.user_params({field: "not-a-number"})
    with pytest.raises(InputError, match=r"has no parameter\(s\) \['no_such_key'\]. Fix: use some of"):
        cls.user_params({"no_such_key": 1})
    with pytest.raises(InputError, match="set by the run"):
        cls.user_params({"task": "survival"})


@pytest.mark.parametrize("name", HEADS.names())
def test_absurd_sizes_are_refused(name):
    """Issue 25 item 7: a parameter that would run unbounded (1e11 trees, epochs, units) is refused up front."""
    cls = head_class(name)
    for field in ("n_estimators", "epochs", "hidden", "max_depth", "max_instances", "batch_size", "n_components"):
        if field in cls.Params.fields():
            with pytest.raises(InputError, match=rf"--param {field}="):
                cls.user_params({field: 10**11})
