"""The shared stage-1 runner: cache/resume, failure isolation, per-item locks, run records, dask parity."""
from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mmcli.features.runner import ExtractorSpec, item_lock, lock_dir, run_extraction
from mmcli.pipeline.manifest import load_manifest
from mmcli.pipeline.store import open_store

FAKE = textwrap.dedent('''
    """A toy extractor: features derived from the file's bytes; 'bad' files raise ItemError."""
    import numpy as np
    from mmcli.features.runner import ItemExtractor, ItemError, ItemResult

    CALLS = []

    class Fake(ItemExtractor):
        modality = "toy"

        def __init__(self, dim=4):
            self.dim = dim

        @property
        def encoder_id(self):
            return f"fake-{self.dim}"

        def encoder_attrs(self):
            return {"encoder": "fake", "dim": self.dim}

        def extract(self, row, progress=None):
            CALLS.append(row.item_id)
            data = row.path.read_bytes()
            if data.startswith(b"bad"):
                raise ItemError(f"{row.path.name}: not a toy file")
            if data.startswith(b"crash"):
                raise RuntimeError("unexpected bug")
            v = np.frombuffer(data.ljust(self.dim, b"0")[: self.dim], dtype=np.uint8).astype(np.float32)
            if progress:
                progress(1, 1)
            return ItemResult(v[None, :], np.zeros((1, 2), np.int64), {"nbytes": len(data)})
''')


@pytest.fixture
def cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "fake_extractor_mod.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    sys.modules.pop("fake_extractor_mod", None)
    lines = ["patient_id,modality,path,item_id"]
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_bytes(b"bad" if i == 2 else f"item{i}".encode())
        lines.append(f"P{i},toy,f{i}.txt,a")
    lines.append("P9,toy,gone.txt,a")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def _spec() -> ExtractorSpec:
    return ExtractorSpec("fake_extractor_mod:Fake", {"dim": 4}, "toy", "fake-4")


def test_failures_isolated_and_resume(cohort: Path) -> None:
    import fake_extractor_mod as fake

    m = load_manifest(cohort / "m.csv")
    store = cohort / "s.zarr"
    s1 = run_extraction(m.rows, _spec(), store, missing=m.missing, progress=False)
    assert (s1.count("done"), s1.count("failed"), s1.count("missing")) == (5, 1, 1)
    assert s1.exit_code == 1
    failed = [o for o in s1.outcomes if o.status == "failed"][0]
    assert failed.patient_id == "P2" and "not a toy file" in failed.reason
    record = json.loads(Path(s1.record_path).read_text())
    assert record["done"] == 5 and record["failed"] == 1 and record["missing"] == 1
    assert open_store(store, "r").patients("toy", "fake-4") == ["P0", "P1", "P3", "P4", "P5"]
    item = open_store(store, "r").read_item("toy", "fake-4", "P1", "a")
    assert item.attrs["encoder"] == "fake" and item.attrs["source_fingerprint"]["size"] == 5

    # the bad file is fixed; a re-run only extracts it (the others are cached)
    fake.CALLS.clear()
    (cohort / "f2.txt").write_bytes(b"item2")
    s2 = run_extraction(m.rows, _spec(), store, progress=False)
    assert fake.CALLS == ["a"] and s2.count("cached") == 5 and s2.count("done") == 1 and s2.exit_code == 0

    # a changed source file invalidates its cached item; --force redoes everything
    fake.CALLS.clear()
    (cohort / "f0.txt").write_bytes(b"item0-changed")
    s3 = run_extraction(m.rows, _spec(), store, progress=False)
    assert s3.count("done") == 1 and len(fake.CALLS) == 1
    fake.CALLS.clear()
    s4 = run_extraction(m.rows, _spec(), store, force=True, progress=False)
    assert s4.count("done") == 6 and len(fake.CALLS) == 6


def test_unexpected_exception_is_reported_not_raised(cohort: Path) -> None:
    (cohort / "f3.txt").write_bytes(b"crash")
    m = load_manifest(cohort / "m.csv")
    s = run_extraction(m.rows, _spec(), cohort / "s.h5", progress=False)
    crash = [o for o in s.outcomes if o.patient_id == "P3"][0]
    assert crash.status == "failed" and "RuntimeError: unexpected bug" in crash.reason
    assert s.count("done") == 4


def test_item_locks(tmp_path: Path, cohort: Path) -> None:
    store = cohort / "s.zarr"
    with item_lock(store, "toy", "fake-4", "P0", "a") as held:
        assert held
        lock = lock_dir(store) / "toy" / "fake-4" / "P0" / "a.lock"
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        with item_lock(store, "toy", "fake-4", "P0", "a") as again:
            assert not again  # held by a live process (this one)
        # the runner skips an item another live writer holds
        m = load_manifest(cohort / "m.csv")
        s = run_extraction(m.rows, _spec(), store, progress=False)
        assert [o.status for o in s.outcomes if o.patient_id == "P0"] == ["locked"]
    assert not lock.exists()
    # a stale lock of a dead process on this host is cleared
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "x"}))
    with item_lock(store, "toy", "fake-4", "P0", "a") as held:
        assert held


@pytest.mark.slow
def test_dask_local_cluster_equals_in_process(cohort: Path) -> None:
    m = load_manifest(cohort / "m.csv")
    a = run_extraction(m.rows, _spec(), cohort / "a.zarr", progress=False)
    b = run_extraction(m.rows, _spec(), cohort / "b.zarr", scheduler="local", workers=2, progress=False)
    assert [(o.patient_id, o.status) for o in a.outcomes] == [(o.patient_id, o.status) for o in b.outcomes]
    sa, sb = open_store(cohort / "a.zarr", "r"), open_store(cohort / "b.zarr", "r")
    assert list(sa.iter_items()) == list(sb.iter_items())
    for k in sa.iter_items():
        np.testing.assert_array_equal(sa.read_item(*k.__dict__.values()).features,
                                      sb.read_item(*k.__dict__.values()).features)
