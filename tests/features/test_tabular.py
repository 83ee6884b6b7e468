"""Tabular ingest: NaN kept, categoricals encoded with the encoding recorded, bad ids and columns refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmcli.features.tabular import ingest_table
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store

PROTEOMICS = """patient_id,ER-alpha,HER2,PTEN,Keratin5
BRCA-0001,1.25,-0.4,,0.1
BRCA-0002,NA,0.9,0.3,NaN
BRCA-0003,0.5,,-1.2e-1,
BRCA-0004,-0.75,1.5,0.0,0.2
"""

CLINICAL = """patient_id,age,tumour_size_mm,positive_nodes,er_status,pr_status,her2_status,histology
BRCA-0001,54,21.5,0,positive,Positive,negative,ductal
BRCA-0002,61,35.0,3,negative,,positive,lobular
BRCA-0003,47,,1,Negative,negative,,mixed
BRCA-0004,70,12.0,0,POSITIVE,positive,negative,
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("store_name", ["s.zarr", "s.h5"])
def test_missing_values_stay_nan(tmp_path: Path, store_name: str) -> None:
    store = tmp_path / store_name
    summary = ingest_table(_write(tmp_path, "prot.csv", PROTEOMICS), "proteomics", store)
    assert (summary.patients, summary.features) == (4, 4)
    t = open_store(store, "r").read_table("proteomics")
    expect = pd.read_csv(tmp_path / "prot.csv", index_col="patient_id")
    assert list(t.index) == list(expect.index) and list(t.columns) == list(expect.columns)
    np.testing.assert_array_equal(t.isna().to_numpy(), expect.isna().to_numpy())  # same cells missing
    assert int(t.isna().sum().sum()) == 5
    np.testing.assert_allclose(t.to_numpy(), expect.to_numpy(), equal_nan=True)  # no scaling, no imputation
    assert t.loc["BRCA-0003", "PTEN"] == pytest.approx(-0.12)
    assert summary.missing_fraction == pytest.approx(5 / 16)


def test_categoricals_encoded_and_recorded(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    summary = ingest_table(_write(tmp_path, "clin.csv", CLINICAL), "clinical", store)
    t = open_store(store, "r").read_table("clinical")
    enc = summary.encodings
    assert enc["er_status"] == {"type": "binary", "levels": ["negative", "positive"], "columns": ["er_status"],
                                "mapping": {"negative": 0.0, "positive": 1.0}}
    assert t["er_status"].tolist() == [1.0, 0.0, 0.0, 1.0]  # case-insensitive levels
    assert np.isnan(t.loc["BRCA-0002", "pr_status"]) and np.isnan(t.loc["BRCA-0003", "her2_status"])
    assert enc["histology"]["type"] == "one_hot"
    assert enc["histology"]["columns"] == ["histology=ductal", "histology=lobular", "histology=mixed"]
    assert t.loc["BRCA-0002", ["histology=ductal", "histology=lobular", "histology=mixed"]].tolist() == [0, 1, 0]
    assert t.loc["BRCA-0004", ["histology=ductal", "histology=lobular"]].isna().all()  # missing stays missing
    assert np.isnan(t.loc["BRCA-0003", "tumour_size_mm"]) and t.loc["BRCA-0002", "positive_nodes"] == 3
    attrs = open_store(store, "r")._attrs("tabular/clinical")
    assert attrs["encodings"]["her2_status"]["mapping"] == {"negative": 0.0, "positive": 1.0}
    assert attrs["missing_per_column"]["tumour_size_mm"] == 1 and "no scaling" in attrs["note"]


def test_declared_categorical_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "grade.csv"
    path.write_bytes("\ufeffpatient_id,grade\nA,1\nB,3\nC,2\nD,\n".encode())
    summary = ingest_table(path, "grade", tmp_path / "s.zarr", categorical=["grade"])
    assert summary.encodings["grade"]["columns"] == ["grade=1", "grade=2", "grade=3"]
    t = open_store(tmp_path / "s.zarr", "r").read_table("grade")
    assert t.loc["D"].isna().all() and t.loc["B", "grade=3"] == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("patient_id,x\nP1,1\nP1,2\n", r"line 3: patient_id 'P1' repeated \(first on line 2\)"),
        ("patient_id,x\nP1,1\n../etc,2\n", r"line 3: unsafe patient_id"),
        ("patient_id,x\nP1,1\n,2\n", r"line 3: unsafe patient_id: id is empty"),
        ("id,x\nP1,1\n", r"no 'patient_id' column"),
        ("patient_id,x,x\nP1,1,2\n", r"duplicate column names \['x'\]"),
        ("patient_id,x\nP1,1,2\n", r"line 2: 3 fields"),
        ("patient_id\nP1\n", r"no feature columns"),
        ("patient_id,x\n", r"no data rows"),
        ("patient_id,ca125\nP1,12\nP2,<0.01\nP3,7\n",
         r"column 'ca125' is not numeric \(mostly numbers.*line 3: '<0.01'"),
        ("patient_id,x\nP1,inf\n", r"line 2: column 'x': infinite value"),
        ("patient_id,note\n" + "".join(f"P{i},free text {i}\n" for i in range(30)), r"30 distinct text values"),
    ],
)
def test_bad_tables_are_refused_with_line_and_fix(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        ingest_table(_write(tmp_path, "t.csv", text), "t", tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists() or "t" not in open_store(tmp_path / "s.zarr", "r").tables()


def test_unsafe_table_name_and_reingest_replaces(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", PROTEOMICS)
    with pytest.raises(InputError, match="unsafe table --name"):
        ingest_table(path, "../x", tmp_path / "s.zarr")
    ingest_table(path, "proteomics", tmp_path / "s.zarr")
    path.write_text("patient_id,ER-alpha\nBRCA-0001,2.0\n")
    ingest_table(path, "proteomics", tmp_path / "s.zarr")
    assert open_store(tmp_path / "s.zarr", "r").read_table("proteomics").shape == (1, 1)


def test_cli_extract_tabular(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcli.cli import app

    table = _write(tmp_path, "clin.csv", CLINICAL)
    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(app, ["extract", "--modality", "tabular", "--table", str(table), "--name", "clinical",
                                   "--store", str(store)])
    assert res.exit_code == 0, res.output
    assert "4 patients x 9 features" in res.output and "encoded histology (one_hot)" in res.output
    assert open_store(store, "r").read_table("clinical").shape == (4, 9)
    res = CliRunner().invoke(app, ["extract", "--modality", "tabular", "--table", str(table), "--store", str(store)])
    assert res.exit_code == 2 and "--name NAME" in res.output
    bad = _write(tmp_path, "bad.csv", "patient_id,x\nP1,1\nP1,2\n")
    res = CliRunner().invoke(app, ["extract", "--modality", "tabular", "--table", str(bad), "--name", "b",
                                   "--store", str(store)])
    assert res.exit_code == 2 and "line 3" in res.output
