"""Issue 25 item 1: an untrusted ``.h5`` cannot make ``import`` read another local file into the store.

Each crafted CLAM file below points its ``features`` at a secret: HDF5 external storage (raw bytes of any file),
an external link, a soft link, a virtual dataset; and a gzip bomb declares far more data than it holds. The import
refuses each file by name (the item fails, the rest import) and the secret's bytes are nowhere in the store.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from mmcli.features.interop.h5safe import check_file
from mmcli.pipeline.errors import FormatError
from mmcli.stages.import_ import import_features

SECRET = (b"-----BEGIN OPENSSH PRIVATE KEY----- mmcli-test-secret " * 40)[:2048]
N, D = 4, 128  # 4 x 128 float32 = 2048 bytes: exactly the secret


def _cohort(tmp_path: Path, crafted: str) -> tuple[Path, Path]:
    """A CLAM folder with one good slide and one crafted one; the secret file beside it."""
    secret = tmp_path / "id_rsa"
    secret.write_bytes(SECRET)
    root = tmp_path / "clam" / "h5_files"
    root.mkdir(parents=True)
    coords = (np.arange(N * 2).reshape(N, 2) * 256).astype(np.int32)
    with h5py.File(root / "good.h5", "w") as h:
        h["features"], h["coords"] = np.ones((N, D), np.float32), coords
    with h5py.File(tmp_path / "other.h5", "w") as h:  # another HDF5 file holding the secret's bytes
        h["data"] = np.frombuffer(SECRET, dtype=np.float32).reshape(N, D)
    with h5py.File(root / "bad.h5", "w") as h:
        h["coords"] = coords
        if crafted == "external_storage":
            h.create_dataset("features", shape=(N, D), dtype=np.float32, external=[(str(secret), 0, len(SECRET))])
        elif crafted == "external_link":
            h["features"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/data")
        elif crafted == "soft_link":
            h["hidden"] = np.frombuffer(SECRET, dtype=np.float32).reshape(N, D)
            h["features"] = h5py.SoftLink("/hidden")
        elif crafted == "virtual":
            layout = h5py.VirtualLayout(shape=(N, D), dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "data", shape=(N, D))
            h.create_virtual_dataset("features", layout)
    (tmp_path / "m.csv").write_text("patient_id,modality,path\nP1,wsi,good.svs\nP2,wsi,bad.svs\n")
    return tmp_path / "m.csv", secret


def _store_bytes(store: Path) -> bytes:
    files = [store] if store.is_file() else sorted(p for p in store.rglob("*") if p.is_file())
    return b"".join(p.read_bytes() for p in files)


@pytest.mark.parametrize("store_name", ["s.zarr", "s.h5"])
@pytest.mark.parametrize("crafted", ["external_storage", "external_link", "soft_link", "virtual"])
def test_crafted_h5_is_refused_and_the_secret_never_reaches_the_store(tmp_path: Path, crafted: str,
                                                                      store_name: str) -> None:
    manifest, secret = _cohort(tmp_path, crafted)
    bad = tmp_path / "clam" / "h5_files" / "bad.h5"
    with h5py.File(bad, "r") as h:  # the crafted file really reads the secret through plain h5py
        assert h["features"][()].tobytes() == SECRET
    s = import_features("clam", tmp_path / "clam", manifest, tmp_path / store_name, progress=False)
    by = {o.item_id: o for o in s.outcomes}
    assert by["good"].status == "done" and by["bad"].status == "failed" and s.exit_code == 1
    want = {"external_storage": "external files", "external_link": "external link", "soft_link": "SoftLink",
            "virtual": "virtual dataset"}[crafted]
    assert want in by["bad"].reason and "refused" in by["bad"].reason
    blob = _store_bytes(tmp_path / store_name)
    assert b"mmcli-test-secret" not in blob and SECRET[:64] not in blob
    import zlib  # zarr compresses chunks: the secret must not be there compressed either

    assert zlib.compress(SECRET)[2:40] not in blob
    assert secret.read_bytes() == SECRET


def test_gzip_bomb_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few KB of gzip declare 64 MiB of zeros: refused on the declared size and on the expansion ratio, before
    any data is decompressed (the cap is lowered here so that the test stays small)."""
    root = tmp_path / "clam" / "h5_files"
    root.mkdir(parents=True)
    n = 16384
    with h5py.File(root / "bomb.h5", "w") as h:
        ds = h.create_dataset("features", shape=(n, 1024), dtype=np.float32, chunks=(1024, 1024),
                              compression="gzip", compression_opts=9)
        ds[:1024] = 0.0
        h["coords"] = np.zeros((n, 2), np.int32)
    assert (root / "bomb.h5").stat().st_size < 1 << 20
    with h5py.File(root / "bomb.h5", "r") as h, pytest.raises(FormatError, match="compression bomb"):
        check_file(h, root / "bomb.h5")  # 64 MiB declared, > 200x its size on disk
    monkeypatch.setenv("MMCLI_MAX_ITEM_BYTES", str(8 << 20))
    with h5py.File(root / "bomb.h5", "r") as h, pytest.raises(FormatError, match="above the 8.0 MiB cap"):
        check_file(h, root / "bomb.h5")
    (tmp_path / "m.csv").write_text("patient_id,modality,path\nP1,wsi,bomb.svs\n")
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(Exception, match="cap per file"):
        import_features("clam", tmp_path / "clam", tmp_path / "m.csv", tmp_path / "s.zarr", progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20  # nothing near the 64 MiB the file declares was ever allocated
