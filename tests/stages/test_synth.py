"""Tests of ``mmcli synth``: real file formats, layout, missing modalities, determinism, planted signal."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import tiffslide
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmcli.pipeline.errors import InputError
from mmcli.stages.synth import MARKER, SynthResult, synth
from mmcli.stages.synth.cohort import SUBTYPES, draw_cohort
from mmcli.stages.synth.tables import GENES, PROTEINS, clinical_row, gene_row, protein_row

SEED = 11


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """A 40-patient cohort (threads): formats, layout and the planted signal."""
    return synth(tmp_path_factory.mktemp("big") / "cohort", patients=40, seed=SEED, workers=2)


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SynthResult]:
    """Two runs with one seed (serial and threaded) and one with another seed."""
    base = tmp_path_factory.mktemp("small")
    return {
        "a": synth(base / "a", patients=8, seed=SEED, workers=1),
        "b": synth(base / "b", patients=8, seed=SEED, workers=2),
        "c": synth(base / "c", patients=8, seed=SEED + 1, workers=2),
    }


def _manifest(res: SynthResult) -> pd.DataFrame:
    return pd.read_csv(res.manifest, dtype=str)


def _labels(res: SynthResult) -> pd.DataFrame:
    return pd.read_csv(res.labels, dtype={"patient_id": str})


# --- file formats -------------------------------------------------------------------------------

def test_slides_are_aperio_pyramids_in_openslide(big: SynthResult) -> None:
    slides = _manifest(big).query("modality == 'wsi'")
    assert len(slides) == big.slides > 0
    mpps = set()
    for rel in slides.path:
        path = big.out_dir / rel
        with openslide.OpenSlide(path) as s:
            props = s.properties
            assert props[openslide.PROPERTY_NAME_VENDOR] == "aperio"
            mpp = float(props[openslide.PROPERTY_NAME_MPP_X])
            assert mpp == float(props[openslide.PROPERTY_NAME_MPP_Y])
            assert props[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == ("40" if mpp == 0.25 else "20")
            mpps.add(mpp)
            assert s.level_count == 3
            assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0), rel=0.01)
            w, h = s.dimensions
            assert 750 <= w * mpp <= 1200 and 750 <= h * mpp <= 1200  # same tissue size at 20x and 40x
            assert {"thumbnail", "label", "macro"} <= set(s.associated_images)
            region = np.asarray(s.read_region((w // 4, h // 4), 0, (512, 512)).convert("RGB"))
            assert region.shape == (512, 512, 3)
            thumb = np.asarray(s.get_thumbnail((256, 256)).convert("RGB")).astype(int)
            # Light background around H&E tissue: bright pixels and pink/purple (red, blue > green) ones.
            assert (thumb.min(axis=2) > 225).mean() > 0.2
            hne = (thumb[..., 0] - thumb[..., 1] > 15) & (thumb[..., 2] - thumb[..., 1] > 15)
            assert 0.03 < hne.mean() < 0.8
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
    assert mpps == {0.25, 0.5}, "this seed's cohort has slides at both 20x and 40x"


def test_slides_read_the_same_in_tiffslide(big: SynthResult) -> None:
    rel = _manifest(big).query("modality == 'wsi'").path.iloc[0]
    path = big.out_dir / rel
    with openslide.OpenSlide(path) as o, tiffslide.TiffSlide(path) as t:
        assert t.properties["tiffslide.vendor"] == "aperio"
        assert float(t.properties["tiffslide.mpp-x"]) == float(o.properties["openslide.mpp-x"])
        assert t.level_count == o.level_count and t.dimensions == o.dimensions
        w, h = o.dimensions
        a = np.asarray(o.read_region((w // 3, h // 3), 0, (256, 256)).convert("RGB")).astype(int)
        b = np.asarray(t.read_region((w // 3, h // 3), 0, (256, 256)).convert("RGB")).astype(int)
        assert np.abs(a - b).mean() < 3.0  # same JPEG tiles, decoders may round differently


def test_mri_is_nifti_with_non_isotropic_spacing(big: SynthResult) -> None:
    mri = _manifest(big).query("modality == 'mri'")
    assert set(mri.item_id) == {"T1", "T2"}
    for rel in mri.path:
        img = nib.load(big.out_dir / rel)
        assert img.ndim == 3 and img.shape == (64, 64, 24)
        zx, zy, zz = img.header.get_zooms()
        assert zx == zy and zz > zx >= 1.0
        assert img.header.get_xyzt_units()[0] == "mm"
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.int16 and data.min() >= 0 and data.max() > 300


def test_notes_are_text_with_receptor_results(big: SynthResult) -> None:
    notes = _manifest(big).query("modality == 'text'")
    texts = [(big.out_dir / rel).read_text(encoding="utf-8") for rel in notes.path]
    assert all(len(t.split()) > 20 for t in texts)
    assert all(re.search(r"\b(ER|estrogen|oestrogen)\b", t, re.I) for t in texts)
    assert any(re.search(r"pending|to follow|awaited|equivocal", t, re.I) for t in texts)


# --- layout -------------------------------------------------------------------------------------

def test_manifest_labels_and_marker(big: SynthResult) -> None:
    man = _manifest(big)
    assert list(man.columns) == ["patient_id", "modality", "path", "item_id"]
    assert set(man.modality) == {"wsi", "mri", "text"}
    assert not man.duplicated(["patient_id", "modality", "item_id"]).any()
    for row in man.itertuples():
        path = big.out_dir / row.path
        assert path.is_file() and not Path(row.path).is_absolute()
        expected = {"wsi": Path(row.path).stem, "text": "note"}.get(row.modality, row.item_id)
        assert row.item_id == expected
        if row.modality == "mri":
            assert row.path == f"mri/{row.patient_id}_{row.item_id}.nii.gz"
    labels = _labels(big)
    assert list(labels.columns) == ["patient_id", "subtype", "time", "event"]
    assert len(labels) == 40 and labels.patient_id.is_unique
    assert all(re.fullmatch(r"BRCA-\d{4}", p) for p in labels.patient_id)
    assert set(labels.subtype) == set(SUBTYPES)
    assert labels.subtype.value_counts().to_dict() == {"LumA": 16, "TNBC": 10, "LumB": 8, "HER2-enriched": 6}
    assert (labels.time > 0).all() and set(labels.event) <= {0, 1} and 0 < labels.event.mean() < 1
    assert set(man.patient_id) <= set(labels.patient_id)
    marker = json.loads(big.marker.read_text())
    assert marker["tool"] == "mmcli synth" and marker["seed"] == SEED and marker["patients"] == 40
    assert marker["complete"] is True
    assert big.subtypes == labels.subtype.value_counts().to_dict()
    assert not list(big.out_dir.rglob(".*.partial"))


def test_tables(big: SynthResult) -> None:
    genes = pd.read_csv(big.tables["genes"])
    prot = pd.read_csv(big.tables["proteomics"])
    clin = pd.read_csv(big.tables["clinical"])
    ids = set(_labels(big).patient_id)
    assert genes.shape == (40, 1 + len(GENES)) and set(genes.patient_id) == ids
    assert genes[list(GENES)].notna().all().all()
    assert prot.shape == (big.proteomics_rows, 1 + len(PROTEINS)) and set(prot.patient_id) < ids
    nan_share = prot[list(PROTEINS)].isna().to_numpy().mean()
    assert 0.03 < nan_share < 0.25
    assert list(clin.columns) == ["patient_id", "age", "tumour_size_mm", "positive_nodes",
                                  "er_status", "pr_status", "her2_status"]
    assert set(clin.patient_id) == ids
    for col in ("er_status", "pr_status", "her2_status"):
        assert set(clin[col].dropna()) <= {"positive", "negative"}
    assert clin.age.between(18, 95).all() and (clin.tumour_size_mm > 0).all()


def test_some_patients_miss_modalities(big: SynthResult) -> None:
    man = _manifest(big)
    ids = set(_labels(big).patient_id)
    prot = set(pd.read_csv(big.tables["proteomics"]).patient_id)
    for modality in ("wsi", "mri", "text"):
        assert set(man.query("modality == @modality").patient_id) < ids, f"nobody misses {modality}"
    assert prot < ids
    t1 = set(man.query("item_id == 'T1'").patient_id)
    t2 = set(man.query("item_id == 'T2'").patient_id)
    assert t2 < t1  # T2 only for some patients with MRI
    per_patient = man.query("modality == 'wsi'").groupby("patient_id").size()
    assert per_patient.between(1, 3).all() and per_patient.max() > 1


# --- determinism --------------------------------------------------------------------------------

def test_same_seed_is_byte_identical(small_runs: dict[str, SynthResult]) -> None:
    a, b = small_runs["a"], small_runs["b"]
    ha, hb = _hashes(a.out_dir), _hashes(b.out_dir)
    assert len(ha) > 20 and ha == hb
    assert any(k.endswith(".svs") for k in ha) and any(k.endswith(".nii.gz") for k in ha)


def test_other_seed_gives_other_data(small_runs: dict[str, SynthResult]) -> None:
    ha, hc = _hashes(small_runs["a"].out_dir), _hashes(small_runs["c"].out_dir)
    for name in ("tables/genes.csv", "tables/clinical.csv", "labels.csv", "notes/BRCA-0001.txt"):
        if name in ha and name in hc:
            assert ha[name] != hc[name], name
    common = set(ha) & set(hc) - {MARKER, "manifest.csv"}
    assert sum(ha[k] == hc[k] for k in common) == 0


# --- validation at the edges --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"patients": 7}, {"patients": 0}, {"patients": "10"}, {"patients": 10.0},
                                    {"seed": -1}, {"seed": 1.5}, {"workers": 0}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"patients": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as err:
        synth(tmp_path / "out", **args)
    assert isinstance(err.value, InputError)
    if kwargs.get("patients") == 7:
        assert "at least 8" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refuses_foreign_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        synth(tmp_path, patients=8)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        synth(target, patients=8)


def test_rerun_replaces_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    synth(out, patients=9, seed=2, workers=2)
    res = synth(out, patients=8, seed=2, workers=2)
    man = _manifest(res)
    listed = set(man.path) | {"manifest.csv", "labels.csv", MARKER, *(f"tables/{n}.csv" for n in res.tables)}
    on_disk = set(_hashes(out))
    assert on_disk == listed  # nothing left over from the 9-patient run
    assert "BRCA-0009" not in set(_labels(res).patient_id)


def test_rerun_leaves_identical_files_alone(tmp_path: Path) -> None:
    """Issue 29 item 7: synth run again with the same seed rewrites nothing (same bytes, same mtimes, so a later
    extract sees unchanged sources); a file that differs (edited by hand) is replaced, and only that one."""
    out = tmp_path / "cohort"
    first = synth(out, patients=8, seed=3, workers=2)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in files}
    note = next(p for p in files if p.suffix == ".txt")
    note.write_text("edited by hand")
    again = synth(out, patients=8, seed=3, workers=2)
    assert first.written == len(files) and first.unchanged == 0
    assert (again.written, again.unchanged) == (1, len(files) - 1)
    changed = [p for p in files if (p.stat().st_mtime_ns, p.stat().st_ino) != before[p]]
    assert changed == [note] and note.read_text() != "edited by hand"
    assert not [p for p in out.rglob("*.new")]  # no temporary file left behind


# --- planted signal -----------------------------------------------------------------------------

def _auc(scores: pd.Series, positive: pd.Series) -> float:
    return float(roc_auc_score(positive.astype(int), scores))


def test_each_file_modality_carries_subtype_signal(big: SynthResult) -> None:
    labels = _labels(big).set_index("patient_id").subtype
    man = _manifest(big)

    # Slides: dark (hematoxylin) share of tissue at about 2 um/px rises with proliferation: TNBC > LumA.
    dark = {}
    for pid, rows in man.query("modality == 'wsi'").groupby("patient_id"):
        vals = []
        for rel in rows.path:
            with openslide.OpenSlide(big.out_dir / rel) as s:
                a = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(float)
            tissue = (a.max(2) - a.min(2)) / (a.max(2) + 1) > 0.12
            vals.append(((a.mean(2) < 115) & tissue).sum() / max(tissue.sum(), 1))
        dark[pid] = float(np.mean(vals))
    dark_s = pd.Series(dark)
    sub = labels.loc[dark_s.index]
    keep = sub.isin(["LumA", "TNBC"])
    assert _auc(dark_s[keep], sub[keep] == "TNBC") > 0.75

    # MRI: peak T1 enhancement is higher in HER2-enriched than in LumA.
    peak = {}
    for row in man.query("item_id == 'T1'").itertuples():
        peak[row.patient_id] = float(np.percentile(np.asanyarray(nib.load(big.out_dir / row.path).dataobj), 99.5))
    peak_s = pd.Series(peak)
    sub = labels.loc[peak_s.index]
    keep = sub.isin(["LumA", "HER2-enriched"])
    assert _auc(peak_s[keep], sub[keep] == "HER2-enriched") > 0.7

    # Notes: an ER-negative statement is commoner outside the luminal subtypes.
    er_neg = {}
    for row in man.query("modality == 'text'").itertuples():
        text = (big.out_dir / row.path).read_text().lower()
        er_neg[row.patient_id] = float(bool(re.search(r"\ber-|er: negative|er negative|estrogen receptor not "
                                                      r"detected|no oestrogen", text)))
    er_s = pd.Series(er_neg)
    sub = labels.loc[er_s.index]
    assert _auc(er_s, ~sub.str.startswith("Lum")) > 0.65

    # Genes and proteins.
    genes = pd.read_csv(big.tables["genes"]).set_index("patient_id")
    assert _auc(genes.ESR1, labels.loc[genes.index].str.startswith("Lum")) > 0.75
    prot = pd.read_csv(big.tables["proteomics"]).set_index("patient_id")
    her2 = prot.HER2.dropna()
    assert _auc(her2, labels.loc[her2.index] == "HER2-enriched") > 0.65


def _cv_macro_auroc(x: np.ndarray, y: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000))
    p = cross_val_predict(model, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_fusion_beats_each_single_table_and_survival_follows_subtype() -> None:
    """On the latent model alone (no files, so a large cohort is cheap)."""
    cohort = draw_cohort(800, seed=5)
    y = np.array([p.subtype for p in cohort])
    genes = np.array([gene_row(5, p) for p in cohort])
    prot = np.nan_to_num(np.array([protein_row(5, p) for p in cohort]), nan=-3.0)
    code = {"positive": 1.0, "negative": -1.0, None: 0.0}
    clin = np.array([[float(v) if i < 3 else code[v] for i, v in enumerate(clinical_row(5, p))] for p in cohort])
    singles = {name: _cv_macro_auroc(x, y) for name, x in (("genes", genes), ("proteomics", prot), ("clinical", clin))}
    fused = _cv_macro_auroc(np.hstack([genes, prot, clin]), y)
    assert all(0.6 < a < 0.85 for a in singles.values()), singles
    assert fused > max(singles.values()) + 0.04, (singles, fused)

    events = np.array([p.event for p in cohort])
    times = np.array([p.time_months for p in cohort])
    assert 0.2 < events.mean() < 0.6 and (times > 0).all()
    # TNBC patients die or progress earlier than LumA ones: a higher share of events before 36 months.
    early = (times < 36) & (events == 1)
    assert early[y == "TNBC"].mean() > early[y == "LumA"].mean() + 0.05
