"""The feature store: one interface, a Zarr v3 backend (default, a directory) and an HDF5 backend (one file).

Hierarchy (same for both backends)::

    /                                     attrs: mmcli_version, schema_version
    /<modality>/<encoder_id>/             attrs: encoder-level provenance (name, dim, params)
    /<modality>/<encoder_id>/<patient_id>/<item_id>/
        features  (N, D) float16|float32
        coords    (N, 2) int64            (WSI: level-0 pixel x, y of each tile's top-left)
        attrs: provenance ..., n, dim, arrays, checksums, complete=true  (written last)
    /tabular/<name>/values  (patients x features) float64, attrs: patients, columns, checksums, complete=true

Modules: :mod:`.interface` (:class:`FeatureStore`, the backend registry, :func:`open_store`), :mod:`.keys`
(keys, items, problems), :mod:`.checksum` (per-array CRC-32C), :mod:`.verify` (verify / repair),
:mod:`.zarr` and :mod:`.hdf5` (the backends, each registered with ``@register_backend``), :mod:`.staging`.

Writes are atomic per item (see each backend). Readers trust an item only when its ``complete`` attribute is
true *and* its arrays exist with the recorded shapes (and, for an item written with checksums, every chunk file
exists) -- checked from metadata only. An item whose metadata cannot be parsed, or whose ``features`` /
``coords`` array or a chunk of it is missing or of another shape, is *corrupt*: readers skip it with a warning on
stderr (once per process), :meth:`FeatureStore.verify` reports it and :meth:`FeatureStore.repair` removes it so
the next extract redoes it. Reading an item whole checks its data against the checksums recorded at writing
(:mod:`.checksum`), and so do ``verify`` and the extract / import resume check.

A key mmcli never writes (an unsafe or hidden name, ``..``, a symbolic / soft / external link) means the store
was edited by hand or crafted: readers refuse it (:class:`UnsafeEntry`, exit 2) instead of following it, verify
reports it and repair removes the entry itself (a link is unlinked, its target is never touched).
"""
from __future__ import annotations

from mmcli.pipeline.locks import pid_alive
from mmcli.pipeline.store.hdf5 import H5Store
from mmcli.pipeline.store.interface import STORE_BACKENDS, FeatureStore, backend_for, open_store, register_backend
from mmcli.pipeline.store.keys import (
    ITEM_ARRAYS,
    SCHEMA_VERSION,
    TABULAR,
    Item,
    ItemKey,
    ItemState,
    Problem,
    UnsafeEntry,
)
from mmcli.pipeline.store.zarr import ZarrStore

__all__ = [
    "ITEM_ARRAYS", "SCHEMA_VERSION", "STORE_BACKENDS", "TABULAR", "FeatureStore", "H5Store", "Item", "ItemKey",
    "ItemState", "Problem", "UnsafeEntry", "ZarrStore", "backend_for", "open_store", "pid_alive",
    "register_backend",
]
