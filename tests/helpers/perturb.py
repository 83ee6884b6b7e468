"""Perturbation tests of in-fold fitting: hold the CV splits fixed, change only one fold's test patients
(features or labels), and compare what each fold fitted.

Splits are stratified by the labels, so changing a test patient's label would move patients between folds;
:func:`hold_splits` pins the outer splits of a cohort to the ones of its original labels (inner splits, made on a
fold's training patients, are left to the code under test).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def hold_splits(monkeypatch, patients: Sequence[str], splits: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """``cross_validate`` of exactly ``patients`` uses ``splits``; any other call of ``make_splits`` is as it was."""
    from mmcli.heads.training import cv

    original = cv.make_splits
    pinned = list(patients)

    def fixed(target, folds, seed):  # noqa: ANN001, ANN202
        return splits if list(target.patients) == pinned else original(target, folds, seed)

    monkeypatch.setattr(cv, "make_splits", fixed)


def states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Same keys and bit-identical arrays."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def preprocessor_state(head) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Every fitted preprocessing array of a head (imputer, ComBat, scaler, PCA), keyed ``<modality>/<array>``."""
    out = {}
    for name, prep in head.preprocessors_.items():
        meta, arrays = prep.state()
        out.update({f"{name}/{k}": np.asarray(v) for k, v in arrays.items()})
        out[f"{name}/meta"] = np.frombuffer(repr(sorted(meta.items())).encode(), dtype=np.uint8)
    return out
