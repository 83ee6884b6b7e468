"""What the store's interface speaks in: keys, items, problems, item states, constants and the checks shared by
both backends."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.ids import check_id
from mmcli.pipeline.io import json_default

SCHEMA_VERSION = 1
TABULAR = "tabular"
STAGING = ".staging"
ITEM_ARRAYS = ("features", "coords")


class UnsafeEntry(StoreError):
    """The store holds an entry mmcli never writes (unsafe/hidden name, link): refused, never followed."""


@dataclass(frozen=True, order=True)
class ItemKey:
    """Address of one item: ``/<modality>/<encoder_id>/<patient_id>/<item_id>``."""

    modality: str
    encoder_id: str
    patient_id: str
    item_id: str

    @property
    def path(self) -> str:
        return f"{self.modality}/{self.encoder_id}/{self.patient_id}/{self.item_id}"

    def validate(self) -> ItemKey:
        check_id(self.modality, "modality")
        if self.modality == TABULAR:
            raise StoreError("'tabular' is reserved for tables; use write_table()")
        check_id(self.encoder_id, "encoder_id")
        check_id(self.patient_id, "patient_id")
        check_id(self.item_id, "item_id")
        return self


@dataclass
class Item:
    """A stored item: features (N, D), optional coords (N, 2) and its attributes."""

    key: ItemKey
    features: np.ndarray
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """One problem found by :meth:`FeatureStore.verify`; ``where`` is a store path.

    ``kind`` says what :meth:`FeatureStore.repair` does with it: ``item`` / ``table`` (removed, the next run
    redoes it), ``entry`` (a key mmcli never writes: removed, a link without its target), ``group`` (unreadable
    group metadata: reset; the next extract or import restores an encoder's provenance), ``root`` (unreadable
    or missing root metadata: rebuilt), ``staging`` (a dead writer's leftovers: cleared), ``none`` (reported
    only).
    """

    where: str
    message: str
    kind: str = field(default="item", compare=False)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class ItemState:
    """What the metadata says about an item: ``ok``, ``incomplete`` or ``corrupt`` (``why`` says what)."""

    status: str
    attrs: dict[str, Any]
    why: str = ""


def jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` as plain JSON types; :class:`StoreError` when they cannot be."""
    try:
        return json.loads(json.dumps(attrs, default=json_default))
    except (TypeError, ValueError) as e:
        raise StoreError(f"item attributes must be JSON-serialisable: {e}") from e


def check_arrays(features: np.ndarray, coords: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``features`` (N, D) float16/32/64 and ``coords`` (N, 2) int64 or None, or :class:`StoreError`."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise StoreError(f"features must be 2-D (N, D), got shape {features.shape}")
    if features.dtype not in (np.float16, np.float32, np.float64):
        raise StoreError(f"features must be float16/float32/float64, got {features.dtype}")
    if coords is not None:
        coords = np.asarray(coords, dtype=np.int64)
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
            raise StoreError(f"coords must be (N, 2) with N={features.shape[0]}, got {coords.shape}")
    return features, coords


def shape_problem(attrs: dict[str, Any], shapes: dict[str, tuple[int, ...]], odd: list[str]) -> str:
    """Why the arrays of a complete item do not match its recorded shapes ('' when they do)."""
    if odd:
        return "; ".join(odd)
    n, dim = attrs.get("n"), attrs.get("dim")
    if "features" not in shapes:
        return "features array missing"
    if shapes["features"] != (n, dim):
        return f"features shape {shapes['features']} != recorded ({n}, {dim})"
    recorded = attrs.get("arrays")
    if isinstance(recorded, list) and "coords" in recorded and "coords" not in shapes:
        return "coords array missing"
    if "coords" in shapes and shapes["coords"] != (n, 2):
        return f"coords shape {shapes['coords']} != recorded ({n}, 2)"
    return ""


def repair_hint(path: Path) -> str:
    return f"Fix: `mmcli store verify --repair {path}`, then re-run `mmcli extract` to redo it."
