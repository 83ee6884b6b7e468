"""``fit`` under faults (issue 13): the run folder is locked and replaced whole only at the end, so a second
writer, an existing run, a full disk (injected ENOSPC and a real small tmpfs), a read-only folder and
SIGINT / SIGTERM each leave the previous run byte-identical, no staging folder and no lock behind; plus the
lock and signal plumbing (:mod:`mmcli.pipeline.locks`, :mod:`mmcli.pipeline.signals`) on their own."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.planted_data import make_store
from mmcli.pipeline import faults
from mmcli.pipeline.errors import DiskFullError, RunFolderError
from mmcli.pipeline.io import is_disk_full
from mmcli.pipeline.locks import LockHeld, PidLock
from mmcli.pipeline.rundir import RunWriter, load_run, lock_path
from mmcli.pipeline.signals import Interrupted, critical, stop_on_signals
from mmcli.stages.fit import fit

MMCLI = str(Path(sys.executable).with_name("mmcli"))
XGB = {"n_estimators": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fitfaults")
    p = make_store(d / "s.zarr", n=16, task="binary", seed=31, modalities=("wsi", "genes"))
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    return p, d / "labels.csv"


def _fit(data, out: Path, **kw):
    p, labels = data
    return fit("xgboost", p.store, labels, out, target="label", folds=2, n_boot=5, params=XGB, **kw)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _only_the_run(parent: Path, name: str = "run") -> None:
    """Nothing beside the run folder: no staging folder, no old run set aside, no lock."""
    assert sorted(p.name for p in parent.iterdir()) == [name]


@pytest.fixture
def old_run(data, tmp_path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "runs" / "run"
    _fit(data, out)
    (out / "report.html").write_text("<html>the old run's report</html>")
    return out, _snapshot(out)


# ---- run folders: refuse, overwrite, lock -----------------------------------------------------------------------
def test_existing_run_is_refused_before_any_work_and_overwrite_replaces_it_whole(data, old_run):
    out, before = old_run
    with pytest.raises(RunFolderError, match=r"already exists and is not empty.*Fix: pass --overwrite"):
        _fit(data, out)
    assert _snapshot(out) == before
    doc = _fit(data, out, overwrite=True, seed=1)
    assert not (out / "report.html").exists()  # nothing of the old run is left
    assert load_run(out).config["seed"] == 1 and doc["seed"] == 1
    _only_the_run(out.parent)


def test_overwrite_never_replaces_a_folder_that_is_not_a_run(data, tmp_path):
    home = tmp_path / "mine"
    home.mkdir()
    (home / "thesis.docx").write_bytes(b"precious")
    with pytest.raises(RunFolderError, match=r"is not a run folder of `mmcli fit`.*only replaces run folders"):
        _fit(data, home, overwrite=True)
    assert (home / "thesis.docx").read_bytes() == b"precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    _fit(data, empty)  # an empty folder is fine
    assert (empty / "metrics.json").is_file()


def test_out_that_cannot_be_a_folder_is_refused(data, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match="exists and is not a folder"):
        _fit(data, tmp_path / "afile")
    with pytest.raises(RunFolderError, match=r"afile is a file, not a folder"):
        _fit(data, tmp_path / "afile" / "run")


def test_a_live_writer_holds_the_run_and_a_dead_ones_lock_and_staging_are_cleared(data, old_run):
    out, before = old_run
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host "holds" the lock
    try:
        lock_path(out).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                              "started": "2025-01-01T00:00:00", "command": "mmcli fit",
                                              "token": "x"}))
        with pytest.raises(RunFolderError, match=rf"another mmcli fit \(pid {holder.pid} on .*is writing this run "
                                                 r"folder. Fix: wait for it to finish, or choose another --out"):
            _fit(data, out, overwrite=True)
        assert _snapshot(out) == before and lock_path(out).is_file()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (a SIGKILLed fit): its lock is stale, and so is the staging folder it left
    stage = out.with_name(f".{out.name}.fit-{holder.pid}.new")
    stage.mkdir()
    (stage / "config.json").write_text("{half")
    _fit(data, out, overwrite=True)
    _only_the_run(out.parent)


def test_an_old_run_set_aside_by_a_writer_that_died_mid_swap_is_put_back(data, old_run):
    out, before = old_run
    aside = out.with_name(f".{out.name}.fit-999999999.old")
    os.rename(out, aside)  # the moment between the two renames of a swap
    with pytest.raises(RunFolderError, match="--overwrite"):  # restored, so it is an existing run again
        _fit(data, out)
    assert _snapshot(out) == before
    _only_the_run(out.parent)


def test_second_fit_into_the_same_out_exits_2_naming_the_first(data, old_run):
    """Two real ``mmcli fit`` processes: the first holds the run (frozen by MMCLI_FAULT=run.model:1:stop
    inside its write), the second is refused naming it; the first, killed there, leaves the old run."""
    out, before = old_run
    p, labels = data
    args = [MMCLI, "fit", "--head", "xgboost", "--store", str(p.store), "--labels", str(labels), "--out", str(out),
            "--target", "label", "--folds", "2", "--n-boot", "5", "--param", "n_estimators=5", "--overwrite"]
    first = subprocess.Popen(args, env={**os.environ, faults.ENV: "run.model:1:stop"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(first.pid)
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"another mmcli fit (pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        assert _snapshot(out) == before
    finally:
        first.kill()
        first.communicate()
    assert _snapshot(out) == before  # SIGKILL inside the write: the old run is as it was


# ---- disk full -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["run.model", "run.staged"])
def test_injected_enospc_exits_disk_full_and_keeps_the_old_run(data, old_run, monkeypatch, point):
    out, before = old_run
    monkeypatch.setenv(faults.ENV, f"{point}:1:enospc")
    faults._hits.clear()
    with pytest.raises(DiskFullError, match=rf"^disk full: {out}.*is as it was"):
        _fit(data, out, overwrite=True)
    assert _snapshot(out) == before
    _only_the_run(out.parent)


def test_xgboost_save_on_a_full_disk_is_disk_full_not_an_xgboost_error(data, old_run, monkeypatch):
    """xgboost reports ENOSPC as ``XGBoostError: ... FileStream.Write incomplete`` (no errno): detected."""
    import xgboost as xgb

    out, before = old_run

    def full(self, fname):  # what a real full disk gives (seen on a 512 KB tmpfs)
        raise xgb.core.XGBoostError("[12:00:00] dmlc-core/src/io/local_filesys.cc:37: Check failed: "
                                    "std::fwrite(ptr, 1, size, fp_) == size: FileStream.Write incomplete")

    monkeypatch.setattr(xgb.Booster, "save_model", full)
    with pytest.raises(DiskFullError, match="disk full"):
        _fit(data, out, overwrite=True)
    assert _snapshot(out) == before
    _only_the_run(out.parent)
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(ValueError("bad value"))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_full_disk_small_tmpfs(data, tmp_path):
    with _tmpfs(tmp_path / "small", "1m") as mnt:
        out = mnt / "run"
        _fit(data, out)
        before = _snapshot(out)
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 8192))
        with pytest.raises(DiskFullError, match=rf"^disk full: {out}"):
            _fit(data, out, overwrite=True)
        assert _snapshot(out) == before
        assert sorted(p.name for p in mnt.iterdir()) == ["filler", "run"]
        (mnt / "filler").unlink()
        _fit(data, out, overwrite=True)  # space again: the re-run works
        assert load_run(out).metrics is not None


def test_a_full_disk_while_taking_the_lock_leaves_no_lock_file(data, tmp_path):
    """Issue 25, item 11: with no byte free, writing the run lock fails; the fit exits disk full and leaves
    neither the lock nor its temporary file (before: ``.run.lock.<token>.tmp`` stayed)."""
    with _tmpfs(tmp_path / "full", "1m") as mnt:
        with open(mnt / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
        with pytest.raises(DiskFullError, match=rf"^disk full: {mnt / 'run'}"):
            _fit(data, mnt / "run")
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]


def test_read_only_folder_is_a_clear_error(data, tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", readonly=True) as mnt, pytest.raises(
            RunFolderError, match=r"cannot write there \(Read-only file system.*Fix: choose an --out"):
        _fit(data, mnt / "run")


# ---- signals ---------------------------------------------------------------------------------------------------
def _wait_stopped(pid: int, timeout: float = 300) -> None:
    """Until process ``pid`` is stopped (state T, after MMCLI_FAULT=...:stop)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "T":
            return
        if state == "Z":
            raise AssertionError(f"process {pid} exited instead of stopping")
        time.sleep(0.2)
    raise AssertionError(f"process {pid} did not stop within {timeout}s")


def test_sigterm_while_training_exits_143_and_leaves_the_old_run(data, old_run):
    """A real SIGTERM from outside while the (long) cross-validation runs."""
    out, before = old_run
    p, labels = data
    args = [MMCLI, "fit", "--head", "attention_mil", "--store", str(p.store), "--labels", str(labels), "--out",
            str(out), "--target", "label", "--folds", "2", "--n-boot", "5", "--param", "epochs=100000",
            "--overwrite"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not lock_path(out).exists():  # the lock is taken once the inputs are checked
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 300
            time.sleep(0.2)
        time.sleep(2.0)  # inside loading / training now
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert f"error: interrupted by SIGTERM: nothing was written; {out} is as it was" in stderr
    assert "Traceback" not in stdout + stderr
    assert _snapshot(out) == before
    _only_the_run(out.parent)


@pytest.mark.parametrize(("how", "code", "name"), [("term", 143, "SIGTERM"), ("int", 130, "SIGINT")])
def test_signal_with_the_new_run_staged_keeps_the_old_one(data, old_run, how, code, name):
    """The signal arrives at the last moment before the swap (MMCLI_FAULT run.staged: the new run is complete
    in its staging folder): still all or nothing -- the old run stays, the staging folder goes."""
    out, before = old_run
    p, labels = data
    args = [MMCLI, "fit", "--head", "xgboost", "--store", str(p.store), "--labels", str(labels), "--out", str(out),
            "--target", "label", "--folds", "2", "--n-boot", "5", "--param", "n_estimators=5", "--overwrite"]
    r = subprocess.run(args, env={**os.environ, faults.ENV: f"run.staged:1:{how}"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == code, r.stderr
    assert f"error: interrupted by {name}: nothing was written" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert _snapshot(out) == before
    _only_the_run(out.parent)


def test_critical_section_holds_a_signal_until_it_ends():
    hits = []
    with pytest.raises(Interrupted) as e, stop_on_signals():
        with critical():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            hits.append("inside finished")  # the signal did not cut the block
        hits.append("never")
    assert hits == ["inside finished"] and e.value.exit_code == 143 and e.value.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


# ---- the lock file --------------------------------------------------------------------------------------------
def test_pid_lock_format_stale_and_foreign_locks(tmp_path):
    path = tmp_path / ".run.lock"
    with PidLock(path, "mmcli fit") as lock:
        doc = json.loads(path.read_text())
        assert doc["pid"] == os.getpid() and doc["host"] == socket.gethostname() and doc["command"] == "mmcli fit"
        assert lock.held and set(doc) == {"pid", "host", "started", "command", "token"}
        with pytest.raises(LockHeld, match=rf"held by mmcli fit \(pid {os.getpid()}"):
            PidLock(path).acquire()  # a live holder, even this very process
    assert not path.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x", "token": "t"}))
    PidLock(path).acquire().release()  # a dead local holder: stale, taken over
    path.write_text(json.dumps({"pid": 1, "host": "another-host-" + uuid.uuid4().hex, "started": "x"}))
    with pytest.raises(LockHeld):  # another host's lock is honoured
        PidLock(path).acquire()
    path.write_text("")  # a lock nobody can read: taken over once older than a minute
    with pytest.raises(LockHeld):
        PidLock(path).acquire()
    os.utime(path, (time.time() - 120, time.time() - 120))
    lock = PidLock(path).acquire()
    path.write_text(json.dumps({"pid": 1, "host": "h", "token": "someone else"}))
    lock.release()  # never removes a lock that is no longer ours
    assert path.exists()


def test_writer_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ZeroDivisionError), RunWriter(out) as w:
        w.begin()
        assert lock_path(out).exists() and w.stage.is_dir()
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []
