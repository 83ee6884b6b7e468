"""Clinical-note extraction with the real MiniLM-L6 (offline): windowed chunking of long notes, empty notes,
and no note text anywhere in the store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcli.features.encoders.registry import create_encoder
from mmcli.features.runner import ItemError, run_extraction
from mmcli.features.text import make_spec, read_note
from mmcli.pipeline.manifest import load_manifest
from mmcli.pipeline.store import open_store

SECRET = "Zebracorn Quixotic-4711"  # a phrase that must never reach the store
LONG = ("Clinical history: 54 year old woman with a palpable mass in the left breast. Core biopsy shows invasive "
        "ductal carcinoma, grade 2, ER positive (90%), PR positive (40%), HER2 negative (IHC 1+). Ki-67 about 15%. "
        "No lymphovascular invasion. Sentinel node negative. ") * 12 + f"Contact: {SECRET}."


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("minilm-l6", device="cpu", precision="fp32")


def _cohort(tmp_path: Path) -> Path:
    (tmp_path / "long.txt").write_text(LONG)
    (tmp_path / "short.txt").write_text(f"Triple negative breast cancer, no special type. {SECRET}")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t \n")
    (tmp_path / "m.csv").write_text(
        "patient_id,modality,path,item_id\nP1,text,long.txt,note\nP2,text,short.txt,note\n"
        "P3,text,empty.txt,note\nP4,text,blank.txt,note\nP5,text,absent.txt,note\n")
    return tmp_path / "m.csv"


def test_long_note_is_chunked_into_one_finite_embedding(tmp_path: Path, encoder) -> None:
    n_tokens = len(encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"])
    assert n_tokens > 512
    vec, stats = encoder.embed(LONG)
    assert vec.shape == (384,) and vec.dtype == np.float32 and np.isfinite(vec).all()
    assert stats["n_tokens"] == n_tokens
    assert stats["n_chunks"] >= 3 and encoder.window == 256  # all-MiniLM-L6-v2's own max_seq_length

    # the windows cover every token once their overlaps are removed, in order
    enc = encoder.tokenize(LONG)
    specials = set(encoder.tokenizer.all_special_ids)
    pieces = [[t for t, m in zip(ids.tolist(), mask.tolist()) if m and t not in specials]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    rebuilt = pieces[0] + [t for p in pieces[1:] for t in p[encoder.stride:]]
    assert rebuilt == encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert all(len(p) <= encoder.window - 2 for p in pieces)


def test_short_note_equals_plain_mean_pooling(encoder) -> None:
    text = "HER2 positive invasive carcinoma."
    vec, stats = encoder.embed(text)
    assert stats == {"n_chunks": 1, "n_tokens": len(encoder.tokenizer(text, add_special_tokens=False)["input_ids"])}
    batch = encoder.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(**batch).last_hidden_state[0]
    np.testing.assert_allclose(vec, hidden.mean(0).numpy(), rtol=1e-5, atol=1e-5)


def test_cohort_run_empty_notes_reported_and_no_text_in_store(tmp_path: Path) -> None:
    """Items are now per-window rows (``(N, 384)``, was ``(1, 384)``): the shape check follows the new layout;
    the pooled embedding is checked in test_windows_reproduce_the_pooled_embedding."""
    m = load_manifest(_cohort(tmp_path))
    spec = make_spec(device="cpu", precision="fp32")
    for store in (tmp_path / "notes.zarr", tmp_path / "notes.h5"):
        s = run_extraction(m.rows, spec, store, missing=m.missing, progress=False)
        by = {o.patient_id: o for o in s.outcomes}
        assert by["P1"].status == by["P2"].status == "done"
        assert by["P3"].status == "failed" and "empty.txt: empty note" in by["P3"].reason
        assert by["P4"].status == "failed" and "blank.txt: empty note" in by["P4"].reason
        assert by["P5"].status == "missing" and s.exit_code == 1
        st = open_store(store, "r")
        item = st.read_item("text", spec.encoder_id, "P1", "note")
        n = item.attrs["text"]["n_chunks"]
        assert item.features.shape == (n, 384) and np.isfinite(item.features).all()
        assert n >= 3 and item.attrs["encoder"] == "minilm-l6"
        assert len(item.attrs["text"]["window_chars"]) == len(item.attrs["row_weights"]) == n
        assert st.patients("text", spec.encoder_id) == ["P1", "P2"]

    # not one byte of the notes' text in the stores, their run records or lock folders
    needles = [SECRET.encode(), b"Zebracorn", b"ductal carcinoma", b"palpable mass", b"Triple negative"]
    scanned = 0
    for root in tmp_path.iterdir():
        if root.suffix == ".txt" or root.name == "m.csv":
            continue
        for f in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            data = f.read_bytes()
            scanned += len(data)
            for needle in needles:
                assert needle not in data and needle.lower() not in data.lower(), f"{needle!r} found in {f}"
    assert scanned > 10_000  # the stores were really read


def test_note_encodings(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes("\ufeffER positive".encode())
    assert read_note(tmp_path / "bom.txt") == ("ER positive", [])
    (tmp_path / "win.txt").write_bytes("Tumour size 2\xb73 cm, caf\xe9".encode("cp1252"))
    text, warnings = read_note(tmp_path / "win.txt")
    assert "café" in text and "Windows-1252" in warnings[0]
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02PK")
    with pytest.raises(ItemError, match="binary"):
        read_note(tmp_path / "bin.txt")


def test_encoder_id_tracks_window_stride_and_pooling(encoder) -> None:
    ids = {make_spec().encoder_id, make_spec(max_tokens=128).encoder_id, make_spec(stride=0).encoder_id,
           make_spec(pooling="cls").encoder_id}
    assert len(ids) == 4
    assert make_spec(max_tokens=256, stride=64).encoder_id == make_spec().encoder_id  # the defaults spelt out
    cls = create_encoder("minilm-l6", device="cpu", precision="fp32", pooling="cls")
    assert not np.allclose(cls.embed(LONG)[0], encoder.embed(LONG)[0])
    assert json.loads(json.dumps(encoder.provenance()))["weights_sha256"] == encoder.weights_sha256


def test_cli_extract_text(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcli.cli import app

    m = _cohort(tmp_path)
    res = CliRunner().invoke(app, ["extract", "--modality", "text", "--manifest", str(m), "--store",
                                   str(tmp_path / "s.zarr"), "--device", "cpu", "--precision", "fp32",
                                   "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "done 2" in res.output and "failed: P3/note" in res.output and "empty note" in res.output
    assert SECRET not in res.output


def test_windows_reproduce_the_pooled_embedding(tmp_path: Path, encoder) -> None:
    """Per-window rows + token counts give the old one-per-note embedding bit for bit, in the extractor and in
    the cohort that vector heads read; the offsets point at the windows' text in the note."""
    from mmcli.features.text import embed_windows, pool_windows
    from mmcli.heads.data import Source, load_cohort

    vecs, counts, spans, stats = embed_windows(encoder, LONG)
    pooled, old_stats = encoder.embed(LONG)
    assert stats == old_stats and vecs.shape == (stats["n_chunks"], 384)
    np.testing.assert_array_equal(pool_windows(vecs, counts), pooled)
    # windows cover the note in order, overlap by `stride` tokens, and their spans hold their own tokens
    assert spans[0, 0] == 0 and spans[-1, 1] == len(LONG.rstrip())
    assert (np.diff(spans[:, 0]) > 0).all() and (spans[1:, 0] < spans[:-1, 1]).all()
    for (a, b), n in zip(spans, counts):
        assert len(encoder.tokenizer(LONG[a:b], add_special_tokens=True)["input_ids"]) == pytest.approx(n, abs=2)

    m = load_manifest(_cohort(tmp_path))
    spec = make_spec(device="cpu", precision="fp32", runtime=encoder.backend)  # bit for bit: the same runtime
    run_extraction([r for r in m.rows if r.patient_id in ("P1", "P2")], spec, tmp_path / "s.zarr", progress=False)
    st = open_store(tmp_path / "s.zarr", "r")
    cohort = load_cohort(st, [Source("text", "store", spec.encoder_id)], ["P1", "P2"])
    np.testing.assert_array_equal(cohort.modalities["text"].vectors[0], pooled)
    short = read_note(tmp_path / "short.txt")[0]
    np.testing.assert_array_equal(cohort.modalities["text"].vectors[1], encoder.embed(short)[0])
    assert cohort.modalities["text"].spec.kind == "vector"


def test_old_pooled_items_keep_working_under_their_own_encoder_id(tmp_path: Path, encoder) -> None:
    """A store holding (1, dim) items of the earlier layout still loads (plain mean), and the windowed layout has
    another encoder_id, so the two never mix silently: fit must be told which one to use."""
    from mmcli.features.encoders.text import text_encoder_params
    from mmcli.features.text import embed_windows
    from mmcli.heads.data import load_cohort, resolve_sources
    from mmcli.pipeline.errors import InputError
    from mmcli.pipeline.fingerprint import make_encoder_id

    old_id = make_encoder_id("minilm-l6", encoder.weights_sha256, text_encoder_params(encoder.folder, None, None,
                                                                                     "mean"))
    new_id = make_spec().encoder_id
    assert old_id != new_id
    st = open_store(tmp_path / "s.zarr")
    vec = encoder.embed(LONG)[0]
    st.write_item("text", old_id, "P1", "note", vec[None, :], attrs={"text": {"n_chunks": 3}})
    np.testing.assert_array_equal(load_cohort(st, resolve_sources(st, ["text"])).modalities["text"].vectors[0], vec)
    vecs, counts, _, _ = embed_windows(encoder, LONG)
    st.write_item("text", new_id, "P1", "note", vecs, attrs={"row_weights": counts.tolist()})
    with pytest.raises(InputError, match="several encoders"):
        resolve_sources(st, ["text"])
    np.testing.assert_array_equal(
        load_cohort(st, resolve_sources(st, ["text"], {"text": new_id})).modalities["text"].vectors[0], vec)
