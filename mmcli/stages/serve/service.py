"""The served model: loads a run once, builds a one-patient :class:`~mmcli.heads.data.Cohort` from a request
(features sent in the body, or a patient of ``--store``) and scores it the way ``mmcli predict`` does.

A store patient is read through the same :class:`~mmcli.heads.fitted.FittedModel` as ``mmcli predict`` (its
sources, the head's alignment), and the run's saved calibration and decision threshold are applied the same
way, so the served output equals ``mmcli predict``'s for that patient.
A payload has no store to read: :func:`cohort_from_payload` (this module) makes the same Cohort layout from
the arrays (bags as sent, vectors as sent, tables in the model's column order with null = missing).
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.heads.base import Head
from mmcli.heads.card import build_card
from mmcli.heads.data import Cohort, ModalityData, ModalitySpec, Source, load_cohort
from mmcli.heads.fitted import FittedModel
from mmcli.pipeline.errors import InputError, MmcliError, StoreError
from mmcli.pipeline.store import FeatureStore, ItemKey, open_store

PAYLOAD_ITEM = "payload"


class NotFound(InputError):
    """A store patient the server does not have (HTTP 404)."""


class Unprocessable(InputError):
    """A request that is well-formed but cannot be scored, e.g. a modality the head cannot do without (422)."""


class StoreUnavailable(MmcliError):
    """The store cannot be read for this patient (a corrupt chunk, a planted link, an I/O error): HTTP 503.
    ``str()`` is a short reason without paths (sent to the client); ``detail`` is for the server's log."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail or reason


@dataclass
class Prepared:
    """One patient ready to score: the cohort, and per bag modality each instance's (item_id, row, coords)."""

    cohort: Cohort
    instances: dict[str, list[tuple[str | None, int, list[float] | None]]] = field(default_factory=dict)


def cohort_from_payload(specs: Sequence[ModalitySpec], payload: Mapping[str, Any]) -> Prepared:
    """A one-patient Cohort from validated per-modality payloads (modalities absent from ``payload`` are
    missing). Bags keep float32 (N, D); vectors are (1, D) float32 with NaN for a table's null values."""
    mods: dict[str, ModalityData] = {}
    instances: dict[str, list[tuple[str | None, int, list[float] | None]]] = {}
    for s in specs:
        p = payload.get(s.name)
        present = np.array([p is not None])
        if s.kind == "bag":
            if p is None:
                mods[s.name] = ModalityData(s, present, bags=[None], items=[[]])
                continue
            bag = np.asarray(p.features, dtype=np.float32).reshape(-1, s.dim)
            mods[s.name] = ModalityData(s, present, bags=[bag], items=[[(PAYLOAD_ITEM, len(bag))]])
            coords = p.coords or [None] * len(bag)
            instances[s.name] = [(None, i, c) for i, c in enumerate(coords)]
        else:
            vec = np.full((1, s.dim), np.nan, dtype=np.float32)
            if p is not None:
                vec[0] = np.array([np.nan if v is None else v for v in p.features], dtype=np.float32)
            mods[s.name] = ModalityData(s, present, vectors=vec)
    return Prepared(Cohort([PAYLOAD_ITEM], mods), instances)


def input_sha256(cohort: Cohort, specs: Sequence[ModalitySpec]) -> str:
    """sha256 of the canonical input: per model modality in model order, ``name:shape;`` and the float32
    C-order bytes (``name:absent;`` when missing). The same features give the same hash whether they were
    sent in the body or read from the store."""
    h = hashlib.sha256()
    for s in specs:
        m = cohort.modalities[s.name]
        if not bool(m.present[0]):
            h.update(f"{s.name}:absent;".encode())
            continue
        arr = m.bags[0] if s.kind == "bag" else m.vectors[0]  # type: ignore[index]
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        h.update(f"{s.name}:{list(arr.shape)};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class ServedModel:
    """A fitted run loaded for serving (read-only after construction; :meth:`score` is thread-safe)."""

    def __init__(self, model: str | Path, store: str | Path | None = None) -> None:
        self.fitted = FittedModel.load(model)
        assert self.fitted.path is not None
        self.model_dir = self.fitted.path
        self.config = self.fitted.config
        self.head: Head = self.fitted.head
        self.specs = [ModalitySpec.from_json(s) for s in self.config["modalities"]]
        self.task = self.fitted.task
        self.classes = self.fitted.classes or []
        # the head's own policy, as in `mmcli predict`: some heads score only patients with every modality
        self.needs_all = self.fitted.needs_every_modality
        self.post = self.fitted.post  # saved calibration / operating-point threshold (or none)
        self.card = build_card(model)
        self.sha256: str = self.card["model"]["model_sha256"]
        self.store: FeatureStore | None = None
        self.sources: list[Source] = []
        if store is not None:
            if not Path(store).exists():
                raise InputError(f"{store}: no feature store here.", flag="--store")
            self.store = open_store(Path(store), "r")
            self.sources = self.fitted.sources(self.store)
        self._lock = threading.Lock()  # one forward pass at a time: torch heads keep module state

    def warm_up(self) -> None:
        """One forward pass on an all-zero patient, so the first real request does not pay torch's set-up."""
        zeros = {s.name: _Zeros(s) for s in self.specs}
        self.score(cohort_from_payload(self.specs, zeros), top_k=1)

    # ---- inputs ----------------------------------------------------------------------------------------
    def from_payload(self, payload: Mapping[str, Any]) -> Prepared:
        return cohort_from_payload(self.specs, payload)

    def from_store(self, patient_id: str) -> Prepared:
        """The patient's features as ``mmcli predict`` reads them (same loaders, same table alignment), reading
        only this patient's items (:class:`_OnePatient`). A store that cannot be read for this patient (a
        corrupt item, a planted link, an I/O error) is :class:`StoreUnavailable`."""
        if self.store is None:
            raise Unprocessable("this server has no --store: send the patient's features instead of an id.")
        try:
            one = _OnePatient(self.store, patient_id)
            cohort = self.head.align(load_cohort(one, self.sources, [patient_id], n_threads=1))  # type: ignore[arg-type]
            instances: dict[str, list[tuple[str | None, int, list[float] | None]]] = {}
            for s in self.specs:
                m = cohort.modalities[s.name]
                if s.kind != "bag" or not m.present[0]:
                    continue
                rows = []
                for item_id, n in (m.items or [[]])[0]:
                    coords = self.store.read_item(s.name, s.encoder_id or "", patient_id, item_id).coords
                    rows += [(item_id, i, coords[i].tolist() if coords is not None else None) for i in range(n)]
                instances[s.name] = rows
        except (StoreError, OSError) as e:
            raise StoreUnavailable("store unavailable: this patient's features cannot be read",
                                   f"patient {patient_id!r}: {type(e).__name__}: {e}") from e
        if not cohort.presence().any():
            raise NotFound(f"patient {patient_id!r} has none of the model's modalities "
                           f"{[s.name for s in self.specs]} in the store.")
        return Prepared(cohort, instances)

    # ---- scoring ---------------------------------------------------------------------------------------
    def score(self, prep: Prepared, top_k: int) -> dict[str, Any]:
        """Probabilities and predicted class (or risk), missing modalities, and top-k attention tiles."""
        cohort = prep.cohort
        present = {s.name: bool(cohort.modalities[s.name].present[0]) for s in self.specs}
        missing = [n for n, ok in present.items() if not ok]
        if self.needs_all and missing:
            raise Unprocessable(f"head {self.config['head']!r} needs every modality {list(present)}; "
                                f"missing: {missing}.")
        with self._lock:
            pred = self.head.predict(cohort)
            att = self.head.attention(cohort) if top_k > 0 else None
        out: dict[str, Any] = {"task": self.task, "missing_modalities": missing, "modalities_present": present}
        # the columns of fit's prediction_frame (risk | value | prob_<class>, y_pred = argmax) without a DataFrame:
        # building one costs more than the forward pass of a small head
        pred = np.asarray(pred, dtype=np.float64)
        if not np.isfinite(pred).all():  # e.g. values near the float32 limit, far outside what the model saw
            raise Unprocessable("the model's output is not finite for these inputs (values far outside the range "
                                "it was trained on).")
        if self.task == "survival":
            out["risk"] = float(pred.reshape(-1)[0])
        elif self.task == "regression":
            out["value"] = float(pred.reshape(-1)[0])
        else:
            pred = self.post.calibrate(pred)
            out["probabilities"] = {c: float(p) for c, p in zip(self.classes, pred[0])}
            out["predicted_class"] = self.classes[int(np.argmax(pred[0]))]
            decisions = self.post.decisions(pred)
            if decisions is not None:  # the operating point's threshold, chosen at fit time on training folds
                out["decision"] = decisions[0]
                out["threshold"] = self.post.threshold
        if att:
            out["attention"] = {name: _top_tiles(values[0], prep.instances.get(name, []), top_k)
                                for name, values in att.items()}
        return out


def _items_of(store: FeatureStore, modality: str, encoder_id: str, patient_id: str) -> list[ItemKey]:
    """The complete items of one patient, sorted, reading only that patient's group (``iter_items`` lists every
    item of the modality, which made each by-id request cost O(store)). A corrupt item is a StoreError here,
    not skipped as in ``items_of``: a served prediction must not silently drop part of a patient."""
    keys = []
    for key in store.items_of(modality, encoder_id, patient_id, include_incomplete=True):
        state = store.item_state(modality, encoder_id, patient_id, key.item_id)
        if state.status == "corrupt":
            raise StoreError(f"{store.path}: item /{key.path} is corrupt: {state.why}")
        if state.status == "ok":
            keys.append(key)
    return keys


class _OnePatient:
    """The store as :func:`~mmcli.heads.data.load_cohort` sees it for one patient: ``iter_items`` yields only
    that patient's items (:func:`_items_of`); everything else is the store's own."""

    def __init__(self, store: FeatureStore, patient_id: str) -> None:
        self._store, self._patient = store, patient_id

    def iter_items(self, modality: str | None = None, encoder_id: str | None = None,
                   include_incomplete: bool = False) -> Iterator[ItemKey]:
        if modality is None or encoder_id is None or include_incomplete:  # not what load_cohort asks
            raise TypeError("_OnePatient.iter_items needs a modality and an encoder id")
        yield from _items_of(self._store, modality, encoder_id, self._patient)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _Zeros:
    """A payload of zeros for one modality (one instance for a bag)."""

    def __init__(self, spec: ModalitySpec) -> None:
        self.features = [[0.0] * spec.dim] if spec.kind == "bag" else [0.0] * spec.dim
        self.coords = None


def _top_tiles(values: np.ndarray | None, instances: list[tuple[str | None, int, list[float] | None]],
               k: int) -> list[dict[str, Any]]:
    if values is None or not len(values):
        return []
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")[:k]
    return [{"index": instances[i][1], "item_id": instances[i][0], "coords": instances[i][2],
             "attention": float(values[i])} for i in order]
