"""Head, fusion and preprocessor registries: lazy imports, typed parameters, head policy, saved-params checks."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.planted_data import make_store
from mmcli.heads import HEADS, create_head, head_class, list_heads, load_head
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.targets import build_target
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store

REPO = Path(__file__).resolve().parents[2]
MIL_HEADS = ("clam_sb", "clam_mb", "dsmil", "transmil")  # the bag heads besides attention_mil


def _imports_after(code: str) -> set[str]:
    """Modules loaded by a fresh interpreter after running ``code`` (this process has imported everything)."""
    probe = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
    return set(out.stdout.split())


def test_importing_heads_imports_no_head_and_xgboost_needs_no_torch():
    mods = _imports_after("import mmcli.heads")
    heads = {f"mmcli.heads.models.{m}" for m in ("attention_mil", "clam", "cox", "dsmil", "fusion_mlp", "transmil",
                                                 "xgboost")}
    assert not mods & heads
    assert "torch" not in mods and "sklearn" not in mods
    mods = _imports_after("from mmcli.heads import head_class; head_class('xgboost')")
    assert mods & heads == {"mmcli.heads.models.xgboost"}
    assert "torch" not in mods
    mods = _imports_after("import mmcli.stages.fit; from mmcli.heads import head_class; head_class('xgboost')")
    assert "torch" not in mods and "lifelines" not in mods


def test_registry_describes_heads_with_their_policy():
    desc = HEADS.describe()
    assert sorted(desc) == list_heads() == ["attention_mil", "clam_mb", "clam_sb", "cox", "dsmil", "fusion_mlp",
                                            "transmil", "xgboost"]
    assert desc["cox"]["tasks"] == ("survival",) and desc["attention_mil"]["input_kind"] == "bag"
    assert desc["xgboost"]["input_kind"] == "vector" and desc["fusion_mlp"]["input_kind"] == "mixed"
    for mil in MIL_HEADS:
        assert desc[mil]["input_kind"] == "bag" and desc[mil]["tasks"] == ("classification", "survival", "regression")
        assert head_class(mil).needs_every_modality
    assert head_class("attention_mil").needs_every_modality
    assert not any(head_class(h).needs_every_modality for h in ("cox", "fusion_mlp", "xgboost"))


def test_default_modalities_and_usable_patients_come_from_the_head_class():
    assert head_class("xgboost").default_modalities(["mri", "wsi"], ["genes"]) == ["mri", "wsi", "genes"]
    assert head_class("fusion_mlp").default_modalities(["mri"], ["genes"]) == ["mri", "genes"]
    for h in ("attention_mil", *MIL_HEADS):
        assert head_class(h).default_modalities(["mri", "wsi"], ["genes"]) == ["wsi"]
    with pytest.raises(InputError, match=r"s\.zarr: attention_mil needs a bag modality.*--modalities.*'mri'"):
        head_class("attention_mil").default_modalities(["mri"], ["genes"], "s.zarr")
    pres = np.array([[True, True], [True, False], [False, False]])
    assert head_class("attention_mil").usable_patients(pres).tolist() == [True, False, False]
    assert head_class("fusion_mlp").usable_patients(pres).tolist() == [True, True, False]


def test_no_stage_branches_on_a_head_name():
    """Head names may appear in mmcli/stages as data (defaults, the demo's list), never in a comparison."""
    names = set(list_heads())
    offenders = []
    for f in sorted((REPO / "mmcli" / "stages").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c.value in names for c in consts):
                    offenders.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


# ---- typed parameters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("head, params, match", [
    ("xgboost", {"n_estimators": 0}, r"--param n_estimators=0: .*greater than or equal to 1.*\(takes: boosting"),
    ("xgboost", {"subsample": 1.5}, r"--param subsample=1\.5: .*\(takes: .*0 < x <= 1\)"),
    ("xgboost", {"class_weight": "heavy"}, r"--param class_weight='heavy'.*balanced"),
    ("cox", {"l1_ratio": -0.1}, r"--param l1_ratio=-0\.1"),
    ("attention_mil", {"loss": "hinge"}, r"--param loss='hinge': Input should be 'ce' or 'focal'"),
    ("attention_mil", {"epochs": "ten"}, r"--param epochs='ten': .*valid integer"),
    ("attention_mil", {"device": "gpu"}, r"--param device='gpu'.*cpu \| cuda"),
    ("fusion_mlp", {"fusion": "sum"}, r"--param fusion='sum': .*unknown fusion 'sum'.*bilinear \| concat"),
    ("fusion_mlp", {"fusion": "cross_attention", "hidden": 30, "n_heads": 4}, r"n_heads=4: .*divisible"),
    ("fusion_mlp", {"dropout": 1.0}, r"--param dropout=1\.0: .*less than 1"),
    ("clam_sb", {"k_sample": 0}, r"--param k_sample=0: .*greater than or equal to 1"),
    ("clam_mb", {"k_sample": 10**6}, r"--param k_sample=1000000: .*less than or equal to 4096"),
    ("clam_sb", {"bag_weight": 0.0}, r"--param bag_weight=0\.0: .*greater than 0"),
    ("dsmil", {"max_weight": 1.0}, r"--param max_weight=1\.0: .*less than 1"),
    ("dsmil", {"attn_dim": 10**5}, r"--param attn_dim=100000: .*less than or equal to 8192"),
    ("transmil", {"hidden": 30, "n_heads": 8}, r"n_heads=8: .*transmil needs hidden \(30\) divisible"),
    ("transmil", {"pinv_iterations": 500}, r"--param pinv_iterations=500: .*less than or equal to 50"),
    ("transmil", {"n_landmarks": 0}, r"--param n_landmarks=0: .*greater than or equal to 1"),
])
def test_bad_parameter_values_are_input_errors_naming_the_key_and_what_it_takes(head, params, match):
    with pytest.raises(InputError, match=match):
        create_head(head, **params)
    with pytest.raises(InputError, match=match):
        head_class(head).user_params(params)


def test_parameters_keep_explicit_nulls_and_fusion_choices_come_from_the_registry():
    from mmcli.heads.nn.fusion import FUSIONS

    assert create_head("xgboost", class_weight=None).class_weight is None
    assert create_head("fusion_mlp", n_components=None).n_components is None
    assert create_head("fusion_mlp", epochs=3.0).epochs == 3  # a JSON 3.0 is a whole number of epochs
    desc = head_class("fusion_mlp").Params.model_fields["fusion"].description
    assert all(f in desc for f in FUSIONS.names())
    with pytest.raises(InputError, match=r"set by the run"):
        head_class("xgboost").user_params({"task": "binary"})
    with pytest.raises(InputError, match=r"has no parameter\(s\) \['flag_prefix'\]"):
        create_head("xgboost", flag_prefix="--")


def test_fusion_and_preprocessor_registries_refuse_unknown_names(tmp_path):
    from mmcli.heads.nn.fusion import FUSIONS
    from mmcli.heads.preprocess.vector import PREPROCESSORS, load_preprocessors

    assert FUSIONS.names() == ["attention", "bilinear", "concat", "cross_attention", "gated"]
    assert PREPROCESSORS.names() == ["instance", "vector"]
    (tmp_path / "preprocess.json").write_text(json.dumps({"genes": {"type": "robust"}}))
    with pytest.raises(InputError, match=r"preprocess\.json: modality 'genes': unknown preprocessor 'robust'"):
        load_preprocessors(tmp_path)


# ---- saved parameters are validated again on load -------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    p = make_store(d / "s.zarr", n=20, task="binary", seed=5, modalities=("wsi", "genes"))
    fs = open_store(p.store, "r")
    cohort = load_cohort(fs, resolve_sources(fs, None), list(p.labels.index))
    target = build_target(p.labels, target="label")
    create_head("xgboost", n_estimators=5).fit(cohort, target.y).save(d / "model")
    return p, d / "model"


def test_edited_bad_param_in_a_saved_model_names_the_file_and_the_fix(saved, tmp_path):
    p, model = saved
    assert load_head(model).n_estimators == 5
    bad = tmp_path / "model"
    bad.mkdir()
    for f in model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["params"]["max_depth"] = -2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=rf"{bad / 'config.json'} \"params\": --param max_depth=-2: .*Fix: restore"):
        load_head(bad)
    cfg["params"] = {**cfg["params"], "max_depth": 3, "depth": 3}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"config\.json \"params\": head 'xgboost' has no parameter\(s\) \['depth'\]"):
        load_head(bad)
    mmcli = str(Path(sys.executable).with_name("mmcli"))
    r = subprocess.run([mmcli, "predict", "--model", str(bad), "--store", str(p.store), "--out",
                        str(tmp_path / "o.csv")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert str(bad / "config.json") in r.stderr and "Fix:" in r.stderr
    assert not (tmp_path / "o.csv").exists()


def test_a_misspelt_head_is_suggested_once_even_when_an_alias_matches_too():
    with pytest.raises(InputError, match=r"unknown head 'trnasmil'\. Did you mean 'transmil' or 'dsmil'\?") as e:
        create_head("trnasmil")  # close to both transmil and its alias trans_mil
    assert str(e.value).count("'transmil'") == 2  # the suggestion, and the list of choices
    assert head_class("CLAM") is head_class("clam_sb") and head_class("trans_mil") is head_class("transmil")
