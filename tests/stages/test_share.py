"""``mmcli store share``: a store for sharing holds no source paths and, with a key, no original ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.pipeline.fingerprint import source_fingerprint
from mmcli.pipeline.pseudonym import pseudonym
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
