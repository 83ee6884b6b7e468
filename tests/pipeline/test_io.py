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


def test_one_disk_full_check_reaches_through_wrapped_errors(tmp_path):
    """``is_disk_full`` (the one check, used by the store, the item runner and the run writer) sees ENOSPC in
    the errno, in a cause / context chain, or only in a library's message (h5py, safetensors, xgboost)."""
    full = OSError(errno.ENOSPC, "No space left on device")
    assert io.is_disk_full(full) and io.is_disk_full(DiskFullError("disk full: x"))
    assert io.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    for text in ("Can't write data (file write failed: ..., errno = 28, error message = 'No space left')",
                 "I/O error: No space left on device (os error 28)", "FileStream.Write incomplete"):
        assert io.is_disk_full(RuntimeError(text)), text
    try:
        try:
            raise full
        except OSError as e:
            raise ValueError("wrapped") from e
    except ValueError as wrapped:
        assert io.is_disk_full(wrapped)
    assert not io.is_disk_full(ValueError("bad value")) and not io.is_disk_full(OSError(errno.EROFS, "ro"))
    assert io.is_read_only(OSError(errno.EROFS, "Read-only file system")) and not io.is_read_only(full)
    # and disk_full_as_error now turns a wrapped one into DiskFullError naming the path (before: only a bare OSError)
    target = tmp_path / "x.h5"
    with pytest.raises(DiskFullError, match=f"disk full: {target}"), io.disk_full_as_error(target):
        raise RuntimeError("Can't write data (file write failed: errno = 28)")
    with pytest.raises(ValueError), io.disk_full_as_error(tmp_path):
        raise ValueError("not a full disk")
