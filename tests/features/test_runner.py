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


# ---- issue 13: a full disk, signals, missing files, long problem lists ---------------------------------------
@pytest.fixture
def fault_env(monkeypatch: pytest.MonkeyPatch):
    """Set ``MMCLI_FAULT`` for this process with fresh hit counts."""
    from mmcli.pipeline import faults

    def set_fault(spec: str) -> None:
        faults._hits.clear()
        monkeypatch.setenv("MMCLI_FAULT", spec)

    yield set_fault
    faults._hits.clear()


@pytest.mark.parametrize("store_name", ["s.zarr", "s.h5"])
def test_first_full_disk_stops_the_run(cohort: Path, fault_env, store_name: str) -> None:
    """ENOSPC while writing the 2nd item: that item fails with "disk full: <store> (needs about N MB more)", the
    rest are not attempted, no lock or staging is left, the run record is valid; the re-run finishes the cohort
    and equals a clean run."""
    (cohort / "f2.txt").write_bytes(b"item2")
    m = load_manifest(cohort / "m.csv")
    store = cohort / store_name
    fault_env("store.staged:2:enospc")
    s = run_extraction(m.rows, _spec(), store, missing=m.missing, progress=False)
    assert [o.status for o in s.outcomes] == ["missing", "done", "failed", "skipped", "skipped", "skipped", "skipped"]
    assert s.exit_code == 1
    assert s.stopped.startswith(f"disk full: {store} (needs about 1 MB more)") and "Fix: free space" in s.stopped
    lines = s.lines()
    assert f"stopped: disk full: {store}" in "\n".join(lines) and "Traceback" not in "\n".join(lines)
    rec = json.loads(Path(s.record_path).read_text())
    assert (rec["done"], rec["failed"], rec["skipped"], rec["exit_code"]) == (1, 1, 4, 1)
    assert rec["stopped"] == s.stopped
    assert list(lock_dir(store).rglob("*.lock")) == []
    assert open_store(store, "r").verify() == []

    fault_env("")
    again = run_extraction(m.rows, _spec(), store, progress=False)
    assert (again.count("done"), again.count("cached"), again.exit_code) == (5, 1, 0)
    clean = run_extraction(m.rows, _spec(), cohort / ("clean" + Path(store_name).suffix), progress=False)
    a, b = open_store(store, "r"), open_store(clean.store, "r")
    assert list(a.iter_items()) == list(b.iter_items())
    for k in a.iter_items():
        np.testing.assert_array_equal(a.read_item(*k.__dict__.values()).features,
                                      b.read_item(*k.__dict__.values()).features)


def test_full_disk_for_the_run_record_leaves_none(cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No space for the run record: the summary says so, and no truncated or temporary JSON is left."""
    import errno

    import mmcli.pipeline.io as io

    real = io.atomic_write_bytes

    def full(path, data):
        if ".runs" in str(path):
            with io.atomic_path(path) as tmp:
                tmp.write_bytes(data[:100])
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(path, data)

    monkeypatch.setattr(io, "atomic_write_bytes", full)
    m = load_manifest(cohort / "m.csv")
    store = cohort / "s.zarr"
    s = run_extraction(m.rows, _spec(), store, progress=False)
    assert s.record_path == "" and s.record_error.startswith("disk full: ")
    assert s.lines()[-1].startswith("run record: not written (disk full: ")
    assert list((cohort / "s.zarr.runs").iterdir()) == []


def test_sigterm_between_items_stops_gracefully(cohort: Path, fault_env) -> None:
    """SIGTERM (sent to this very process after the first item) stops the run: 143, the rest skipped, the record
    written; the handlers are restored afterwards."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    m = load_manifest(cohort / "m.csv")
    fault_env("item.after:1:term")
    s = run_extraction(m.rows, _spec(), cohort / "s.zarr", progress=False)
    assert s.exit_code == 143 and s.signal == signal.SIGTERM
    assert [o.status for o in s.outcomes] == ["done"] + ["skipped"] * 5
    assert s.stopped.startswith("SIGTERM: 0 item(s) abandoned unwritten, 5 not started")
    assert json.loads(Path(s.record_path).read_text())["exit_code"] == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert list(lock_dir(cohort / "s.zarr").rglob("*.lock")) == []


def test_run_control_abandons_an_item_at_its_next_unit_of_work() -> None:
    import signal

    from mmcli.features.runner import ItemInterrupted, RunControl

    c = RunControl()
    c.check()  # nothing asked: no-op
    with c.item():
        c.request(signal.SIGINT)
        with pytest.raises(ItemInterrupted, match="SIGINT"):
            c.check()
        with pytest.raises(ItemInterrupted):  # a second signal abandons the item at once
            c.request(signal.SIGTERM)
    c.check()  # outside an item a stop request never raises
    assert c.signum == signal.SIGINT


def test_missing_files_are_checked_before_the_encoder_is_built(tmp_path: Path) -> None:
    """A manifest of only missing files never builds the spec (no encoder import or load); the console lists the
    first 20 problems and points to the run record, which holds all of them."""
    lines = ["patient_id,modality,path,item_id"] + [f"P{i},toy,gone{i}.txt,a" for i in range(45)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    m = load_manifest(tmp_path / "m.csv")

    def no_spec() -> ExtractorSpec:
        raise AssertionError("the encoder spec was built for a run with no file to read")

    s = run_extraction(m.rows, no_spec, tmp_path / "s.zarr", missing=m.missing, progress=False, modality="toy")
    assert s.count("missing") == 45 and s.exit_code == 1 and s.encoder_id == ""
    out = s.lines()
    listed = [x for x in out if x.startswith("  missing: ")]
    assert len(listed) == 20 and listed[0].startswith("  missing: P0/a (manifest line 2")
    assert "  ... 25 more not listed (failed 0, missing 45 in all): all 45 in the run record" in out
    assert out[0].startswith("toy [encoder not loaded] -> ")
    assert len(json.loads(Path(s.record_path).read_text())["outcomes"]) == 45
    # a file that disappeared after the manifest was read is also caught before the spec is built
    (tmp_path / "late.txt").write_text("x")
    (tmp_path / "m2.csv").write_text("patient_id,modality,path,item_id\nP0,toy,late.txt,a\n")
    m2 = load_manifest(tmp_path / "m2.csv")
    (tmp_path / "late.txt").unlink()
    s2 = run_extraction(m2.rows, no_spec, tmp_path / "s.zarr", progress=False, modality="toy")
    assert [o.status for o in s2.outcomes] == ["missing"]



# ---- issue 25: resume checks the data, a read-only store stops the run, provenance comes back -----------------
def _first_chunk(store: Path, pid: str) -> Path:
    return store / "toy" / "fake-4" / pid / "a" / "features" / "c" / "0" / "0"


@pytest.mark.parametrize("damage", ["deleted", "swapped"])
def test_resume_redoes_an_item_with_a_lost_or_changed_chunk(cohort: Path, damage: str) -> None:
    """A features chunk deleted (it would read as zeros) or replaced by another item's valid chunk: the re-run
    calls only that item not cached and extracts it again; the store is then whole."""
    import shutil

    (cohort / "f2.txt").write_bytes(b"item2")
    (cohort / "f3.txt").write_bytes(b"other")  # features unlike P0's
    m = load_manifest(cohort / "m.csv")
    store = cohort / "s.zarr"
    assert run_extraction(m.rows, _spec(), store, progress=False).count("done") == 6
    want = open_store(store, "r").read_item("toy", "fake-4", "P3", "a").features
    if damage == "deleted":
        _first_chunk(store, "P3").unlink()
    else:
        shutil.copyfile(_first_chunk(store, "P0"), _first_chunk(store, "P3"))
    assert open_store(store, "r").verify()[0].where == "/toy/fake-4/P3/a"
    again = run_extraction(m.rows, _spec(), store, progress=False)
    assert [(o.patient_id, o.status) for o in again.outcomes if o.status != "cached"] == [("P3", "done")]
    assert again.exit_code == 0
    s = open_store(store, "r")
    assert s.verify() == []
    np.testing.assert_array_equal(s.read_item("toy", "fake-4", "P3", "a").features, want)


def test_a_read_only_store_stops_the_run_at_the_first_refused_write(cohort: Path, fault_env) -> None:
    """EROFS on the first write (as ``import --force`` on a read-only mount meets it): one failed item, the rest
    not attempted, one message saying what and the fix, exit 2 (before: every item failed, exit 1)."""
    m = load_manifest(cohort / "m.csv")
    store = cohort / "s.zarr"
    fault_env("store.staged:1:erofs")
    s = run_extraction(m.rows, _spec(), store, force=True, progress=False)
    assert [o.status for o in s.outcomes] == ["failed"] + ["skipped"] * 5
    assert s.outcomes[0].reason.startswith("not written: read-only file system")
    assert {o.reason for o in s.outcomes[1:]} == {"not started: the store is on a read-only file system"}
    assert s.exit_code == 2 and s.stopped.startswith(f"{store}: read-only file system: nothing can be written")
    text = "\n".join(s.lines())
    assert text.count("read-only file system: nothing can be written") == 1 and "Traceback" not in text
    assert list(lock_dir(store).rglob("*.lock")) == []


def test_read_only_mount_stops_at_the_first_item(cohort: Path) -> None:
    """The same on a real read-only file system (a tmpfs remounted read-only), with ``--force``."""
    import shutil
    import subprocess

    mnt = cohort / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        m = load_manifest(cohort / "m.csv")
        assert run_extraction(m.rows, _spec(), mnt / "s.zarr", progress=False).count("done") == 5
        shutil.rmtree(mnt / "s.zarr.runs")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
        s = run_extraction(m.rows, _spec(), mnt / "s.zarr", force=True, missing=m.missing, progress=False)
        assert [o.status for o in s.outcomes] == ["missing", "failed"] + ["skipped"] * 5 and s.exit_code == 2
        assert "read-only file system" in s.stopped and s.record_error
        # without --force the cached items are read as usual; the first item that needs writing stops the run
        again = run_extraction(m.rows, _spec(), mnt / "s.zarr", progress=False)
        assert [o.status for o in again.outcomes] == ["cached", "cached", "failed"] + ["skipped"] * 3
        assert again.exit_code == 2
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_provenance_reset_by_repair_comes_back_with_the_next_run(cohort: Path) -> None:
    """``verify --repair`` resets unreadable encoder metadata to {}; the next run restores it even though every
    item is cached (before: it stayed {} for good)."""
    m = load_manifest(cohort / "m.csv")
    store = cohort / "s.zarr"
    run_extraction(m.rows, _spec(), store, progress=False)
    (store / "toy" / "fake-4" / "zarr.json").write_text('{"zarr_format": 3, "node')
    s = open_store(store)
    s.repair()
    assert s.encoder_attrs("toy", "fake-4") == {}
    again = run_extraction(m.rows, _spec(), store, progress=False)
    assert again.count("done") == 0 and again.count("cached") == 5
    assert open_store(store, "r").encoder_attrs("toy", "fake-4") == {"encoder": "fake", "dim": 4}
