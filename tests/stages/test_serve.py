"""``mmcli serve`` against a real uvicorn server on loopback: health, model card, predictions by payload and by
store id (equal to ``mmcli predict``), auth, input validation, and the signed hash-chained audit log with
``mmcli audit verify`` (intact, edited, forged, cut, reordered, rotated). The hardening of issue 25 (audit log
under overwrite, disk full, forgery and two writers; limits, timeouts and auth) is in test_serve_hardening.py."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.planted_data import make_store
from helpers.serving import AUTH, KEY, KEY_BYTES, TOKEN, running
from mmcli.cli import app as cli_app
from mmcli.heads.card import build_card, model_sha256
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store
from mmcli.stages.fit import fit
from mmcli.stages.predict import predict
from mmcli.stages.serve.app import create_app
from mmcli.stages.serve.audit import GENESIS, AuditChainError, AuditKey, AuditLog, log_files
from mmcli.stages.serve.auth import read_token
from mmcli.stages.serve.options import ServeOptions
from mmcli.stages.serve.server import bind
from mmcli.stages.serve.service import ServedModel
from mmcli.stages.serve.verify import verify_log

OPTS = ServeOptions(max_instances=64, max_body_mb=0.25, max_top_k=20, top_k=5)


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    p = make_store(d / "s.zarr", n=30, task="binary", seed=21, tiles=(8, 20))
    p.labels.reset_index().to_csv(d / "labels.csv", index=False)
    fit("fusion_mlp", p.store, d / "labels.csv", d / "run", target="label", folds=2, n_boot=5,
        params={"epochs": 4})
    return p, d


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    """The audit key on disk (outside every log folder), for `mmcli audit verify --key`."""
    path = tmp_path_factory.mktemp("keys") / "audit.key"
    path.write_bytes(KEY_BYTES)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(planted, tmp_path_factory):
    p, d = planted
    audit_path = tmp_path_factory.mktemp("audit") / "audit.log"
    served = ServedModel(d / "run", p.store)
    audit = AuditLog(audit_path, KEY, max_bytes=4096)  # small: the module's requests rotate it several times
    with running(create_app(served, TOKEN, audit, OPTS), OPTS) as url, httpx.Client(base_url=url, timeout=60) as client:
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
            assert len(tiles_id) == OPTS.top_k
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
    client, served, _ = server
    body = {"patient_id": "P000"}
    assert client.post("/predict", json=body).status_code == 401
    r = client.post("/predict", json=body, headers={"Authorization": f"Bearer {TOKEN}x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post("/predict", json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    # the token is checked before the body is read: an unauthenticated oversize body is a 401, not a 413
    assert client.post("/predict", content=b"x" * (OPTS.body_limit(served.specs) + 10)).status_code == 401


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


@pytest.mark.parametrize(("value", "modality"), [
    (b"1e39", "mri"), (b"-1e39", "mri"), (b"1e308", "mri"), (b"3.5e38", "genes"), (b"1e39", "wsi")])
def test_values_beyond_float32_are_a_422_not_an_inf(server, value, modality):
    """Issue 25 (6): 1e39 is finite in JSON and Python but inf in float32, where the heads compute."""
    client, *_ = server
    row = b"[%s, 0, 0, 0, 0, 0, 0, 0]" % value
    body = {"mri": b'{"mri": {"features": %s}}' % row,
            "genes": b'{"genes": {"features": [%s, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}}' % value,
            "wsi": b'{"wsi": {"features": [[%s, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}}' % value}[modality]
    r = client.post("/predict", content=b'{"features": %s}' % body,
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "beyond the float32 range" in r.json()["message"]
    assert r.json()["detail"][0]["loc"].startswith(f"features.{modality}")
    # the largest float32 itself is accepted as input
    ok = client.post("/predict", json={"features": {"mri": {"features": [3.4e38] + [0.0] * 7}}, "top_k": 0},
                     headers=AUTH)
    assert ok.status_code in (200, 422) and ok.status_code != 500, ok.text


def test_an_oversize_body_is_refused_before_parsing(server):
    client, served, _ = server
    limit = OPTS.body_limit(served.specs)
    # the limit follows the model: 64 instances x (16 + 2 coords) + 8 + 12 numbers at 40 bytes, plus 64 KiB
    assert limit == (64 * 18 + 8 + 12) * 40 + 64 * 1024 < 0.25 * 1024 * 1024
    big = {"features": {"wsi": {"features": [[0.123456789] * 16] * 2000}}}
    r = client.post("/predict", json=big, headers=AUTH)
    assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["message"]

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
    audit = AuditLog(planted[1] / "nostore" / "a.log", KEY)
    with running(create_app(served, TOKEN, audit)) as url:
        r = httpx.post(url + "/predict", json={"patient_id": "P000"}, headers=AUTH, timeout=30)
    audit.close()
    assert r.status_code == 422 and "no --store" in r.json()["message"]


def test_openapi_is_behind_the_token_and_shows_the_models_dims(server):
    client, *_ = server
    # no Swagger UI page (it loads its JavaScript from a CDN) and no open schema (it lists column names)
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 401
    spec = client.get("/openapi.json", headers=AUTH).json()
    row = spec["components"]["schemas"]["Bag_wsi"]["properties"]["features"]["items"]
    assert row["minItems"] == row["maxItems"] == 16
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_audit_log_is_written_without_patient_ids_and_verifies(server, key_file):
    client, served, audit_path = server
    n_before = sum(1 for f in log_files(audit_path) for _ in f.open())
    pids = [f"P{i:03d}" for i in range(2, 14)]  # 12 lines of about 470 bytes: over 4 KB, so rotated at least once
    for pid in pids:
        assert client.post("/predict", json={"patient_id": pid, "top_k": 0}, headers=AUTH).status_code == 200
    assert client.post("/predict", json={"features": {"mri": {"features": [0.0] * 7}}}, headers=AUTH).status_code == 422
    files = log_files(audit_path)
    assert len(files) > 1  # rotated at 4 KB
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert len(lines) == n_before + len(pids)  # one line per answered prediction, none for the refused one
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1)) and lines[0]["prev"] == GENESIS
    assert {e["model_sha256"] for e in lines} == {served.sha256} and {e["key_id"] for e in lines} == {KEY.id}
    assert set(lines[-1]) == {"time", "request_id", "model_sha256", "input_sha256", "source", "output",
                              "latency_ms", "key_id", "seq", "prev", "hash"}
    assert lines[-1]["output"]["predicted_class"] in ("neg", "pos") and lines[-1]["latency_ms"] > 0
    text = "".join(f.read_text() for f in files)
    assert not re.search(r"P0\d\d|NOPE|slide\d|s\.zarr|run/", text)  # no ids, item ids or paths
    assert KEY_BYTES.decode() not in text  # the key itself is nowhere in the log
    res = CliRunner().invoke(cli_app, ["audit", "verify", str(audit_path), "--key", str(key_file)])
    assert res.exit_code == 0, res.output
    assert f"ok: {len(lines)} lines in {len(files)} file(s), chain intact and signed with key id {KEY.id}" in res.output


# ---- the audit log's chain ------------------------------------------------------------------------------------
def _entry(i: int) -> dict:
    return {"request_id": f"r{i}", "model_sha256": "m", "input_sha256": f"{i:064x}",
            "output": {"predicted_class": "pos" if i % 2 else "neg", "risk": i / 10}, "latency_ms": 1.0}


def _log(tmp_path: Path, n: int = 6, max_bytes: int = 1 << 20) -> Path:
    path = tmp_path / "a.log"
    audit = AuditLog(path, KEY, max_bytes=max_bytes)
    for i in range(n):
        audit.append(_entry(i))
    audit.close()
    return path


def _verify(path: Path, *more: str) -> tuple[int, str]:
    key = path.parent.parent / f"{path.parent.name}.key"  # outside the log's folder
    key.write_bytes(KEY_BYTES)
    res = CliRunner().invoke(cli_app, ["audit", "verify", str(path), "--key", str(key), *more])
    return res.exit_code, res.output


def test_verify_names_an_edited_line(tmp_path):
    path = _log(tmp_path)
    assert _verify(path)[0] == 0
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"risk":0.2', '"risk":0.9')
    path.write_text("".join(lines))
    code, out = _verify(path)
    assert code == 1 and f"{path}:3: content does not match its signature: this line was edited or forged" in out


def test_a_forger_without_the_key_cannot_rewrite_the_log(tmp_path):
    """Issue 25 (5): flipping every predicted class and recomputing the hashes passed the unkeyed chain. Each
    line is now an HMAC under a key outside the log's folder: recomputing with sha256, or signing with another
    key, fails at the first line; only the key's holder can write lines that verify."""
    import hashlib

    from mmcli.stages.serve.audit import canonical, entry_hash, head_mac

    path = _log(tmp_path)
    good = path.read_text().splitlines()

    def rewrite(sign) -> None:
        prev, out = GENESIS, []
        for raw in good:
            e = json.loads(raw)
            e["output"]["predicted_class"] = {"pos": "neg", "neg": "pos"}[e["output"]["predicted_class"]]
            e["prev"] = prev
            e["hash"] = prev = sign(e)
            out.append(canonical(e))
        path.write_text("\n".join(out) + "\n")

    rewrite(lambda e: hashlib.sha256(canonical({k: v for k, v in e.items() if k != "hash"}).encode()).hexdigest())
    code, out = _verify(path)
    assert code == 1 and f"{path}:1: content does not match its signature" in out
    other = AuditKey(b"another key of at least sixteen bytes")
    rewrite(lambda e: entry_hash(e, other))
    code, out = _verify(path)
    assert code == 1 and f"{path}:1: content does not match its signature" in out
    rewrite(lambda e: entry_hash({**e, "key_id": other.id}, other))  # a line naming the forger's key
    code, out = _verify(path)
    assert code == 1 and f"{path}:1: content does not match its signature" in out
    with pytest.raises(AuditChainError, match="signed with key id"):  # and with that key_id: "the wrong key"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        lines[0]["key_id"] = other.id
        path.write_text("\n".join(canonical(e) for e in lines) + "\n")
        verify_log(path, KEY)
    # what verify does not prove: whoever holds the key can sign anything (docs/serving.md says so); the head,
    # signed for the old last line, catches re-signed lines only until it is re-signed too
    rewrite(lambda e: entry_hash(e, KEY))
    assert "has another hash than the head" in _verify(path)[1]
    last = json.loads(path.read_text().splitlines()[-1])
    (tmp_path / "a.log.head").write_text(json.dumps({"seq": last["seq"], "hash": last["hash"],
                                                     "mac": head_mac(last["seq"], last["hash"], KEY)}))
    assert _verify(path)[0] == 0


def test_a_wrong_or_missing_key_is_named(tmp_path):
    path = _log(tmp_path)
    bad = tmp_path.parent / "wrong.key"
    bad.write_bytes(b"x" * 64)
    res = CliRunner().invoke(cli_app, ["audit", "verify", str(path), "--key", str(bad)])
    assert res.exit_code == 1 and "signature does not match the key" in res.output and "head" in res.output
    res = CliRunner().invoke(cli_app, ["audit", "verify", str(path), "--key", str(tmp_path / "none.key")])
    assert res.exit_code == 2 and "--key" in res.output and "no audit key here" in res.output
    with pytest.raises(InputError, match="written with another --audit-key"):  # never continued with another key
        AuditLog(path, AuditKey(b"x" * 64))


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


def test_a_head_put_back_from_an_old_copy_is_caught_by_an_anchor(tmp_path):
    """The head is signed, so a cut log cannot get a made-up head; a head copied earlier and put back after
    cutting the lines written since is only caught against an anchor kept outside the log's folder."""
    path = tmp_path / "a.log"
    audit = AuditLog(path, KEY)
    for i in range(3):
        audit.append(_entry(i))
    old_head, cut_at = (tmp_path / "a.log.head").read_bytes(), path.stat().st_size
    for i in range(3, 6):
        audit.append(_entry(i))
    audit.close()
    code, out = _verify(path)
    assert code == 0
    anchor = re.search(r"anchor (\d+:[0-9a-f]{64})", out).group(1)
    assert anchor.startswith("6:")
    forged = json.loads(old_head)
    forged["seq"] = 5  # a made-up head for another line: its signature no longer matches
    (tmp_path / "a.log.head").write_text(json.dumps(forged))
    assert "its signature does not match" in _verify(path)[1]
    with open(path, "r+b") as fh:  # the replay: lines 4-6 cut, the head of line 3 put back
        fh.truncate(cut_at)
    (tmp_path / "a.log.head").write_bytes(old_head)
    assert _verify(path)[0] == 0  # the chain alone cannot tell ...
    code, out = _verify(path, "--anchor", anchor)  # ... the anchor can
    assert code == 1 and "before the anchor's seq 6" in out
    assert _verify(path, "--anchor", "6:xyz")[0] == 2


def test_rotation_chains_across_files_and_a_reopened_log_continues(tmp_path):
    path = _log(tmp_path, n=40, max_bytes=1024)
    files = log_files(path)
    assert [f.name for f in files[:2]] == ["a.log.000001", "a.log.000002"] and files[-1] == path
    assert all(f.stat().st_size <= 1024 for f in files)
    assert verify_log(path, KEY).lines == 40
    first_of_second = json.loads(files[1].read_text().splitlines()[0])
    assert first_of_second["prev"] == json.loads(files[0].read_text().splitlines()[-1])["hash"]
    audit = AuditLog(path, KEY, max_bytes=1024)  # a restarted server continues the same chain
    audit.append({"request_id": "again", "output": {}})
    audit.close()
    assert verify_log(path, KEY).lines == 41
    files[0].unlink()  # the oldest file removed
    code, out = _verify(path)
    assert code == 1 and f"a.log.000002:1: seq {first_of_second['seq']} where 1 was expected" in out


def test_a_damaged_log_is_not_continued_and_a_missing_head_fails_verify(tmp_path):
    path = _log(tmp_path)
    path.write_bytes(path.read_bytes()[:-2] + b"x\n")
    with pytest.raises(InputError, match="last line does not match its head"):
        AuditLog(path, KEY)
    other = _log(tmp_path / "other")
    (tmp_path / "other" / "a.log.head").unlink()
    with pytest.raises(InputError, match="without its head file"):
        AuditLog(other, KEY)
    with pytest.raises(AuditChainError, match="missing, so a log cut at a line boundary cannot be told"):
        verify_log(other, KEY)


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


@pytest.mark.parametrize("weak", ["x", "hunter2", "a" * 64, "password" * 4, "ab" * 40])
def test_a_weak_token_is_refused_with_a_hint(tmp_path, weak):
    """Issue 25 (8): a one-character token was accepted."""
    (tmp_path / "tok").write_text(weak)
    with pytest.raises(InputError, match="token is too weak") as e:
        read_token(tmp_path / "tok")
    assert "secrets.token_urlsafe(32)" in str(e.value) and "--token-file" in str(e.value)


def test_random_tokens_pass_the_strength_check():
    import secrets

    from mmcli.stages.serve.auth import MIN_TOKEN_BITS, token_bits

    for _ in range(200):  # the hint's token, and a 256-bit hex token
        for token in (secrets.token_urlsafe(32), secrets.token_hex(32)):
            assert len(token) >= 32 and token_bits(token) >= MIN_TOKEN_BITS


def test_mmcli_serve_command_serves_and_stops_on_sigterm(planted, tmp_path):
    p, d = planted
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    audit = tmp_path / "logs" / "audit.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}  # the default --audit-key is created there
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
    key = tmp_path / "config" / "mmcli" / "audit.key"
    assert "created a new audit key" in err and key.stat().st_mode & 0o777 == 0o600
    assert (key.parent.stat().st_mode & 0o777) == 0o700
    assert verify_log(audit, AuditKey.load(key)[0]).lines == 1
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
