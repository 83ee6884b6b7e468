"""The one atomic-write / JSON / CSV module: atomicity, disk full, formula escaping."""
from __future__ import annotations

import errno

import numpy as np
import pandas as pd
import pytest

from mmcli.pipeline import io
from mmcli.pipeline.errors import DiskFullError


def test_csv_escapes_formula_cells_and_headers_but_not_numbers(tmp_path):
    df = pd.DataFrame({"patient_id": ["=cmd|' /C calc'!A0", "+1", "@x", "\tt", "-"],
                       "=evil": [-0.5, 0.25, 1.0, 0.0, -1e-9]})
    path = io.write_csv(tmp_path / "p.csv", df)
    back = pd.read_csv(path)
    assert list(back.columns) == ["patient_id", "'=evil"]
    assert back["patient_id"].tolist()[:3] == ["'=cmd|' /C calc'!A0", "'+1", "'@x"]
    assert back["patient_id"].iloc[4] == "-"  # a lone sign ("not applicable") is no formula
    assert np.allclose(back["'=evil"], df["=evil"])  # negative numbers are numbers, not formulas


def test_failed_write_leaves_no_file_and_no_temp(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_enospc_becomes_disk_full_error_naming_the_path(tmp_path):
    def fill(_tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="disk full: .*x.json"):
        io.atomic_write_with(tmp_path / "x.json", fill)
    assert list(tmp_path.iterdir()) == []


def test_json_refuses_nan_and_handles_numpy(tmp_path):
    io.write_json(tmp_path / "ok.json", {"a": np.float32(1.5), "b": (1, 2), "c": np.arange(2)})
    assert (tmp_path / "ok.json").read_text().count("1.5") == 1
    with pytest.raises(ValueError):
        io.write_json(tmp_path / "bad.json", {"a": float("nan")})
    assert not (tmp_path / "bad.json").exists()
