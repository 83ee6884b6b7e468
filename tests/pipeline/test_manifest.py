"""Manifest and labels loading: unsafe ids, duplicates, missing files, relative paths, encodings."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.ids import check_id, id_problem
from mmcli.pipeline.manifest import load_labels, load_manifest


def _write(tmp_path: Path, text: str, name: str = "manifest.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "slides").mkdir()
    for n in ("a.svs", "b.svs"):
        (tmp_path / "slides" / n).write_bytes(b"x")
    (tmp_path / "t1.nii.gz").write_bytes(b"x")
    return tmp_path


def test_loads_and_resolves_relative_paths(files: Path) -> None:
    m = load_manifest(_write(files, "patient_id,modality,path,item_id\n"
                                    "P1,wsi,slides/a.svs,\nP1,wsi,slides/b.svs,\n\nP2,MRI,t1.nii.gz,T1\n"))
    assert [(r.patient_id, r.modality, r.item_id) for r in m.rows] == [
        ("P1", "wsi", "a"), ("P1", "wsi", "b"), ("P2", "mri", "T1")]
    assert m.rows[0].path == files / "slides" / "a.svs"
    assert m.rows[2].row == 5  # blank line skipped, line numbers kept
    assert m.missing == []
    assert len(m.for_modality("wsi")) == 2


def test_item_id_default_strips_nii_gz(files: Path) -> None:
    m = load_manifest(_write(files, "patient_id,modality,path\nP2,mri,t1.nii.gz\n"))
    assert m.rows[0].item_id == "t1"


def test_bom_and_quoted_commas(files: Path) -> None:
    (files / "x, y.svs").write_bytes(b"x")
    with pytest.raises(InputError, match="add an item_id column"):
        load_manifest(_write(files, '\ufeffpatient_id,modality,path\nP1,wsi,"x, y.svs"\n'))
    m = load_manifest(_write(files, '\ufeffpatient_id,modality,path,item_id\nP1,wsi,"x, y.svs",xy\n'))
    assert m.rows[0].path.name == "x, y.svs" and m.rows[0].item_id == "xy"


@pytest.mark.parametrize("pid", ["../evil", "a/b", "P 1", "..", ".x", "p;rm"])
def test_unsafe_patient_id_refused(files: Path, pid: str) -> None:
    p = _write(files, f'patient_id,modality,path\nP0,wsi,slides/a.svs\n"{pid}",wsi,slides/b.svs\n')
    with pytest.raises(InputError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert "manifest.csv" in msg and "line 3" in msg and "Fix" in msg


def test_empty_patient_id_refused(files: Path) -> None:
    with pytest.raises(InputError, match="line 2.*empty"):
        load_manifest(_write(files, "patient_id,modality,path\n,wsi,slides/a.svs\n"))


def test_unsafe_item_id_refused(files: Path) -> None:
    with pytest.raises(InputError, match="item_id"):
        load_manifest(_write(files, "patient_id,modality,path,item_id\nP1,wsi,slides/a.svs,../x\n"))


def test_duplicate_rows_refused(files: Path) -> None:
    p = _write(files, "patient_id,modality,path\nP1,wsi,slides/a.svs\nP1,wsi,slides/a.svs\n")
    with pytest.raises(InputError, match=r"line 3: duplicate .* first on line 2"):
        load_manifest(p)


def test_missing_files_reported_per_row(files: Path) -> None:
    m = load_manifest(_write(files, "patient_id,modality,path\nP1,wsi,slides/a.svs\nP2,wsi,slides/gone.svs\n"))
    assert [r.patient_id for r in m.rows] == ["P1"]
    assert [(r.patient_id, r.row) for r in m.missing] == [("P2", 3)]


def test_missing_columns_and_bad_encoding(files: Path) -> None:
    with pytest.raises(InputError, match="missing column"):
        load_manifest(_write(files, "patient,path\nP1,a\n"))
    with pytest.raises(InputError, match="UTF-8"):
        load_manifest(_write(files, "patient_id,modality,path\nP\xe9,wsi,a\n", encoding="latin-1"))
    with pytest.raises(InputError, match="not found"):
        load_manifest(files / "nope.csv")
    with pytest.raises(InputError, match="empty"):
        load_manifest(_write(files, "\n\n"))
    with pytest.raises(InputError, match="fields"):
        load_manifest(_write(files, "patient_id,modality,path\nP1,wsi,a,b\n"))


def test_unknown_modality(files: Path) -> None:
    with pytest.raises(InputError, match="unknown modality"):
        load_manifest(_write(files, "patient_id,modality,path\nP1,pet,slides/a.svs\n"), modalities={"wsi"})


def test_labels(files: Path) -> None:
    df = load_labels(_write(files, "patient_id,subtype,time,event\nP1,LumA,10.5,1\nP2,,3,0\n", "labels.csv"))
    assert list(df.index) == ["P1", "P2"] and df.loc["P1", "subtype"] == "LumA"
    assert df["subtype"].isna().tolist() == [False, True]
    with pytest.raises(InputError, match="repeated"):
        load_labels(_write(files, "patient_id,y\nP1,1\nP1,0\n", "l2.csv"))
    with pytest.raises(InputError, match="patient_id"):
        load_labels(_write(files, "id,y\nP1,1\n", "l3.csv"))


def test_id_rules() -> None:
    assert id_problem("TCGA-A1-A0SB.01_x") is None
    for bad in ["", ".", "..", "a/b", "a\\b", "-rf", "é", "a" * 129, None]:
        assert id_problem(bad) is not None
    with pytest.raises(InputError):
        check_id("../x")


def test_symlink_loop_and_dangling_link_named(files: Path) -> None:
    """A symlink loop (``Path.exists()`` is False for it) is reported as a loop naming the path, not as a missing
    file; a dangling link names its target; a truly absent file still reads "file not found". The run summary of
    ``mmcli extract`` carries the same reason per row, before any encoder is built."""
    from mmcli.features.runner import run_extraction
    from mmcli.pipeline.manifest import file_problem

    loop = files / "slides" / "loop.svs"
    loop.symlink_to(loop.name)  # resolves to itself
    dangling = files / "slides" / "dangling.svs"
    dangling.symlink_to("nowhere.svs")
    m = load_manifest(_write(files, "patient_id,modality,path\nP1,wsi,slides/a.svs\nP2,wsi,slides/loop.svs\n"
                                    "P3,wsi,slides/dangling.svs\nP4,wsi,slides/gone.svs\n"))
    assert [r.patient_id for r in m.missing] == ["P2", "P3", "P4"]
    assert file_problem(files / "slides" / "a.svs") is None
    assert file_problem(loop).startswith(f"symlink loop: {loop} ")
    assert file_problem(dangling).startswith(f"dangling symlink: {dangling} -> nowhere.svs ")
    assert file_problem(files / "slides" / "gone.svs") == f"file not found: {files / 'slides' / 'gone.svs'}"

    def no_spec() -> None:
        raise AssertionError("the spec was built for a run with no readable file")

    s = run_extraction([], no_spec, files / "s.zarr", missing=m.missing, progress=False, modality="wsi")
    reasons = {o.patient_id: o.reason for o in s.outcomes}
    assert reasons["P2"].startswith(f"symlink loop: {loop}") and "dangling symlink" in reasons["P3"]
    assert reasons["P4"].startswith("file not found")
    assert any(line.startswith("  missing: P2/loop (manifest line 3") and "symlink loop" in line for line in s.lines())
    # the manifest itself behind a loop
    (files / "m.csv").symlink_to("m.csv")
    with pytest.raises(InputError, match=r"symlink loop: .*m\.csv"):
        load_manifest(files / "m.csv")
