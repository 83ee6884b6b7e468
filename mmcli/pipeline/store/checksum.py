"""Per-array checksums of stored items: what catches a lost or damaged chunk that the metadata cannot show.

Every item written since checksums exist carries ``checksums`` in its attrs: ``{array name: "crc32c:<8 hex>"}``,
the CRC-32C (Castagnoli, as in iSCSI and Zarr's ``crc32c`` codec) of the array's bytes in C order, little-endian,
as written. A Zarr chunk file that was deleted reads back as the fill value (zeros) without any error, and a chunk
overwritten with bytes that still decode reads back as other numbers; both change the checksum. Reading a whole
item checks it (:meth:`FeatureStore.read_item`, ``verify``, the runner's cache check); a partial read cannot, and
checks instead that every chunk of the array exists (see the backends' ``_meta``).

Items written before checksums existed have none: they are read as before and reported by ``verify`` as
unverified (valid, but a lost chunk cannot be told from zeros). google-crc32c (the C library, several GB/s) is
used because it is what Zarr itself uses for its ``crc32c`` codec; the array is fed in 1 MiB blocks so that no
copy of a whole large array is made.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import google_crc32c
import numpy as np

CHECKSUMS = "checksums"
_BLOCK = 1 << 20  # bytes per crc32c update: big enough for speed, small enough to stay in cache


def array_checksum(arr: np.ndarray) -> str:
    """``"crc32c:<8 hex>"`` of ``arr``'s bytes (C order, little-endian)."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    flat = a.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, _BLOCK):
        crc = google_crc32c.extend(crc, flat[start:start + _BLOCK].tobytes())
    return f"crc32c:{crc:08x}"


def checksums(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """The ``checksums`` attribute of an item holding ``arrays``."""
    return {name: array_checksum(a) for name, a in sorted(arrays.items())}


def has_checksums(attrs: Mapping[str, Any]) -> bool:
    """True for an item written with checksums (every chunk of its arrays was written, even all-zero ones)."""
    return isinstance(attrs.get(CHECKSUMS), dict)


def checksum_problem(attrs: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """Why ``arrays`` (read whole) do not match the item's recorded checksums; '' when they do or when the item
    has none (written before checksums existed)."""
    recorded = attrs.get(CHECKSUMS)
    if recorded is None:
        return ""
    if not isinstance(recorded, dict):
        return "checksums attribute is not an object"
    for name, want in sorted(recorded.items()):
        if name not in arrays:
            return f"{name} array missing"
        got = array_checksum(arrays[name])
        if got != want:
            return (f"{name} data do not match their checksum ({got}, recorded {want}): a chunk was lost or "
                    "changed after writing")
    return ""
