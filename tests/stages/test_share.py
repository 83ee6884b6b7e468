"""``mmcli store share``: a store for sharing holds no source paths and, with a key, no original ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.pipeline.fingerprint import source_fingerprint
from mmcli.pipeline.ids import pseudonym
from mmcli.pipeline.store import open_store


def _store(tmp_path: Path) -> Path:
    src = tmp_path / "hospital" / "Smith_John_TCGA-AA-0001.svs"
    src.parent.mkdir()
    src.write_bytes(b"slide")
    s = open_store(tmp_path / "s.zarr")
    s.write_item("wsi", "enc", "TCGA-AA-0001", "TCGA-AA-0001-slide1", np.ones((3, 4), np.float16),
                 np.zeros((3, 2), np.int64), {"source_fingerprint": source_fingerprint(src), "mpp": 0.5,
                                              "note": "slide of TCGA-AA-0001"})
    s.write_table("genes", pd.DataFrame({"ESR1": [1.0, np.nan]}, index=["TCGA-AA-0001", "TCGA-BB-0002"]))
    (tmp_path / "labels.csv").write_text("patient_id,subtype\nTCGA-AA-0001,LumA\nTCGA-BB-0002,TNBC\n")
    return tmp_path / "s.zarr"


def _all_bytes(path: Path) -> bytes:
    return b"".join(f.read_bytes() + f.name.encode() + str(f).encode() for f in path.rglob("*") if f.is_file())


def test_pseudonymised_share(tmp_path: Path) -> None:
    src = _store(tmp_path)
    key = tmp_path / "secret.key"
    r = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / "shared.zarr"), "--pseudonymize",
                                 str(key), "--labels", str(tmp_path / "labels.csv"), "--labels-out",
                                 str(tmp_path / "labels_shared.csv")])
    assert r.exit_code == 0, r.output
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    blob = _all_bytes(tmp_path / "shared.zarr")
    for secret in (b"TCGA-AA-0001", b"TCGA-BB-0002", b"Smith", b"hospital"):
        assert secret not in blob
    shared = open_store(tmp_path / "shared.zarr", "r")
    k = pseudonym(key.read_bytes().strip(), "TCGA-AA-0001")
    assert shared.patients("wsi", "enc") == [k]
    item = shared.read_item("wsi", "enc", k, next(iter(shared.iter_items())).item_id)
    assert item.attrs["mpp"] == 0.5 and "path" not in item.attrs["source_fingerprint"]
    assert item.features.shape == (3, 4)
    assert set(shared.read_table("genes").index) == {k, pseudonym(key.read_bytes().strip(), "TCGA-BB-0002")}
    labels = pd.read_csv(tmp_path / "labels_shared.csv")
    assert labels["patient_id"].tolist()[0] == k and "TCGA" not in labels.to_csv()

    # same key -> same pseudonyms (shards shared later line up); refuses to overwrite
    r2 = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / "shared2.h5"), "--pseudonymize",
                                  str(key)])
    assert r2.exit_code == 0, r2.output
    assert open_store(tmp_path / "shared2.h5", "r").patients("wsi", "enc") == [k]
    r3 = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / "shared2.h5")])
    assert r3.exit_code == 2 and "already exists" in r3.output


def test_plain_share_drops_paths_keeps_ids(tmp_path: Path) -> None:
    src = _store(tmp_path)
    r = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / "plain.zarr")])
    assert r.exit_code == 0, r.output
    blob = _all_bytes(tmp_path / "plain.zarr")
    assert b"Smith" not in blob and b"hospital" not in blob
    assert open_store(tmp_path / "plain.zarr", "r").patients("wsi", "enc") == ["TCGA-AA-0001"]


# ---- issue 13: source fingerprints, crafted sources, no partial output ------------------------------------------
def _fingerprints(store: Path) -> list:
    s = open_store(store, "r")
    return [s.read_item(k.modality, k.encoder_id, k.patient_id, k.item_id).attrs.get("source_fingerprint")
            for k in s.iter_items()]


def test_shared_copy_cannot_be_linked_back_to_the_slides(tmp_path: Path) -> None:
    """Size, mtime and head hash of each source file would identify the original slide: a plain share drops the
    fingerprint, a keyed share keeps only an HMAC of it that the key holder can re-derive."""
    import hashlib
    import hmac
    import json

    src = _store(tmp_path)
    fp = source_fingerprint(tmp_path / "hospital" / "Smith_John_TCGA-AA-0001.svs")
    plain = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / "plain.h5")])
    assert plain.exit_code == 0, plain.output
    assert _fingerprints(tmp_path / "plain.h5") == [None]
    key = tmp_path / "k.key"
    keyed = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / "keyed.zarr"), "--pseudonymize",
                                     str(key)])
    assert keyed.exit_code == 0, keyed.output
    want = hmac.new(key.read_bytes().strip(), json.dumps({k: v for k, v in fp.items() if k != "path"},
                                                         sort_keys=True).encode(), hashlib.sha256).hexdigest()
    assert _fingerprints(tmp_path / "keyed.zarr") == [{"hmac_sha256": want}]
    for shared in ("plain.h5", "keyed.zarr"):
        blob = b"".join(f.read_bytes() for f in (tmp_path / shared).rglob("*") if f.is_file()) \
            if (tmp_path / shared).is_dir() else (tmp_path / shared).read_bytes()
        assert fp["head_sha256"].encode() not in blob and str(fp["mtime_ns"]).encode() not in blob


def test_refused_share_leaves_no_partial_destination(tmp_path: Path, monkeypatch) -> None:
    """A crafted source (a patient folder linked to outside the store) is refused with exit 2 before anything is
    written; a failure in the middle of the copy (here: a full disk) leaves no destination and no temp files."""
    src = _store(tmp_path)
    outside = open_store(tmp_path / "other.zarr")
    outside.write_item("wsi", "enc", "X", "a", np.ones((1, 4), np.float16))
    (src / "wsi" / "enc" / "P9").symlink_to(tmp_path / "other.zarr" / "wsi" / "enc" / "X", target_is_directory=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    for dst in ("out.h5", "out.zarr"):
        r = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / dst)])
        assert r.exit_code == 2 and "symbolic link" in r.output and "never writes such a key" in r.output, r.output
        assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (src / "wsi" / "enc" / "P9").unlink()

    import errno

    from mmcli.pipeline.store import H5Store, ZarrStore

    def full(real):
        def write(self, key_path, *a, **k):
            if ".partial" in str(self.path) and key_path.startswith("tabular"):  # the last thing copied
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, key_path, *a, **k)
        return write

    monkeypatch.setattr(ZarrStore, "_write", full(ZarrStore._write))
    monkeypatch.setattr(H5Store, "_write", full(H5Store._write))
    for dst in ("out.h5", "out.zarr"):
        r = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / dst)])
        assert r.exit_code == 1 and f"disk full: {tmp_path / dst};" in r.output, r.output
        assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_shared_labels_are_formula_escaped(tmp_path: Path) -> None:
    src = _store(tmp_path)
    (tmp_path / "labels.csv").write_text("patient_id,subtype\nTCGA-AA-0001,=cmd|' /C calc'!A0\n")
    r = CliRunner().invoke(app, ["store", "share", str(src), str(tmp_path / "sh.zarr"), "--labels",
                                 str(tmp_path / "labels.csv"), "--labels-out", str(tmp_path / "out.csv")])
    assert r.exit_code == 0, r.output
    assert "'=cmd" in (tmp_path / "out.csv").read_text()
