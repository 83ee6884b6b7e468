"""Typed extractor options: one pydantic model per modality, validated once at the edge (a bad value exits 2
naming the flag and what it accepts, a flag of another modality is refused), carried as JSON in the spec,
validated again by the extractor and recorded in the store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.slides import tissue_image, write_aperio
from mmcli.cli import app
from mmcli.features.modalities import MODALITIES
from mmcli.features.mri import MriOptions
from mmcli.features.readers import READER_NAMES
from mmcli.features.tabular import TabularOptions, ingest_table
from mmcli.features.text import TextOptions
from mmcli.features.wsi import WSIExtractor, WsiOptions, make_spec
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import load_manifest
from mmcli.pipeline.store import open_store

TINY = dict(encoder="timm:test_resnet", patch_size=32, mpp=1.0, batch_size=16, read_threads=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("opts")
    write_aperio(d / "s.svs", tissue_image(384, 320, 0.5, seed=1), 0.5, downsamples=(1, 4))
    (d / "m.csv").write_text("patient_id,modality,path,item_id\nP1,wsi,s.svs,a\n")
    return d


def _extract(cohort: Path, *args: str):
    return CliRunner().invoke(app, ["extract", "--manifest", str(cohort / "m.csv"), "--store",
                                    str(cohort / "never.zarr"), "--no-progress", *args])


@pytest.mark.parametrize(("modality", "flag", "value", "takes"), [
    ("wsi", "--patch-size", "4", "integer >= 8"),
    ("wsi", "--mpp", "0", "µm/px, > 0"),
    ("wsi", "--min-tissue", "1.5", "in [0, 1]"),
    ("wsi", "--reader", "bioformats", "auto | cucim | openslide | tiffslide"),
    ("wsi", "--feature-dtype", "int8", "float16 | float32"),
    ("wsi", "--precision", "int4", "auto | fp32 | bf16 | fp16 | int8"),  # int8 is a wsi precision now (issue 14)
    ("mri", "--precision", "int8", "auto | fp32 | bf16 | fp16"),
    ("wsi", "--device", "tpu", "auto | cpu | cuda"),
    ("mri", "--shape", "4,16,16", "integer >= 8"),
    ("mri", "--spacing", "1,0,1", "mm"),
    ("mri", "--volume-index", "-1", "integer >= 0"),
    ("text", "--pooling", "max", "mean | cls"),
    ("text", "--batch-size", "0", "integer >= 1"),
])
def test_bad_value_exits_2_naming_the_flag_and_what_it_takes(cohort: Path, modality: str, flag: str, value: str,
                                                             takes: str) -> None:
    res = _extract(cohort, "--modality", modality, flag, value)
    assert res.exit_code == 2, res.output
    assert f"{flag} " in res.stderr and takes in res.stderr, res.stderr
    assert "Traceback" not in res.output and not (cohort / "never.zarr").exists()


@pytest.mark.parametrize(("modality", "args", "flag"), [
    ("mri", ["--mpp", "0.5"], "--mpp"),
    ("text", ["--weights", "w.pt"], "--weights"),
    ("wsi", ["--pooling", "cls"], "--pooling"),
    ("text", ["--spacing", "2"], "--spacing"),
])
def test_a_flag_of_another_modality_is_refused(cohort: Path, modality: str, args: list[str], flag: str) -> None:
    res = _extract(cohort, "--modality", modality, *args)
    assert res.exit_code == 2
    assert f"{flag} does not apply to --modality {modality}. Fix: remove it." in res.stderr


def test_reader_choices_come_from_the_registry() -> None:
    assert WsiOptions.build({"reader": "auto"}).reader == "auto"
    for name in READER_NAMES:
        assert WsiOptions.build({"reader": name}).reader == name
    with pytest.raises(InputError, match=r"--reader 'bioformats'.*tiffslide"):
        WsiOptions.build({"reader": "bioformats"})


@pytest.mark.parametrize(("cls", "given"), [
    (WsiOptions, dict(TINY, tissue_threshold=0.2, min_tissue_area=0, default_mpp=0.25, weights=None, qc=False)),
    (MriOptions, dict(spacing="2", shape="16,24,32", volume_index=1, seed=3, precision="fp32")),
    (TextOptions, dict(max_tokens=128, stride=16, pooling="cls", device="cpu")),
    (TabularOptions, dict(categorical=["grade"], id_column="case")),
])
def test_options_round_trip_through_json(cls, given: dict) -> None:
    opts = cls.build(given)
    doc = json.loads(json.dumps(opts.to_json()))  # what a spec, a store attr or a dask worker sees
    assert cls.from_json(doc) == opts
    assert set(doc) == set(cls.fields())
    assert MriOptions.build(dict(spacing="2", shape=16)).spacing == (2.0, 2.0, 2.0)


def test_defaults_are_the_documented_ones() -> None:
    w = WsiOptions.build({})
    assert (w.encoder, w.mpp, w.patch_size, w.min_tissue, w.batch_size, w.reader, w.feature_dtype, w.qc) == \
        ("resnet50_trunc", 0.5, 224, 0.25, 64, "auto", "float16", True)
    m = MriOptions.build({})
    assert (m.encoder, m.spacing, m.shape, m.volume_index, m.order) == ("r3d18", (1.5,) * 3, (64,) * 3, None, 1)
    t = TextOptions.build({"device": None, "stride": None})  # None = not given
    assert (t.encoder, t.pooling, t.batch_size, t.max_tokens, t.stride) == ("minilm-l6", "mean", 16, None, None)
    assert {n: MODALITIES.get(n).unit for n in MODALITIES.names()} == {"wsi": "tile", "mri": "step", "text": "note",
                                                                                 "slide": "slide"}


def test_cross_field_rule_names_both_flags() -> None:
    with pytest.raises(InputError, match=r"--stride 64 must be below --max-tokens 64"):
        TextOptions.build({"max_tokens": 64, "stride": 64})


def test_spec_carries_json_options_validated_again_by_the_extractor(cohort: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    spec = make_spec(store, **TINY)
    assert spec.kwargs["options"] == WsiOptions.build(TINY).to_json()
    json.dumps(spec.kwargs)  # JSON all the way: what dask ships to its workers
    tampered = {**spec.kwargs, "options": {**spec.kwargs["options"], "patch_size": 2}}
    with pytest.raises(InputError, match="--patch-size 2"):
        WSIExtractor(**tampered)
    with pytest.raises(InputError, match="--nonsense is not an option"):
        WSIExtractor(**{**spec.kwargs, "options": {**spec.kwargs["options"], "nonsense": 1}})


def test_options_are_recorded_in_the_store(cohort: Path, tmp_path: Path) -> None:
    from mmcli.features.runner import run_extraction

    store = tmp_path / "s.zarr"
    spec = make_spec(store, **TINY, qc=False)
    s = run_extraction(load_manifest(cohort / "m.csv").rows, spec, store, progress=False)
    assert s.count("done") == 1
    st = open_store(store, "r")
    recorded = st.read_item("wsi", spec.encoder_id, "P1", "a").attrs["options"]
    assert WsiOptions.from_json(recorded) == WsiOptions.build({**TINY, "qc": False})
    assert st.encoder_attrs("wsi", spec.encoder_id)["options"]["patch_size"] == 32


def test_tabular_options(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("patient_id,a\nP1,1\nP2,2\n")
    with pytest.raises(InputError, match=r"--max-levels 1.*integer >= 2"):
        ingest_table(tmp_path / "t.csv", "t", tmp_path / "s.zarr", max_levels=1)
    ingest_table(tmp_path / "t.csv", "t", tmp_path / "s.zarr")
    attrs = open_store(tmp_path / "s.zarr", "r")._attrs("tabular/t")
    assert TabularOptions.from_json(attrs["options"]) == TabularOptions()
