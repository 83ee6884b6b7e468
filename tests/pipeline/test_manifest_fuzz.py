"""Hypothesis fuzzing of manifest and labels files: a clear InputError or a valid result, never a traceback."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.ids import id_problem
from mmcli.pipeline.manifest import load_labels, load_manifest

cell = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["P1", "P2", "../x", "a/b", "", " ", "wsi", "mri", "nan", "inf", "-1", "0", "1", "é", '"q,c"']),
)
row = st.lists(cell, min_size=0, max_size=5)
encoding = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])
newline = st.sampled_from(["\n", "\r\n", "\r"])


def _csv(header: list[str], rows: list[list[str]], nl: str) -> str:
    def q(c: str) -> str:
        return '"' + c.replace('"', '""') + '"' if any(x in c for x in ',"\n\r') else c

    return nl.join(",".join(q(c) for c in r) for r in [header, *rows]) + nl


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.one_of(st.just(["patient_id", "modality", "path", "item_id"]), st.lists(cell, max_size=5)),
    rows=st.lists(row, max_size=6),
    enc=encoding,
    nl=newline,
    blank=st.booleans(),
)
def test_manifest_never_crashes(header, rows, enc, nl, blank) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.csv"
        text = _csv(header, rows, nl) + (nl * 2 if blank else "")
        try:
            p.write_bytes(text.encode(enc))
        except UnicodeEncodeError:
            return
        try:
            m = load_manifest(p)
        except InputError as e:
            assert str(e) and ("m.csv" in str(e))
            return
        for r in m.rows + m.missing:
            assert id_problem(r.patient_id) is None and id_problem(r.item_id) is None
            assert id_problem(r.modality) is None


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(cell, cell, cell), max_size=6),
    enc=encoding,
    nl=newline,
)
def test_labels_never_crash(rows, enc, nl) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "labels.csv"
        try:
            p.write_bytes(_csv(["patient_id", "subtype", "time"], [list(r) for r in rows], nl).encode(enc))
        except UnicodeEncodeError:
            return
        try:
            df = load_labels(p)
        except InputError as e:
            assert "labels.csv" in str(e)
            return
        assert df.index.is_unique and all(id_problem(p) is None for p in df.index)
