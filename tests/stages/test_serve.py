"""``mmcli serve`` against a real uvicorn server on loopback: health, model card, predictions by payload and by
store id (equal to ``mmcli predict``), auth, input validation, and the hash-chained audit log with
``mmcli audit verify`` (intact, edited, cut, reordered, rotated)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from typer.testing import CliRunner

from helpers.planted_data import make_store
from mmcli.cli import app as cli_app
from mmcli.heads.card import build_card, model_sha256
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit
from mmcli.stages.predict import predict
from mmcli.stages.serve.app import bind, create_app, read_token
from mmcli.stages.serve.audit import GENESIS, AuditChainError, AuditLog, log_files, verify_log
from mmcli.stages.serve.schemas import Limits
from mmcli.stages.serve.service import ServedModel

TOKEN = "s3cret-token_for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = Limits(max_instances=64, max_body_bytes=256 * 1024, max_top_k=20, default_top_k=5)


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    p = make_store(d / "s.zarr", n=30, task="binary", seed=21, tiles=(8, 20))
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    fit("fusion_mlp", p.store, d / "labels.csv", d / "run", target="label", folds=2, n_boot=5,
        params={"epochs": 4})
    return p, d


@contextmanager
def running(app) -> Iterator[str]:
    """uvicorn serving ``app`` in a thread on a free loopback port; stopped (and joined) on exit."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(planted, tmp_path_factory):
    p, d = planted
    audit_path = tmp_path_factory.mktemp("audit") / "audit.log"
    served = ServedModel(d / "run", p.store)
    audit = AuditLog(audit_path, max_bytes=4096)  # small: the module's requests rotate it several times
    with running(create_app(served, TOKEN, audit, LIMITS)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, served, audit_path
    audit.close()


def store_payload(store: Path, pid: str, columns: list[str]) -> dict:
    """The patient's features as a client would send them: the wsi bag (items in id order) with coords, the mri
    vector (mean of the sequences), the genes row in the model's column order (NaN -> null)."""
    fs = open_store(store, "r")
    out: dict = {}
    items = sorted(k.item_id for k in fs.iter_items("wsi", "enc-wsi") if k.patient_id == pid)
    if items:
        got = [fs.read_item("wsi", "enc-wsi", pid, i) for i in items]
        out["wsi"] = {"features": np.concatenate([g.features for g in got]).astype(np.float32).tolist(),
                      "coords": np.concatenate([g.coords for g in got]).tolist()}
    seqs = sorted(k.item_id for k in fs.iter_items("mri", "enc-mri") if k.patient_id == pid)
    if seqs:
        rows = np.concatenate([fs.read_item("mri", "enc-mri", pid, s).features for s in seqs])
        out["mri"] = {"features": rows.mean(axis=0, dtype=np.float64).astype(np.float32).tolist(),
                      "encoder_id": "enc-mri"}
    table = fs.read_table("genes")
    row = table.loc[pid, columns].to_numpy(dtype=np.float32)
    out["genes"] = {"features": [None if np.isnan(v) else float(v) for v in row]}
    return out


# ---- the server ---------------------------------------------------------------------------------------------
def test_health_is_open_and_names_the_model(server, planted):
    client, served, _ = server
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "mmcli_version": "0.1.0", "model_sha256": served.sha256}
    assert served.sha256 == model_sha256(planted[1] / "run" / "model")


def test_model_card_needs_the_token_and_equals_the_written_card(server, planted):
    client, served, _ = server
    assert client.get("/model").status_code == 401
    assert client.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/model", headers=AUTH)
    assert r.status_code == 200
    card = r.json()
    assert card == json.loads(json.dumps(build_card(planted[1] / "run")))
    m = card["model"]
    assert (m["head"], m["task"], m["classes"]) == ("fusion_mlp", "classification", ["neg", "pos"])
    assert [s["name"] for s in m["modalities"]] == ["mri", "wsi", "genes"]
    assert m["encoder_ids"] == {"mri": "enc-mri", "wsi": "enc-wsi", "genes": "tabular"}
    assert m["model_sha256"] == served.sha256 and len(m["features_sha256"]) == 64
    assert set(card["metrics"]) >= {"auroc", "brier"} and {"mean", "ci_low", "ci_high"} <= set(card["metrics"]["auroc"])
    # every classification run reports calibration (slope / intercept of its probabilities, no recalibration here)
    assert card["calibration"]["method"] == "none" and card["operating_point"] is None
    assert "P0" not in r.text  # no patient id in the card


def test_predict_by_store_id_and_by_payload_match_mmcli_predict(server, planted, tmp_path):
    client, served, _ = server
    p, d = planted
    ref = predict(d / "run", p.store, tmp_path / "ref.csv").set_index("patient_id")
    columns = [f"g{j}" for j in range(12)]
    pids = ["P000", "P001", "P007", *[q for q in ref.index if ref.loc[q, "missing_modalities"]][:2]]
    for pid in pids:
        by_id = client.post("/predict", json={"patient_id": pid}, headers=AUTH)
        assert by_id.status_code == 200, by_id.text
        by_payload = client.post("/predict", json={"features": store_payload(p.store, pid, columns)}, headers=AUTH)
        assert by_payload.status_code == 200, by_payload.text
        want = ref.loc[pid, ["prob_neg", "prob_pos"]].to_numpy(dtype=float)
        for r in (by_id.json(), by_payload.json()):
            np.testing.assert_allclose([r["probabilities"]["neg"], r["probabilities"]["pos"]], want, atol=1e-6)
            assert r["predicted_class"] == ref.loc[pid, "y_pred"]
            assert ";".join(r["missing_modalities"]) == (ref.loc[pid, "missing_modalities"] or "")
            assert r["model_sha256"] == served.sha256 and r["risk"] is None
        assert by_id.json()["input_sha256"] == by_payload.json()["input_sha256"]  # same features, same hash
        if by_id.json()["modalities_present"]["wsi"]:
            tiles_id, tiles_pl = by_id.json()["attention"]["wsi"], by_payload.json()["attention"]["wsi"]
            assert len(tiles_id) == LIMITS.default_top_k
            att = [t["attention"] for t in tiles_id]
            assert att == sorted(att, reverse=True) and all(0 < a <= 1 for a in att)
            assert tiles_id[0]["item_id"].startswith("slide") and tiles_id[0]["coords"] is not None
            # the payload's bag is the items concatenated: the same tiles, indexed in the bag, same coords
            np.testing.assert_allclose([t["attention"] for t in tiles_pl], att, atol=1e-6)
            assert [t["coords"] for t in tiles_pl] == [t["coords"] for t in tiles_id]


def test_a_patient_with_only_some_modalities_is_flagged(server):
    client, *_ = server
    r = client.post("/predict", json={"features": {"mri": {"features": [0.3] * 8}}, "top_k": 0}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["missing_modalities"] == ["wsi", "genes"] and body["attention"] is None
    assert body["modalities_present"] == {"mri": True, "wsi": False, "genes": False}
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-9


def test_predict_needs_the_right_token(server):
    client, *_ = server
    body = {"patient_id": "P000"}
    assert client.post("/predict", json=body).status_code == 401
    r = client.post("/predict", json=body, headers={"Authorization": f"Bearer {TOKEN}x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post("/predict", json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    # the token is checked before the body is read: an unauthenticated oversize body is a 401, not a 413
    assert client.post("/predict", content=b"x" * (LIMITS.max_body_bytes + 10)).status_code == 401


@pytest.mark.parametrize(("body", "where", "text"), [
    ({"features": {"wsi": {"features": [[0.0] * 7]}}}, "features.wsi.features[0]", "shape (N, 16)"),
    ({"features": {"mri": {"features": [0.0] * 9}}}, "features.mri.features", "at most 8 items"),
    ({"features": {"wsi": {"features": [[0.0] * 16] * 65}}}, "features.wsi.features", "at most 64 items"),
    ({"features": {"wsi": {"features": [[0.0] * 16] * 2, "coords": [[0, 0]]}}}, "features.wsi", "1 coords for 2"),
    ({"features": {"mri": {"features": [0.0] * 8, "encoder_id": "enc-other"}}}, "features.mri", "fit on 'enc-mri'"),
    ({"features": {"ct": {"features": [1.0]}}}, "features.ct", "modalities are ['mri', 'wsi', 'genes']"),
    ({"features": {}}, "body", "holds no modality"),
    ({"patient_id": "P000", "features": {"mri": {"features": [0.0] * 8}}}, "body", "not both"),
    ({"patient_id": "../etc"}, "patient_id", "outside [A-Za-z0-9._-]"),
    ({"patient_id": "P000", "top_k": 21}, "top_k", "less than or equal to 20"),
])
def test_bad_input_is_a_422_naming_the_field(server, body, where, text):
    client, *_ = server
    r = client.post("/predict", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    first = r.json()["detail"][0]
    assert first["loc"] == where and text in r.json()["message"]
    assert "input" not in first  # the raw values are not echoed back


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_values_are_a_422(server, token):
    client, *_ = server
    raw = b'{"features": {"mri": {"features": [%s, 0, 0, 0, 0, 0, 0, 0]}}}' % token
    r = client.post("/predict", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422 and "finite number" in r.json()["message"]
    assert r.json()["detail"][0]["loc"] == "features.mri.features[0]"


def test_an_oversize_body_is_refused_before_parsing(server):
    client, *_ = server
    big = {"features": {"wsi": {"features": [[0.123456789] * 16] * 2000}}}
    r = client.post("/predict", json=big, headers=AUTH)
    assert r.status_code == 413 and "limit of 262144 bytes" in r.json()["message"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(100):
            yield b" " * 4096
    r = client.post("/predict", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_unknown_store_patient_is_a_404_and_a_model_without_store_says_so(server, planted):
    client, *_ = server
    r = client.post("/predict", json={"patient_id": "NOPE1"}, headers=AUTH)
    assert r.status_code == 404 and "none of the model's modalities" in r.json()["message"]
    served = ServedModel(planted[1] / "run")  # no --store
    audit = AuditLog(planted[1] / "nostore" / "a.log")
    with running(create_app(served, TOKEN, audit)) as url:
        r = httpx.post(url + "/predict", json={"patient_id": "P000"}, headers=AUTH, timeout=30)
    audit.close()
    assert r.status_code == 422 and "no --store" in r.json()["message"]


def test_openapi_docs_show_the_models_dims(server):
    client, *_ = server
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    row = spec["components"]["schemas"]["Bag_wsi"]["properties"]["features"]["items"]
    assert row["minItems"] == row["maxItems"] == 16
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_audit_log_is_written_without_patient_ids_and_verifies(server, tmp_path):
    client, served, audit_path = server
    n_before = sum(1 for f in log_files(audit_path) for _ in f.open())
    pids = [f"P{i:03d}" for i in range(2, 14)]  # 12 lines of about 450 bytes: over 4 KB, so rotated at least once
    for pid in pids:
        assert client.post("/predict", json={"patient_id": pid, "top_k": 0}, headers=AUTH).status_code == 200
    assert client.post("/predict", json={"features": {"mri": {"features": [0.0] * 7}}}, headers=AUTH).status_code == 422
    files = log_files(audit_path)
    assert len(files) > 1  # rotated at 4 KB
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert len(lines) == n_before + len(pids)  # one line per answered prediction, none for the refused one
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1)) and lines[0]["prev"] == GENESIS
    assert {e["model_sha256"] for e in lines} == {served.sha256}
    assert set(lines[-1]) == {"time", "request_id", "model_sha256", "input_sha256", "source", "output",
                              "latency_ms", "seq", "prev", "hash"}
    assert lines[-1]["output"]["predicted_class"] in ("neg", "pos") and lines[-1]["latency_ms"] > 0
    text = "".join(f.read_text() for f in files)
    assert not re.search(r"P0\d\d|NOPE|slide\d|s\.zarr|run/", text)  # no ids, item ids or paths
    res = CliRunner().invoke(cli_app, ["audit", "verify", str(audit_path)])
    assert res.exit_code == 0, res.output
    assert f"ok: {len(lines)} lines in {len(files)} file(s)" in res.output


# ---- the audit log's chain ------------------------------------------------------------------------------------
def _log(tmp_path: Path, n: int = 6, max_bytes: int = 1 << 20) -> Path:
    path = tmp_path / "a.log"
    audit = AuditLog(path, max_bytes=max_bytes)
    for i in range(n):
        audit.append({"request_id": f"r{i}", "model_sha256": "m", "input_sha256": f"{i:064x}",
                      "output": {"risk": i / 10}, "latency_ms": 1.0})
    audit.close()
    return path


def _verify(path: Path) -> tuple[int, str]:
    res = CliRunner().invoke(cli_app, ["audit", "verify", str(path)])
    return res.exit_code, res.output


def test_verify_names_an_edited_line(tmp_path):
    path = _log(tmp_path)
    assert _verify(path)[0] == 0
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"risk":0.2', '"risk":0.9')
    path.write_text("".join(lines))
    code, out = _verify(path)
    assert code == 1 and f"{path}:3: content does not match its hash: this line was edited" in out


def test_verify_catches_a_rewritten_line_with_a_fresh_hash(tmp_path):
    from mmcli.stages.serve.audit import canonical, entry_hash

    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    e = json.loads(lines[1])
    e["output"]["risk"] = 0.99
    e["hash"] = entry_hash(e)
    lines[1] = canonical(e)
    path.write_text("\n".join(lines) + "\n")
    code, out = _verify(path)
    assert code == 1 and f"{path}:3: does not chain to the line before" in out


def test_verify_catches_cut_removed_and_reordered_lines(tmp_path):
    path = _log(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:-20])  # cut mid-line
    code, out = _verify(path)
    assert code == 1 and f"{path}:6: incomplete last line" in out
    lines = good.decode().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # cut at a line boundary: only the head can tell
    code, out = _verify(path)
    assert code == 1 and "ends at seq 5 but its head records seq 6" in out
    path.write_text("".join(lines[:2] + lines[3:]))  # a middle line removed
    code, out = _verify(path)
    assert code == 1 and f"{path}:3: seq 4 where 3 was expected: lines were removed" in out
    path.write_text("".join(lines[:1] + [lines[2], lines[1]] + lines[3:]))  # two lines swapped
    code, out = _verify(path)
    assert code == 1 and f"{path}:2: seq 3 where 2 was expected" in out
    path.write_text("")
    code, out = _verify(path)
    assert code == 1 and "ends at seq 0" in out


def test_rotation_chains_across_files_and_a_reopened_log_continues(tmp_path):
    path = _log(tmp_path, n=40, max_bytes=1024)
    files = log_files(path)
    assert [f.name for f in files[:2]] == ["a.log.000001", "a.log.000002"] and files[-1] == path
    assert all(f.stat().st_size <= 1024 for f in files)
    assert verify_log(path).lines == 40
    first_of_second = json.loads(files[1].read_text().splitlines()[0])
    assert first_of_second["prev"] == json.loads(files[0].read_text().splitlines()[-1])["hash"]
    audit = AuditLog(path, max_bytes=1024)  # a restarted server continues the same chain
    audit.append({"request_id": "again", "output": {}})
    audit.close()
    assert verify_log(path).lines == 41
    files[0].unlink()  # the oldest file removed
    code, out = _verify(path)
    assert code == 1 and f"a.log.000002:1: seq {first_of_second['seq']} where 1 was expected" in out


def test_a_damaged_log_is_not_continued_and_a_missing_head_fails_verify(tmp_path):
    path = _log(tmp_path)
    path.write_bytes(path.read_bytes()[:-2] + b"x\n")
    with pytest.raises(InputError, match="last line does not match its head"):
        AuditLog(path)
    other = _log(tmp_path / "other")
    (tmp_path / "other" / "a.log.head").unlink()
    with pytest.raises(InputError, match="without its head file"):
        AuditLog(other)
    with pytest.raises(AuditChainError, match="missing, so a log cut at a line boundary cannot be told"):
        verify_log(other)


# ---- the command --------------------------------------------------------------------------------------------
def test_token_file_must_exist_and_hold_a_token(planted, tmp_path):
    run = planted[1] / "run"
    res = CliRunner().invoke(cli_app, ["serve", "--model", str(run), "--token-file", str(tmp_path / "none")])
    assert res.exit_code == 2 and "--token-file" in res.output and "cannot read the token file" in res.output
    (tmp_path / "empty").write_text("\n")
    res = CliRunner().invoke(cli_app, ["serve", "--model", str(run), "--token-file", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "the token file is empty" in res.output
    (tmp_path / "tok").write_text(f"  {TOKEN}\n")
    assert read_token(tmp_path / "tok") == TOKEN


def test_mmcli_serve_command_serves_and_stops_on_sigterm(planted, tmp_path):
    p, d = planted
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    audit = tmp_path / "logs" / "audit.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcli.cli", "serve", "--model", str(d / "run"), "--store", str(p.store),
         "--port", "0", "--token-file", str(token), "--audit-log", str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line, deadline = "", time.monotonic() + 120
        while "serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        for _ in range(200):  # the socket is bound before the line is printed; uvicorn starts right after
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        r = httpx.post(url + "/predict", json={"patient_id": "P005"}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and set(r.json()["probabilities"]) == {"neg", "pos"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert verify_log(audit).lines == 1
    logs = list((tmp_path / "logs").glob("serve-*.log"))
    assert logs and "POST /predict" in logs[0].read_text()  # uvicorn's access log goes to the file
    assert "Traceback" not in err


def test_serve_refuses_a_busy_port():
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(InputError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
