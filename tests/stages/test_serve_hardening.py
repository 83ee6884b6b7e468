"""Issue 25, items 3-8 and 11: the audit trail under ``fit --overwrite``, a vanished log, a full disk and a
second writer; the connection limits and timeouts; the token throttle; a port out of range. Each test
reproduces the finding as the probe saw it (real server on loopback, real files, real processes)."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from helpers.serving import AUTH, FIT_ARGS, KEY, KEY_BYTES, TOKEN, running, table_run
from mmcli.cli import app as cli_app
from mmcli.pipeline.errors import InputError, RunFolderError
from mmcli.pipeline.rundir import RunWriter
from mmcli.stages.serve import audit as audit_mod
from mmcli.stages.serve.app import create_app
from mmcli.stages.serve.audit import AuditLog, AuditUnavailable, log_files
from mmcli.stages.serve.auth import AuthThrottle
from mmcli.stages.serve.options import ServeOptions
from mmcli.stages.serve.server import default_audit_log
from mmcli.stages.serve.service import ServedModel
from mmcli.stages.serve.verify import verify_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path, Path]:
    return table_run(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def served(fitted) -> ServedModel:
    run, store, _ = fitted
    return ServedModel(run, store)


def _predict(url: str, pid: str = "T03") -> httpx.Response:
    return httpx.post(url + "/predict", json={"patient_id": pid}, headers=AUTH, timeout=30)


# ---- item 3: fit --overwrite and a vanished log ------------------------------------------------------------
def test_the_default_audit_log_is_beside_the_run_and_survives_fit_overwrite(fitted, tmp_path):
    run, store, labels = fitted
    target = tmp_path / "run"
    res = CliRunner().invoke(cli_app, ["fit", "--store", str(store), "--labels", str(labels), "--out", str(target),
                                       *FIT_ARGS])
    assert res.exit_code == 0, res.output
    path = default_audit_log(target)
    assert path == tmp_path / "run.audit" / "audit.log"  # not inside the run folder
    audit = AuditLog(path, KEY)
    for i in range(3):
        audit.append({"request_id": f"r{i}", "output": {}})
    audit.close()
    res = CliRunner().invoke(cli_app, ["fit", "--store", str(store), "--labels", str(labels), "--out", str(target),
                                       "--overwrite", *FIT_ARGS])
    assert res.exit_code == 0, res.output
    assert verify_log(path, KEY).lines == 3


def test_fit_overwrite_refuses_a_run_that_holds_an_audit_log(fitted, tmp_path):
    """The probe's case: the log was RUN/audit/audit.log (the old default) and `fit --overwrite` deleted it."""
    run, store, labels = fitted
    target = tmp_path / "run"
    res = CliRunner().invoke(cli_app, ["fit", "--store", str(store), "--labels", str(labels), "--out", str(target),
                                       *FIT_ARGS])
    assert res.exit_code == 0, res.output
    path = target / "audit" / "audit.log"
    audit = AuditLog(path, KEY)
    for i in range(5):
        audit.append({"request_id": f"r{i}", "output": {}})
    audit.close()
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    res = CliRunner().invoke(cli_app, ["fit", "--store", str(store), "--labels", str(labels), "--out", str(target),
                                       "--overwrite", *FIT_ARGS])
    assert res.exit_code == 2 and "holds the audit log of `mmcli serve`" in res.output, res.output
    assert str(path) in res.output and "internal error" not in res.output
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before and verify_log(path, KEY).lines == 5
    with pytest.raises(RunFolderError, match="--overwrite would delete it"):
        RunWriter(target, overwrite=True).open()


def test_a_server_whose_log_vanishes_fails_closed(served, tmp_path):
    """The probe's server went on logging into the deleted file: now every later request is a 503."""
    path = tmp_path / "logs" / "audit.log"
    audit = AuditLog(path, KEY)
    try:
        with running(create_app(served, TOKEN, audit)) as url:
            assert _predict(url).status_code == 200
            assert httpx.get(url + "/health").json()["status"] == "ok"
            path.unlink()  # what `fit --overwrite` did to RUN/audit/
            for _ in range(2):
                r = _predict(url)
                assert r.status_code == 503 and r.json()["message"] == "audit log unavailable"
                assert r.headers["retry-after"]
            h = httpx.get(url + "/health")
            assert h.status_code == 503 and h.json() == {**h.json(), "status": "unavailable",
                                                         "reason": "audit log unavailable"}
            assert str(tmp_path) not in h.text + r.text  # no paths to clients
            assert not path.exists()  # not silently re-created: a restart after `audit verify` is the way back
            assert "removed or replaced" in audit.problem and "seq 1" in audit.problem
    finally:
        audit.close()


def test_a_replaced_log_or_head_is_noticed_too(tmp_path):
    path = tmp_path / "audit.log"
    audit = AuditLog(path, KEY)
    audit.append({"request_id": "a", "output": {}})
    head = tmp_path / "audit.log.head"
    head.rename(tmp_path / "old.head")
    head.write_bytes((tmp_path / "old.head").read_bytes())  # same content, another file
    with pytest.raises(AuditUnavailable, match="audit log unavailable"):
        audit.append({"request_id": "b", "output": {}})
    audit.close()


# ---- item 4: a full disk -------------------------------------------------------------------------------------
class _FillingDisk:
    """``os`` for the audit module where the disk fills up: the next ``write`` writes ``short`` bytes, the one
    after fails with ENOSPC (what the probe saw: a line cut at 4,096 bytes); everything else is the real os."""

    def __init__(self, short: int) -> None:
        self.short, self.calls = short, 0

    def write(self, fd: int, data) -> int:
        self.calls += 1
        if self.calls == 1:
            return os.write(fd, bytes(data[: self.short]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str):
        return getattr(os, name)


def test_a_line_cut_by_a_full_disk_is_undone_and_answered_503(served, tmp_path, monkeypatch):
    path = tmp_path / "audit.log"
    audit = AuditLog(path, KEY)
    try:
        with running(create_app(served, TOKEN, audit)) as url:
            assert _predict(url).status_code == 200
            size = path.stat().st_size
            disk = _FillingDisk(short=100)
            monkeypatch.setattr(audit_mod, "os", disk)
            r = _predict(url)
            assert disk.calls == 2 and r.status_code == 503, r.text
            assert r.json()["message"] == "audit log unavailable (disk full)" and "T03" not in r.text
            assert path.stat().st_size == size  # the 100 bytes written were cut off again
            monkeypatch.setattr(audit_mod, "os", os)  # space is back
            assert _predict(url).status_code == 200 and httpx.get(url + "/health").status_code == 200
    finally:
        audit.close()
    res = verify_log(path, KEY)  # not "cut or edited": the chain goes on after the failed line
    assert res.lines == 2 and not res.notes
    AuditLog(path, KEY).close()  # and a restarted server continues it


def test_a_real_file_size_limit_mid_line_leaves_a_valid_log(tmp_path):
    """The kernel's own short write: RLIMIT_FSIZE makes write() stop mid-line (then EFBIG), as a filling disk
    does. The child process writes until it is refused; the log it leaves verifies and can be continued."""
    path = tmp_path / "audit.log"
    (tmp_path / "k").write_bytes(KEY_BYTES)
    child = textwrap.dedent(f"""
        import resource, signal, sys
        from mmcli.stages.serve.audit import AuditKey, AuditLog, AuditUnavailable
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = AuditLog({str(path)!r}, AuditKey(open({str(tmp_path / "k")!r}, "rb").read()))
        log.append({{"request_id": "first", "output": {{}}}})
        limit = log._size + 150  # the next line (about 300 bytes) gets cut after 150 bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            log.append({{"request_id": "second", "output": {{"x": "y" * 60}}}})
        except AuditUnavailable as e:
            print("refused", e, log._size, limit)
        log.close()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused audit log unavailable (file size limit reached)"), out.stdout
    good = int(out.stdout.split()[-2])
    assert path.stat().st_size == good  # cut back to the last good line
    assert verify_log(path, KEY).lines == 1
    audit = AuditLog(path, KEY)
    audit.append({"request_id": "third", "output": {}})
    audit.close()
    assert verify_log(path, KEY).lines == 2


# ---- item 5: two writers -------------------------------------------------------------------------------------
def test_a_second_writer_on_the_same_log_is_refused(tmp_path):
    """Two servers on one log gave 150 duplicated sequence numbers: the log is now locked (flock) while open."""
    path = tmp_path / "audit.log"
    (tmp_path / "k").write_bytes(KEY_BYTES)
    child = textwrap.dedent(f"""
        import sys, time
        from mmcli.stages.serve.audit import AuditKey, AuditLog
        log = AuditLog({str(path)!r}, AuditKey(open({str(tmp_path / "k")!r}, "rb").read()))
        print("open", flush=True)
        sys.stdin.readline()
        log.close()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(InputError, match=rf"another `mmcli serve` \(pid {proc.pid}\) is writing this audit log"):
            AuditLog(path, KEY)
    finally:
        proc.communicate("\n", timeout=60)
    AuditLog(path, KEY).close()  # free again once the first writer is gone


def test_mmcli_serve_refuses_a_log_another_server_writes(fitted, tmp_path):
    run, store, _ = fitted
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    key, log = tmp_path / "keys" / "audit.key", tmp_path / "logs" / "audit.log"
    held = AuditLog(log, KEY)
    try:
        res = CliRunner().invoke(cli_app, ["serve", "--model", str(run), "--token-file", str(token), "--port", "0",
                                           "--audit-log", str(log), "--audit-key", str(key)])
    finally:
        held.close()
    assert res.exit_code == 2 and "is writing this audit log" in res.output, res.output


# ---- items 6 and 7: store patients: read alone, store faults -----------------------------------------------------
@pytest.fixture(scope="module")
def bag_run(tmp_path_factory) -> tuple[Path, Path]:
    """xgboost on a wsi bag (mean-pooled) and a table, fit on 20 planted patients with 1-3 slides each."""
    from helpers.planted_data import make_store
    from mmcli.stages.fit import fit

    d = tmp_path_factory.mktemp("bag_run")
    p = make_store(d / "s.zarr", n=20, task="binary", seed=7, dim=8, tiles=(3, 6), modalities=("wsi", "genes"))
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    fit("xgboost", p.store, d / "labels.csv", d / "run", target="label", folds=2, n_boot=2,
        params={"n_estimators": 3, "max_depth": 1})
    return d / "run", p.store


def test_a_store_patient_is_read_without_listing_the_store(bag_run, tmp_path, monkeypatch):
    """Each by-id /predict listed every item of the store (60 ms at 60 items, 300-430 ms at 2,000; an unknown id
    cost the same before its 404). Now only the patient's own group is read: listing the store fails the test."""
    from mmcli.pipeline.store import FeatureStore
    from mmcli.stages.predict import predict

    run, store = bag_run
    ref = predict(run, store, tmp_path / "ref.csv").set_index("patient_id")
    served = ServedModel(run, store)

    def listed(*a, **k):
        raise AssertionError("a by-id request listed the store")

    monkeypatch.setattr(FeatureStore, "iter_items", listed)
    for pid in ("P003", "P011"):
        out = served.score(served.from_store(pid), top_k=3)
        assert out["probabilities"]["pos"] == pytest.approx(ref.loc[pid, "prob_pos"], abs=1e-6)
    with pytest.raises(InputError, match="none of the model's modalities"):  # an unknown id: its 404
        served.from_store("NOPE")


def test_store_faults_are_a_503_with_a_short_reason(bag_run, tmp_path):
    """A corrupt chunk or a planted symlink gave a 500 for every by-id request. Now: 503 for that patient, with
    no path in the answer; the others are still scored; /health stays ok (the audit log is fine)."""
    import shutil

    run, store = bag_run
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    patients = copy / "wsi" / "enc-wsi"
    for f in (p for p in (patients / "P003").rglob("*") if p.is_file() and "/features/c/" in p.as_posix()):
        f.write_bytes(b"\x00garbage" * 7)  # a damaged chunk
    shutil.rmtree(patients / "P004")
    (patients / "P004").symlink_to(patients / "P005")  # a planted link in place of a patient's group
    served = ServedModel(run, copy)
    audit = AuditLog(tmp_path / "audit.log", KEY)
    try:
        with running(create_app(served, TOKEN, audit)) as url:
            for pid in ("P003", "P004"):
                r = _predict(url, pid)
                assert r.status_code == 503, r.text
                assert r.json()["message"] == "store unavailable: this patient's features cannot be read"
                assert str(tmp_path) not in r.text and r.headers["retry-after"]
            assert _predict(url, "P006").status_code == 200
            assert _predict(url, "NOPE").status_code == 404
            assert httpx.get(url + "/health").status_code == 200
    finally:
        audit.close()
    assert verify_log(tmp_path / "audit.log", KEY).lines == 1  # only the answered prediction


# ---- item 7: connection limits and timeouts ------------------------------------------------------------------
def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_and_slow_clients_are_disconnected(served, tmp_path):
    """1,100 idle half-open connections were held with no timeout: now each must send a whole request within
    --request-timeout-s."""
    opts = ServeOptions(request_timeout_s=0.5)
    audit = AuditLog(tmp_path / "audit.log", KEY)
    try:
        with running(create_app(served, TOKEN, audit, opts), opts) as url:
            port = int(url.rsplit(":", 1)[1])
            silent = socket.create_connection(("127.0.0.1", port))
            half_header = socket.create_connection(("127.0.0.1", port))
            half_header.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            half_body = socket.create_connection(("127.0.0.1", port))
            half_body.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                              + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pat")
            for s in (silent, half_header, half_body):
                assert _closed_by_server(s, within=20), "the server kept a slow connection open"
                s.close()
            # a prompt client is not affected, also on a kept-alive connection past the timeout
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
                assert client.post("/predict", json={"patient_id": "T01"}).status_code == 200
                time.sleep(0.3)
                assert client.post("/predict", json={"patient_id": "T02"}).status_code == 200
    finally:
        audit.close()


def test_connections_over_the_limit_get_503(served, tmp_path):
    opts = ServeOptions(max_concurrency=4)
    audit = AuditLog(tmp_path / "audit.log", KEY)
    try:
        with running(create_app(served, TOKEN, audit, opts), opts) as url:
            port = int(url.rsplit(":", 1)[1])
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
            time.sleep(0.2)
            r = httpx.get(url + "/health", timeout=30)
            assert r.status_code == 503 and r.text == "Service Unavailable"  # uvicorn's limit_concurrency answer
            for s in idle:
                s.close()
            deadline = time.monotonic() + 20
            while httpx.get(url + "/health", timeout=30).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        audit.close()


def test_the_body_limit_follows_the_models_shapes(served, tmp_path):
    """A 60 MB body to a 5-feature model cost 5 s and 640 MB: the limit is now what a valid request can need."""
    opts = ServeOptions()
    limit = opts.body_limit(served.specs)
    assert limit == 5 * 40 + 64 * 1024  # one 5-column table
    audit = AuditLog(tmp_path / "audit.log", KEY)
    try:
        with running(create_app(served, TOKEN, audit, opts), opts) as url:
            r = httpx.post(url + "/predict", content=b" " * (60 * 1024 * 1024), timeout=60,
                           headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["message"]
    finally:
        audit.close()
    assert ServeOptions(max_body_mb=0.01).body_limit(served.specs) == int(0.01 * 1024 * 1024)


# ---- item 8: failed tokens -------------------------------------------------------------------------------------
def test_failed_tokens_are_throttled_per_address(served, tmp_path):
    opts = ServeOptions(auth_failures=3)
    audit = AuditLog(tmp_path / "audit.log", KEY)
    try:
        with running(create_app(served, TOKEN, audit, opts), opts) as url:
            wrong = {"Authorization": "Bearer " + "x" * 43}
            assert [httpx.get(url + "/model", headers=wrong).status_code for _ in range(3)] == [401] * 3
            r = httpx.get(url + "/model", headers=wrong)
            assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 60
            # during the lock-out the token is not even checked: the right one waits too
            assert httpx.get(url + "/model", headers=AUTH).status_code == 429
            assert _predict(url).status_code == 429
            assert httpx.get(url + "/health").status_code == 200  # the open route stays open
    finally:
        audit.close()


def test_the_throttle_forgets_after_its_window_and_bounds_its_memory():
    now = [0.0]
    t = AuthThrottle(limit=2, window_s=60, max_clients=3, clock=lambda: now[0])
    t.failed("a")
    assert t.wait("a") == 0
    t.failed("a")
    assert t.wait("a") == 60 and t.wait("b") == 0
    now[0] = 59.5
    assert t.wait("a") == pytest.approx(0.5)
    now[0] = 60.0
    assert t.wait("a") == 0  # a new window
    for c in "bcdefg":
        t.failed(c)
    assert len(t._seen) <= 3


# ---- item 11: the port ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_refused(fitted, tmp_path, port):
    run, _, _ = fitted
    token = tmp_path / "token"
    token.write_text(TOKEN)
    res = CliRunner().invoke(cli_app, ["serve", "--model", str(run), "--token-file", str(token), "--port", port,
                                       "--audit-log", str(tmp_path / "a" / "audit.log")])
    assert res.exit_code == 2 and "--port" in res.output and "65535" in res.output, res.output
    assert not log_files(tmp_path / "a" / "audit.log")

