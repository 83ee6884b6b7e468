"""Import of tile-feature files written here in the layouts CLAM, TRIDENT and STAMP write them."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from mmcli.features.interop.formats import FORMATS, complete_geometry
from mmcli.features.interop.importer import match_rows
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import load_manifest
from mmcli.pipeline.store import open_store
from mmcli.stages.import_ import import_features

RNG = np.random.default_rng(7)
SLIDES = {"P1": ["TCGA-A1-0001-01Z"], "P2": ["TCGA-A1-0002-01Z", "TCGA-A1-0002-02Z"]}


def _feats(n: int, d: int = 16) -> np.ndarray:
    return RNG.normal(size=(n, d)).astype(np.float32)


def _coords(n: int, step: int = 512) -> np.ndarray:
    return (RNG.integers(0, 40, size=(n, 2)) * step).astype(np.int64)


def _manifest(tmp_path: Path, extra: str = "") -> Path:
    lines = ["patient_id,modality,path"]
    lines += [f"{p},wsi,slides/{s}.svs" for p, ss in SLIDES.items() for s in ss]  # slides themselves absent
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n" + extra)
    return tmp_path / "m.csv"


def write_clam(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CLAM: patches/<slide>.h5 (coords only) + h5_files/<slide>.h5 (features, coords) + pt_files/."""
    data = {}
    for ss in SLIDES.values():
        for s in ss:
            n = int(RNG.integers(3, 9))
            f, c = _feats(n, 1024), _coords(n)
            (root / "patches").mkdir(parents=True, exist_ok=True)
            with h5py.File(root / "patches" / f"{s}.h5", "w") as h:
                ds = h.create_dataset("coords", data=c)
                ds.attrs.update(patch_size=256, patch_level=0, downsample=[1.0, 1.0], name=s)
            (root / "h5_files").mkdir(exist_ok=True)
            with h5py.File(root / "h5_files" / f"{s}.h5", "w") as h:
                h["features"], h["coords"] = f, c
            (root / "pt_files").mkdir(exist_ok=True)
            (root / "pt_files" / f"{s}.pt").write_bytes(b"not read")
            data[s] = (f, c)
    return data


def write_trident(root: Path, encoder: str = "uni_v1", dim: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TRIDENT: <job>/20x_256px_0px_overlap/features_<enc>/<slide>.h5 with attrs on coords."""
    job = root / "20x_256px_0px_overlap"
    data = {}
    for ss in SLIDES.values():
        for s in ss:
            n = int(RNG.integers(3, 9))
            f, c = _feats(n, dim), _coords(n)
            (job / "patches").mkdir(parents=True, exist_ok=True)
            with h5py.File(job / "patches" / f"{s}_patches.h5", "w") as h:
                h["coords"] = c
            (job / f"features_{encoder}").mkdir(parents=True, exist_ok=True)
            with h5py.File(job / f"features_{encoder}" / f"{s}.h5", "w") as h:
                h.create_dataset("features", data=f).attrs.update(name=s, savetodir=str(job))
                h.create_dataset("coords", data=c).attrs.update(
                    patch_size=256, patch_size_level0=512, target_magnification=20, level0_magnification=40,
                    overlap=0, name=s, savetodir=str(job))
            data[s] = (f, c)
    return data


def write_stamp(root: Path, slide_mpp: float = 0.25) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """STAMP: <out>/<extractor>-<hash>/<slide>.h5, feats float16, coords in µm, root attrs."""
    out = root / "ctranspath-9f8e7d6c"
    out.mkdir(parents=True)
    data = {}
    for ss in SLIDES.values():
        for s in ss:
            n = int(RNG.integers(3, 9))
            f, c_px = _feats(n, 768).astype(np.float16), _coords(n, 1024)
            with h5py.File(out / f"{s}.h5", "w") as h:
                h["coords"] = c_px * slide_mpp
                h["feats"] = f
                h.attrs.update(stamp_version="2.3.0", extractor="ctranspath", unit="um", tile_size_um=256.0,
                               tile_size_px=224, code_hash="9f8e7d6c", feat_type="tile")
            data[s] = (f, c_px)
    return data


def _items(store: Path, eid: str) -> dict[str, object]:
    st = open_store(store, "r")
    return {k.item_id: st.read_item("wsi", eid, k.patient_id, k.item_id) for k in st.iter_items("wsi", eid)}


def test_import_clam(tmp_path: Path) -> None:
    data = write_clam(tmp_path / "clam")
    s = import_features("clam", tmp_path / "clam", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    assert s.exit_code == 0 and s.count("done") == 3 and s.encoder_id.startswith("clam_features-")
    items = _items(tmp_path / "s.zarr", s.encoder_id)
    for slide, (f, c) in data.items():
        np.testing.assert_array_equal(items[slide].features, f)
        np.testing.assert_array_equal(items[slide].coords, c)
        assert items[slide].attrs["imported_from"] == "clam"
        assert items[slide].attrs["source_fingerprint"]["path"].endswith(f"h5_files/{slide}.h5")
    assert sorted(k.patient_id for k in open_store(tmp_path / "s.zarr", "r").iter_items("wsi")) == ["P1", "P2", "P2"]


def test_import_trident_keeps_geometry(tmp_path: Path) -> None:
    data = write_trident(tmp_path / "job")
    s = import_features("trident", tmp_path / "job", _manifest(tmp_path), tmp_path / "s.h5", progress=False)
    assert s.exit_code == 0 and s.encoder_id.startswith("trident_uni_v1-")
    items = _items(tmp_path / "s.h5", s.encoder_id)
    item = items["TCGA-A1-0002-02Z"]
    np.testing.assert_array_equal(item.features, data["TCGA-A1-0002-02Z"][0])
    np.testing.assert_array_equal(item.coords, data["TCGA-A1-0002-02Z"][1])
    a = item.attrs
    assert (a["patch_size"], a["patch_size_level0"], a["target_magnification"], a["level0_magnification"]) == \
        (256, 512, 20, 40)
    assert a["mpp"] == pytest.approx(0.5) and a["slide_mpp"] == pytest.approx(0.25)
    assert a["source_encoder"] == "uni_v1" and a["source_file_attrs"]["coords"]["overlap"] == 0
    assert open_store(tmp_path / "s.h5", "r").encoder_attrs("wsi", s.encoder_id)["encoder"] == \
        "imported:trident:uni_v1"


def test_import_stamp_um_coords_to_level0_pixels(tmp_path: Path) -> None:
    data = write_stamp(tmp_path / "stamp")
    s = import_features("stamp", tmp_path / "stamp", _manifest(tmp_path), tmp_path / "s.zarr", mpp=0.25,
                        encoder_id="ctranspath-stamp", progress=False)
    assert s.exit_code == 0 and s.encoder_id == "ctranspath-stamp"
    items = _items(tmp_path / "s.zarr", "ctranspath-stamp")
    for slide, (f, c_px) in data.items():
        assert items[slide].features.dtype == np.float16
        np.testing.assert_array_equal(items[slide].features, f)
        np.testing.assert_array_equal(items[slide].coords, c_px)
    a = items["TCGA-A1-0001-01Z"].attrs
    assert a["mpp"] == pytest.approx(256 / 224) and a["patch_size"] == 224 and a["slide_mpp"] == 0.25
    assert a["source_file_attrs"]["root"]["extractor"] == "ctranspath"


def test_stamp_mpp_from_the_slide_or_coords_dropped_loudly(tmp_path: Path) -> None:
    from helpers.slides import tissue_image, write_aperio

    data = write_stamp(tmp_path / "stamp", slide_mpp=0.5)
    (tmp_path / "slides").mkdir()
    write_aperio(tmp_path / "slides" / "TCGA-A1-0001-01Z.svs", tissue_image(400, 300, 0.5, blank=True), mpp=0.5)
    s = import_features("stamp", tmp_path / "stamp", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    assert s.exit_code == 0
    items = _items(tmp_path / "s.zarr", s.encoder_id)
    np.testing.assert_array_equal(items["TCGA-A1-0001-01Z"].coords, data["TCGA-A1-0001-01Z"][1])  # mpp of the slide
    lost = items["TCGA-A1-0002-01Z"]  # slide unreachable, no --mpp: features kept, coords not guessed
    assert lost.coords is None and any("micrometres" in w for w in lost.attrs["warnings"])
    done = {o.item_id: o for o in s.outcomes}
    assert any("imported without coordinates" in w for w in done["TCGA-A1-0002-01Z"].warnings)


def test_missing_files_dim_mismatch_and_resume(tmp_path: Path) -> None:
    write_trident(tmp_path / "job")
    bad = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1" / "TCGA-A1-0002-02Z.h5"
    with h5py.File(bad, "w") as h:
        h["features"], h["coords"] = _feats(4, 32), _coords(4)
    m = _manifest(tmp_path, "P3,wsi,slides/TCGA-A1-0003-01Z.svs\n")
    s = import_features("trident", tmp_path / "job", m, tmp_path / "s.zarr", progress=False)
    by = {o.item_id: o for o in s.outcomes}
    assert by["TCGA-A1-0003-01Z"].status == "missing"
    assert by["TCGA-A1-0002-02Z"].status == "failed" and "feature dim mismatch" in by["TCGA-A1-0002-02Z"].reason
    assert s.count("done") == 2 and s.exit_code == 1
    again = import_features("trident", tmp_path / "job", m, tmp_path / "s.zarr", progress=False)
    assert again.count("cached") == 2  # unchanged files are not read again
    with pytest.raises(InputError, match="already holds 16-d features"):
        write_clam(tmp_path / "clam")
        import_features("clam", tmp_path / "clam", m, tmp_path / "s.zarr", encoder_id=s.encoder_id, progress=False)


def test_ambiguous_and_unmatched_sources_are_usage_errors(tmp_path: Path) -> None:
    write_trident(tmp_path / "job", "uni_v1")
    write_trident(tmp_path / "job", "conch_v15")
    m = load_manifest(_manifest(tmp_path))
    with pytest.raises(InputError, match="2 trident feature files match slide"):
        match_rows(m.rows + m.missing, tmp_path / "job", "trident")
    with pytest.raises(InputError, match="no stamp feature file"):
        import_features("stamp", tmp_path / "job", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    with pytest.raises(InputError, match="unknown format"):
        import_features("gigapath", tmp_path / "job", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    with pytest.raises(InputError, match="not a folder"):
        import_features("clam", tmp_path / "nope", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)


def test_corrupt_files_fail_per_item(tmp_path: Path) -> None:
    data = write_clam(tmp_path / "clam")
    victim = tmp_path / "clam" / "h5_files" / "TCGA-A1-0001-01Z.h5"
    with h5py.File(victim, "w") as h:
        h["features"] = np.full((3, 1024), np.nan, np.float32)
    s = import_features("clam", tmp_path / "clam", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    by = {o.item_id: o for o in s.outcomes}
    assert by["TCGA-A1-0001-01Z"].status == "failed" and "NaN" in by["TCGA-A1-0001-01Z"].reason
    assert s.count("done") == 2 and len(data) == 3


def test_geometry_completion() -> None:
    """The format set is read from the registry (``FORMATS.names()``; it was a dict before)."""
    g = complete_geometry({"patch_size": 224, "target_magnification": 20, "slide_mpp": 0.25})
    assert g["mpp"] == 0.5 and g["patch_size_level0"] == 448 and g["level0_magnification"] == 40
    assert set(FORMATS.names()) == {"clam", "trident", "stamp"}


def test_malformed_files_are_named_with_their_defect(tmp_path: Path) -> None:
    """Issue 15: an h5 without 'features' says so (not "file not found"); a folder of only malformed files names
    the real reason (here the coords shape), not only "check --format"."""
    write_clam(tmp_path / "clam")
    victim = tmp_path / "clam" / "h5_files" / "TCGA-A1-0001-01Z.h5"
    with h5py.File(victim, "w") as h:
        h["feats"] = _feats(3, 1024)
    (tmp_path / "clam" / "patches" / "TCGA-A1-0001-01Z.h5").unlink()
    s = import_features("clam", tmp_path / "clam", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    by = {o.item_id: o for o in s.outcomes}
    assert by["TCGA-A1-0001-01Z"].status == "failed"
    assert f"missing dataset 'features' in {victim}" in by["TCGA-A1-0001-01Z"].reason
    bad = tmp_path / "bad" / "h5_files"
    bad.mkdir(parents=True)
    for ss in SLIDES.values():
        for slide in ss:
            with h5py.File(bad / f"{slide}.h5", "w") as h:
                h["features"], h["coords"] = _feats(4, 8), np.zeros((3, 2), np.int64)
    with pytest.raises(InputError, match=r"'coords' must be \(N, 2\) with N=4"):
        import_features("clam", tmp_path / "bad", _manifest(tmp_path), tmp_path / "t.zarr", progress=False)


def test_stamp_ceil_rule_and_v20_tile_size() -> None:
    """STAMP's level-0 tile size is ceil(tile_size_um / slide_mpp): 256 µm at 0.2527 µm/px is 1014 px."""
    g = complete_geometry({"tile_size_um": 256.0, "slide_mpp": 0.2527})
    assert g["patch_size_level0"] == 1014
    g = complete_geometry({"patch_size": 224, "mpp": 256 / 224, "slide_mpp": 0.2527})
    assert g["patch_size_level0"] == 1014 and g["tile_size_um"] == pytest.approx(256.0)


# ---- issue 27: peers' names, mixed encoders, slide embeddings, CLAM's documented layout -----------------------
def test_mixed_trident_job_root_is_refused(tmp_path: Path) -> None:
    """Item 5: a TRIDENT job root holding features_uni_v1/ and features_musk/ (both 1024-d, different slides) is
    refused naming both encoders, instead of being stored under one encoder_id."""
    job = tmp_path / "job" / "20x_256px_0px_overlap"
    slides = [s for ss in SLIDES.values() for s in ss]
    for i, s in enumerate(slides):
        enc = "uni_v1" if i < 2 else "musk"
        (job / f"features_{enc}").mkdir(parents=True, exist_ok=True)
        with h5py.File(job / f"features_{enc}" / f"{s}.h5", "w") as h:
            h["features"], h["coords"] = _feats(3, 1024), _coords(3)
    with pytest.raises(InputError, match=r"come from 2 encoders: .*'musk'.*'uni_v1'.*one encoder's folder"):
        import_features("trident", tmp_path / "job", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    assert not (tmp_path / "s.zarr").exists()
    s = import_features("trident", job / "features_uni_v1", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    assert s.count("done") == 2 and s.count("missing") == 1


def write_trident_slide_features(job: Path, encoder: str = "titan", dim: int = 768) -> dict[str, np.ndarray]:
    """TRIDENT's ``extract_slide_features``: ``slide_features_<enc>/<slide>.h5`` with ``features`` (D,) and the
    tile coords with their attrs; an empty slide gets ``features`` of shape (0,)."""
    out = job / "20x_512px_0px_overlap" / f"slide_features_{encoder}"
    out.mkdir(parents=True)
    data = {}
    for ss in SLIDES.values():
        for s in ss:
            f = RNG.normal(size=dim).astype(np.float32)
            with h5py.File(out / f"{s}.h5", "w") as h:
                h.create_dataset("features", data=f).attrs.update(name=s, savetodir=str(out))
                h.create_dataset("coords", data=_coords(5)).attrs.update(patch_size=512, patch_size_level0=1024)
            data[s] = f
    return data


def test_trident_slide_embeddings_import_as_a_vector_modality(tmp_path: Path) -> None:
    """Item 10: TRIDENT's slide embeddings import as the 'slide' modality (one row per slide, no coords), which
    stage 2 reads as a vector (what xgboost, cox and fusion_mlp take)."""
    from mmcli.heads.data import load_cohort, resolve_sources

    data = write_trident_slide_features(tmp_path / "job")
    s = import_features("trident", tmp_path / "job", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    assert s.exit_code == 0 and s.count("done") == 3 and s.modality == "slide"
    assert s.encoder_id.startswith("trident_titan-")
    st = open_store(tmp_path / "s.zarr", "r")
    assert st.modalities() == ["slide"] and st.encoder_attrs("slide", s.encoder_id)["level"] == "slide"
    item = st.read_item("slide", s.encoder_id, "P1", "TCGA-A1-0001-01Z")
    assert item.features.shape == (1, 768) and item.coords is None
    np.testing.assert_array_equal(item.features[0], data["TCGA-A1-0001-01Z"])
    cohort = load_cohort(st, resolve_sources(st, ["slide"]))
    m = cohort.modalities["slide"]
    assert m.spec.kind == "vector" and m.vectors.shape == (2, 768)
    p2 = (data["TCGA-A1-0002-01Z"].astype(np.float64) + data["TCGA-A1-0002-02Z"]) / 2  # two slides: their mean
    np.testing.assert_allclose(m.vectors[1], p2, rtol=1e-6)
    empty = tmp_path / "job" / "20x_512px_0px_overlap" / "slide_features_titan" / "TCGA-A1-0001-01Z.h5"
    with h5py.File(empty, "w") as h:
        h["features"], h["coords"] = np.empty((0,), np.float32), np.empty((0, 2), np.int64)
    s = import_features("trident", tmp_path / "job", _manifest(tmp_path), tmp_path / "s2.zarr", progress=False)
    by = {o.item_id: o for o in s.outcomes}
    assert by["TCGA-A1-0001-01Z"].status == "failed" and "empty slide embedding" in by["TCGA-A1-0001-01Z"].reason


def test_stamp_slide_encodings_import_and_patient_encodings_are_named(tmp_path: Path) -> None:
    """Item 10: STAMP's slide encodings (``<encoder>-slide-<hash>/<slide>.h5``, ``feats`` (D,), feat_type 'slide',
    as its ``_save_features_`` writes them) import as the 'slide' modality; a patient encoding is refused by
    name."""
    out = tmp_path / "enc" / "chief-slide-1a2b3c4d"
    out.mkdir(parents=True)
    for ss in SLIDES.values():
        for s in ss:
            with h5py.File(out / f"{s}.h5", "w") as h:
                h["feats"] = RNG.normal(size=768).astype(np.float32)
                h.attrs.update(version="2.5.0", encoder="chief", precision="torch.float32", stamp_version="2.5.0",
                               code_hash="1a2b3c4d", feat_type="slide")
    s = import_features("stamp", tmp_path / "enc", _manifest(tmp_path), tmp_path / "s.zarr", progress=False)
    assert s.exit_code == 0 and s.modality == "slide" and s.encoder_id.startswith("stamp_chief-")
    item = open_store(tmp_path / "s.zarr", "r").read_item("slide", s.encoder_id, "P1", "TCGA-A1-0001-01Z")
    assert item.features.shape == (1, 768) and item.attrs["source_encoder"] == "chief"
    with h5py.File(out / "TCGA-A1-0001-01Z.h5", "a") as h:
        h.attrs["feat_type"] = "patient"
    s = import_features("stamp", tmp_path / "enc", _manifest(tmp_path), tmp_path / "p.zarr", progress=False)
    by = {o.item_id: o for o in s.outcomes}
    assert by["TCGA-A1-0001-01Z"].status == "failed" and "patient encoding" in by["TCGA-A1-0001-01Z"].reason


def test_clam_documented_layout_keeps_tile_geometry(tmp_path: Path) -> None:
    """Item 9: CLAM's documented layout keeps patches/ in the patching run, not beside h5_files/. The tile size
    then comes from --patch-size (at --patch-level), or from the coords stride as STAMP derives it (named in a
    warning), instead of being lost."""
    data = write_clam(tmp_path / "clam")
    import shutil

    shutil.rmtree(tmp_path / "clam" / "patches")
    s = import_features("clam", tmp_path / "clam", _manifest(tmp_path), tmp_path / "a.zarr", progress=False)
    assert s.exit_code == 0
    items = _items(tmp_path / "a.zarr", s.encoder_id)
    for slide, (_, c) in data.items():
        steps = [np.diff(np.unique(c[:, i])) for i in (0, 1)]
        stride = min(int(st[st > 0].min()) for st in steps if (st > 0).any())
        assert items[slide].attrs["patch_size_level0"] == stride  # 512 or a multiple, as STAMP's get_stride
        assert items[slide].attrs["source_file_attrs"]["geometry_source"] == "coords stride"
    assert any("coords stride" in w for o in s.outcomes for w in o.warnings)
    s = import_features("clam", tmp_path / "clam", _manifest(tmp_path), tmp_path / "b.zarr", patch_size=512,
                        progress=False)
    for it in _items(tmp_path / "b.zarr", s.encoder_id).values():
        assert it.attrs["patch_size_level0"] == 512 and it.attrs["patch_size"] == 512
        assert it.attrs["source_file_attrs"]["geometry_source"] == "--patch-size"
    with pytest.raises(InputError, match="--patch-size"):
        import_features("clam", tmp_path / "clam", _manifest(tmp_path), tmp_path / "c.zarr", patch_size=0,
                        progress=False)


def test_peer_names() -> None:
    """Items 2-4: TRIDENT's folder names and STAMP 2.5's hyphenated extractor names, read in the vocabulary of the
    format they came from (TRIDENT's ctranspath is CHIEF's weights)."""
    from mmcli.features.interop import names

    trident = {"uni": "uni_v1", "uni2-h": "uni_v2", "conch-v1.5": "conch_v15", "conch-v1": "conch_v1",
               "h-optimus-0": "hoptimus0", "h-optimus-1": "hoptimus1", "prov-gigapath": "gigapath",
               "virchow": "virchow", "virchow2": "virchow2", "phikon-v2": "phikon_v2",
               "chief-ctranspath": "ctranspath", "resnet50_trunc": "resnet50"}
    stamp = {"uni": "uni", "uni2-h": "uni2", "conch-v1.5": "conch1_5", "conch-v1": "conch",
             "h-optimus-0": "h-optimus-0", "h-optimus-1": "h-optimus-1", "prov-gigapath": "gigapath",
             "virchow": "virchow-full", "virchow2": "virchow2", "ctranspath": "ctranspath",
             "chief-ctranspath": "chief-ctranspath"}
    assert {k: names.trident_name(k) for k in trident} == trident
    assert {k: names.stamp_name(k) for k in stamp} == stamp
    assert set(trident.values()) <= names.TRIDENT_NAMES and set(stamp.values()) <= names.STAMP_NAMES
    assert names.trident_name("ctranspath") is None  # TransPath weights are not TRIDENT's ctranspath (CHIEF's)
    assert names.stamp_name("ctranspath", "trident") == "chief-ctranspath"
    assert names.stamp_name("h_optimus_0") == "h-optimus-0" and names.stamp_name("uni-1a2b3c", "stamp") == "uni"
    assert names.trident_name("virchow2", "stamp") is None  # STAMP's virchow2 is the CLS token only
    assert names.stamp_name("my_model") == "my_model" and names.trident_name("timm_resnet18") == "timm_resnet18"
