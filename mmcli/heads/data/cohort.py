"""A cohort's cached features in stage 2: per-patient bags and vectors, rows aligned with ``Cohort.patients``.

* **bag** modalities (``wsi``, or any store modality whose items carry tile ``coords``): each patient's items'
  rows, concatenated in item-id order into one ``(N_i, D)`` bag, as a :class:`~mmcli.heads.data.bags.BagList`
  (read from the store under the memory budget; kept in the stored dtype: float16 stays float16); ``items``
  keeps ``(item_id, rows)`` so an instance maps back to ``(item_id, index)``.
* **vector** store modalities (``mri``, ``text``, ``slide`` ...) and **tables**: one ``(D,)`` row per patient
  (NaN where absent; table NaNs are imputed in-fold by the heads).

A patient without data for a modality has ``present=False`` there (a ``None`` bag or a NaN row).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mmcli.heads.data.bags import BagList

BAG_MODALITIES = frozenset({"wsi"})
TABLE_SOURCE = "table"
STORE_SOURCE = "store"


@dataclass(frozen=True)
class ModalitySpec:
    """What a model needs of one modality: where it comes from, its kind and feature dim."""

    name: str
    kind: str  # "bag" | "vector"
    source: str  # "store" | "table"
    encoder_id: str | None  # None for tables
    dim: int
    columns: tuple[str, ...] | None = None  # feature names of a table

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": self.source, "encoder_id": self.encoder_id,
                "dim": self.dim, "columns": list(self.columns) if self.columns is not None else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModalitySpec:
        cols = d.get("columns")
        return cls(d["name"], d["kind"], d["source"], d.get("encoder_id"), int(d["dim"]),
                   tuple(cols) if cols is not None else None)

    def feature_names(self) -> list[str]:
        """Column names ``<modality>:<feature>`` (table columns, else the feature index)."""
        cols = self.columns if self.columns is not None else [str(i) for i in range(self.dim)]
        return [f"{self.name}:{c}" for c in cols]


@dataclass
class ModalityData:
    """One modality of a cohort; row ``i`` belongs to ``Cohort.patients[i]``."""

    spec: ModalitySpec
    present: np.ndarray  # (n,) bool
    bags: BagList | None = None  # kind == "bag" (a list of arrays is wrapped into a BagList)
    items: list[list[tuple[str, int]]] | None = None  # kind == "bag": (item_id, rows) in bag order
    vectors: np.ndarray | None = None  # kind == "vector": (n, D) float32, NaN where absent

    def __post_init__(self) -> None:
        if self.bags is not None and not isinstance(self.bags, BagList):
            self.bags = BagList.of(self.bags)

    def subset(self, idx: np.ndarray) -> ModalityData:
        idx = np.asarray(idx, dtype=int)
        if self.spec.kind == "bag":
            assert self.bags is not None and self.items is not None
            return replace(self, present=self.present[idx], bags=self.bags.subset(idx),
                           items=[self.items[i] for i in idx])
        assert self.vectors is not None
        return replace(self, present=self.present[idx], vectors=self.vectors[idx])

    def pooled(self) -> np.ndarray:
        """(n, D) float32: bags mean-pooled over instances, vectors as they are; NaN rows where absent."""
        if self.spec.kind == "vector":
            assert self.vectors is not None
            return self.vectors
        assert self.bags is not None
        out = np.full((len(self.bags), self.spec.dim), np.nan, dtype=np.float32)
        for i in range(len(self.bags)):
            mean = self.bags.mean(i)  # the cohort's first pass keeps them: no second read of every bag
            if mean is not None:
                out[i] = mean
        return out


@dataclass
class Cohort:
    """Patients and their modalities (insertion order of ``modalities`` is the model's modality order)."""

    patients: list[str]
    modalities: dict[str, ModalityData]
    features_sha256: str = ""
    covariates: Any = None  # pandas DataFrame indexed by patient_id (batch column, protected covariates) or None

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def names(self) -> list[str]:
        return list(self.modalities)

    def specs(self) -> list[ModalitySpec]:
        return [m.spec for m in self.modalities.values()]

    def subset(self, idx: Sequence[int] | np.ndarray) -> Cohort:
        idx = np.asarray(idx, dtype=int)
        return Cohort([self.patients[i] for i in idx], {k: m.subset(idx) for k, m in self.modalities.items()},
                      self.features_sha256, self.covariates)

    def presence(self) -> np.ndarray:
        """(n, M) bool: modality m present for patient i."""
        if not self.modalities:
            return np.zeros((len(self.patients), 0), dtype=bool)
        return np.stack([m.present for m in self.modalities.values()], axis=1)
