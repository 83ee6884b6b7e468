"""Opening an untrusted ``.h5`` file (a collaborator's CLAM / TRIDENT / STAMP output) without letting it read
anything else.

HDF5 lets a dataset's bytes live outside the file: *external storage* (raw bytes of any local file, e.g. an SSH
key), *virtual datasets* (mapped from other HDF5 files), *external links* and *soft links* (names resolved
elsewhere). A crafted file would make ``import`` copy a local file into the store. :func:`open_checked` walks
every link without following it (``Group.get(name, getlink=True)``) and every dataset's creation properties
(``get_external_count``, ``is_virtual``) before any data is read, and refuses all of them: feature files from
CLAM, TRIDENT and STAMP hold hard-linked contiguous or chunked datasets only.

It also caps what a file may decompress to (:data:`MAX_ITEM_BYTES`, ``MMCLI_MAX_ITEM_BYTES``): a few MB of
gzip can declare gigabytes of zeros. The declared size (shape x item size) of every dataset is checked before
reading, and a file that would expand more than :data:`MAX_EXPANSION` times its size on disk (float features
barely compress) is refused as well.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import FormatError

MAX_ITEM_BYTES = 16 << 30  # 16 GiB of decompressed data per file: far beyond any slide's tile features
MAX_EXPANSION = 200  # declared bytes / bytes on disk above which a file (over 64 MiB declared) is a bomb
_EXPANSION_FLOOR = 64 << 20


def max_item_bytes() -> int:
    """The per-file cap: ``MMCLI_MAX_ITEM_BYTES`` (bytes) when set, else :data:`MAX_ITEM_BYTES`."""
    raw = os.environ.get("MMCLI_MAX_ITEM_BYTES", "").strip()
    try:
        return int(raw) if raw else MAX_ITEM_BYTES
    except ValueError:
        return MAX_ITEM_BYTES


def _walk(group: Any, path: Path, prefix: str = "") -> Iterator[Any]:
    """Every dataset below ``group``, refusing soft and external links before they are followed."""
    import h5py

    for name in group:
        link = group.get(name, getlink=True)
        where = f"{prefix}/{name}"
        if isinstance(link, h5py.ExternalLink):
            raise FormatError(f"{path}: '{where}' is an external link to {link.filename}:{link.path}; refused (a "
                              "feature file must not read other files). Fix: re-save the file with its data inside.")
        if not isinstance(link, h5py.HardLink):
            raise FormatError(f"{path}: '{where}' is a {type(link).__name__} (not a hard link); refused. Fix: "
                              "re-save the file with plain datasets.")
        obj = group[name]
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, path, where)
        elif isinstance(obj, h5py.Dataset):
            yield where, obj


def check_file(h5: Any, path: Path, max_bytes: int | None = None) -> None:
    """Refuse (:class:`FormatError`) external storage, virtual datasets, non-hard links and datasets that would
    decompress beyond the cap, reading no data."""
    cap = max_item_bytes() if max_bytes is None else max_bytes
    total = 0
    for where, ds in _walk(h5, path):
        if ds.id.get_create_plist().get_external_count() > 0:
            raise FormatError(f"{path}: dataset '{where}' keeps its bytes in external files; refused (a feature "
                              "file must not read other files). Fix: re-save it with its data inside.")
        if ds.is_virtual:
            raise FormatError(f"{path}: dataset '{where}' is a virtual dataset mapped from other files; refused. "
                              "Fix: re-save it with its data inside.")
        total += int(ds.size) * int(ds.dtype.itemsize)
    if total > cap:
        raise FormatError(f"{path}: its datasets would decompress to {total / 2**20:.1f} MiB, above the "
                          f"{cap / 2**20:.1f} MiB cap per file; refused. Fix: check the file (a compression bomb?), "
                          "or raise MMCLI_MAX_ITEM_BYTES.")
    on_disk = max(path.stat().st_size, 1)
    if total > _EXPANSION_FLOOR and total > MAX_EXPANSION * on_disk:
        raise FormatError(f"{path}: {on_disk} bytes on disk declare {total / 2**20:.1f} MiB of data "
                          f"({total // on_disk}x; float features barely compress); refused as a compression bomb.")


@contextmanager
def open_checked(path: str | Path, max_bytes: int | None = None) -> Iterator[Any]:
    """``h5py.File(path, "r")`` after :func:`check_file`; an unreadable file raises ``OSError`` as h5py does."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as h5:
        check_file(h5, path, max_bytes)
        yield h5
