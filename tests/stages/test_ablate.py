"""mmcli ablate: subset enumeration, job planning, reuse and failure isolation with a fake fit; and, when the fit
stage exists, an end-to-end run on a tiny store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from helpers.fake_runs import classification_run
from mmcli.pipeline.errors import InputError
from mmcli.stages import ablate as ab

SIX = ["wsi", "mri", "text", "genes", "proteins", "clinical"]


def test_default_subsets_are_singles_pairs_and_the_full_set() -> None:
    subsets = ab.enumerate_subsets(SIX)
    assert len(subsets) == 6 + 15 + 1
    assert subsets[:6] == [(m,) for m in SIX]
    assert subsets[-1] == tuple(SIX)
    assert all(len(s) == 2 for s in subsets[6:-1]) and len(set(subsets)) == len(subsets)
    assert ab.enumerate_subsets(["a"]) == [("a",)]
    assert ab.enumerate_subsets(["a", "b"]) == [("a",), ("b",), ("a", "b")]


def test_max_subset_size_and_explicit_subsets() -> None:
    assert len(ab.enumerate_subsets(SIX, max_subset_size=2)) == 21
    assert len(ab.enumerate_subsets(SIX, max_subset_size=3)) == 6 + 15 + 20
    assert len(ab.enumerate_subsets(SIX, max_subset_size=6)) == 63
    assert len(ab.enumerate_subsets(SIX, max_subset_size=99)) == 63
    explicit = ab.enumerate_subsets(SIX, subsets=[("genes", "wsi"), ("wsi",), ("wsi", "genes")])
    assert explicit == [("wsi",), ("wsi", "genes")]  # modality order, duplicates dropped, singles first
    assert ab.parse_subsets("wsi+genes, wsi ,text") == [("wsi", "genes"), ("wsi",), ("text",)]
    with pytest.raises(InputError, match="unknown modalities"):
        ab.enumerate_subsets(SIX, subsets=[("wsi", "ct")])
    with pytest.raises(InputError, match="empty"):
        ab.parse_subsets("wsi,,text")
    with pytest.raises(InputError, match=">= 1"):
        ab.enumerate_subsets(SIX, max_subset_size=0)


def test_plan_fits_singles_once_and_multimodal_subsets_per_fusion() -> None:
    """The operator list is the fusion registry's (``ab.fusion_names()``, sorted), no longer a copied tuple."""
    assert ab.fusion_names() == ["attention", "bilinear", "concat", "cross_attention", "gated"]
    jobs = ab.plan_jobs(ab.enumerate_subsets(["wsi", "genes", "text"]))
    assert len(jobs) == 3 + (3 + 1) * len(ab.fusion_names())
    singles = [j for j in jobs if len(j.subset) == 1]
    assert [(j.fusion, j.name) for j in singles] == [("single", "wsi__single"), ("single", "genes__single"),
                                                       ("single", "text__single")]
    assert singles[0].fit_params({"epochs": 3}) == {"epochs": 3, "fusion": "concat"}
    pair = [j for j in jobs if j.subset == ("wsi", "genes")]
    assert [j.fusion for j in pair] == ab.fusion_names()
    assert pair[3].name == "wsi+genes__cross_attention" and pair[3].fit_params(None) == {"fusion": "cross_attention"}
    mixed = ab.plan_jobs([("wsi",), ("wsi", "genes")], heads=["xgboost", "fusion_mlp"], fusions=["gated"])
    assert [j.name for j in mixed] == ["wsi__xgboost", "wsi__single", "wsi+genes__xgboost", "wsi+genes__gated"]
    assert mixed[0].fit_params({"fusion": "x"}) == {"fusion": "x"}  # non-fusion heads get params untouched
    with pytest.raises(InputError, match="unknown fusion"):
        ab.plan_jobs([("wsi",)], fusions=["sum"])


class FakeFit:
    """Writes a realistic classification run dir; more modalities and `gated` fusion give a better model."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_on = fail_on

    def __call__(self, opts: Any, say: Any = None, progress: bool = False) -> dict[str, Any]:
        kw = {**dict(opts), "params": opts.head_params.given()}
        self.calls.append(kw)
        mods = kw["modalities"]
        if self.fail_on in mods:
            raise InputError(f"no patients have {self.fail_on}")
        signal = 0.4 + 0.8 * len(mods) + (0.5 if kw["params"].get("fusion") == "gated" else 0.0)
        signal += 0.2 * (mods == ["wsi"])
        run = classification_run(Path(kw["out"]), n=150, signal=signal, head=kw["head"], modalities=mods,
                                 seed=len(self.calls))
        return json.loads((run / "metrics.json").read_text())


def _ablate(tmp_path: Path, fake: FakeFit, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> pd.DataFrame:
    monkeypatch.setattr(ab, "fit_run", fake)
    (tmp_path / "store.zarr").mkdir(exist_ok=True)
    (tmp_path / "labels.csv").touch()
    args = {"modalities": ["wsi", "genes", "text"], "fusions": ("concat", "gated"), "folds": 3, "seed": 1,
            "params": {"epochs": 2}, "n_boot": 200}
    args.update(kw)
    return ab.ablate(tmp_path / "store.zarr", tmp_path / "labels.csv", tmp_path / "abl", target="subtype", **args)


def test_ablate_with_fake_fit_writes_table_chart_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeFit()
    table = _ablate(tmp_path, fake, monkeypatch)
    out = tmp_path / "abl"
    assert len(fake.calls) == len(table) == 3 + 4 * 2
    first = fake.calls[0]
    assert first["head"] == "fusion_mlp" and first["modalities"] == ["wsi"] and first["target"] == "subtype"
    assert first["params"] == {"epochs": 2, "fusion": "concat"} and first["folds"] == 3 and first["seed"] == 1
    assert first["n_boot"] == 200 and first["drop_unmatched"] is True
    assert {c["out"].name for c in fake.calls} == {
        "wsi__single", "genes__single", "text__single", "wsi+genes__concat", "wsi+genes__gated",
        "wsi+text__concat", "wsi+text__gated", "genes+text__concat", "genes+text__gated",
        "wsi+genes+text__concat", "wsi+genes+text__gated"}
    on_disk = pd.read_csv(out / "ablation.csv")
    assert list(on_disk.columns) == ab.COLUMNS and len(on_disk) == len(table)
    row = on_disk.set_index(["subset", "fusion"]).loc[("wsi+genes", "gated")]
    metrics = json.loads((out / "wsi+genes__gated" / "metrics.json").read_text())["metrics"]["auroc"]
    assert (row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx(
        (metrics["mean"], metrics["ci_low"], metrics["ci_high"]))
    assert row["n_modalities"] == 2 and row["metric"] == "auroc" and row["status"] == "ok"
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "ablation_summary.json").read_text())
    singles = table[table["n_modalities"] == 1]
    assert summary["best_single"]["subset"] == singles.loc[singles["mean"].idxmax(), "subset"]
    assert summary["best_multimodal"]["mean"] == pytest.approx(table[table["n_modalities"] > 1]["mean"].max())
    cmp = summary["comparison"]
    assert cmp["metric"] == "auroc" and cmp["method"] == "delong" and cmp["n_matched"] == 150
    assert cmp["difference"] > 0 and cmp["p_value"] < 0.05  # planted: fusion beats the best single modality
    text = ab.format_ablation(table)
    assert "best multimodal (wsi+genes+text" in text and f"{cmp['difference']:+.3f}" in text


@pytest.mark.slow
def test_ablate_reuses_finished_fits_and_refits_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = FakeFit()
    t1 = _ablate(tmp_path, first, monkeypatch, compare_best=False)
    again = FakeFit()
    t2 = _ablate(tmp_path, again, monkeypatch, compare_best=False)
    assert again.calls == [] and set(t2["status"]) == {"reused"}
    np.testing.assert_allclose(t1["mean"], t2["mean"])
    changed = FakeFit()
    _ablate(tmp_path, changed, monkeypatch, compare_best=False, params={"epochs": 3})
    assert len(changed.calls) == len(t1)
    forced = FakeFit()
    _ablate(tmp_path, forced, monkeypatch, compare_best=False, params={"epochs": 3}, force=True)
    assert len(forced.calls) == len(t1)


def test_one_failing_fit_does_not_stop_the_ablation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = _ablate(tmp_path, FakeFit(fail_on="text"), monkeypatch, subsets=[("wsi",), ("text",), ("wsi", "genes")])
    status = dict(zip(table["subset"] + "/" + table["fusion"], table["status"]))
    assert status["text/single"].startswith("failed: InputError: no patients have text")
    assert status["wsi/single"] == "ok" and status["wsi+genes/gated"] == "ok"
    assert table.loc[table["subset"] == "text", "mean"].isna().all()
    assert "text__single" in (tmp_path / "abl" / "ablation_errors.log").read_text()
    assert table.attrs["summary"]["n_failed"] == 1
    assert "failed: InputError" in ab.format_ablation(table)
    assert (tmp_path / "abl" / "ablation.png").is_file()


def test_ablate_refuses_bad_endpoints(tmp_path: Path) -> None:
    for kw in ({"target": "y", "time": "t", "event": "e"}, {}, {"time": "t"}):
        with pytest.raises(InputError, match="either target"):
            ab.ablate(tmp_path / "s", tmp_path / "l", tmp_path / "o", modalities=["a"], **kw)
    with pytest.raises(InputError, match="feature store not found"):
        ab.ablate(tmp_path / "s", tmp_path / "l", tmp_path / "o", modalities=["a"], target="y")


def _tiny_store(tmp_path: Path, n: int = 40) -> tuple[Path, Path]:
    """Two tables with complementary planted signal (each sees half of it), a binary label; the last 4
    patients have no clinical row."""
    from mmcli.pipeline.store import open_store

    rng = np.random.default_rng(0)
    ids = [f"P{i:03d}" for i in range(n)]
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = (a + b > 0).astype(int)
    store = open_store(tmp_path / "tiny.zarr", "a")
    store.write_table("genes", pd.DataFrame(np.c_[a + rng.normal(0, .3, n), rng.normal(size=(n, 3))], index=ids))
    clinical = pd.DataFrame(np.c_[b + rng.normal(0, .3, n), rng.normal(size=(n, 2))], index=ids)
    store.write_table("clinical", clinical.iloc[:-4])
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"patient_id": ids, "y": np.where(y == 1, "pos", "neg")}).to_csv(labels, index=False)
    return tmp_path / "tiny.zarr", labels


@pytest.mark.slow
def test_ablate_end_to_end_with_the_real_fit(tmp_path: Path) -> None:
    pytest.importorskip("mmcli.stages.fit", reason="the fit stage has not landed yet")
    store, labels = _tiny_store(tmp_path)
    table = ab.ablate(store, labels, tmp_path / "abl", target="y", fusions=("gated",), folds=2, seed=0,
                      params={"epochs": 10}, n_boot=50)
    assert list(table["subset"]) == ["clinical", "genes", "clinical+genes"]  # store order
    assert list(table["fusion"]) == ["single", "single", "gated"]
    assert (table["status"] == "ok").all(), table["status"].tolist()
    assert list(table["n_patients"]) == [36, 40, 40]  # patients without clinical data leave only its single fit
    assert table["mean"].between(0, 1).all() and (table["ci_low"] <= table["ci_high"]).all()
    for d in table["run_dir"]:
        cfg = json.loads((Path(d) / "config.json").read_text())
        assert (Path(d) / "predictions.csv").is_file() and cfg["params"]["fusion"] in ("concat", "gated")
    assert (tmp_path / "abl" / "ablation.png").is_file()
    summary = table.attrs["summary"]
    assert summary["comparison"]["n_matched"] == (36 if summary["best_single"]["subset"] == "clinical" else 40)
    again = ab.ablate(store, labels, tmp_path / "abl", target="y", fusions=("gated",), folds=2, seed=0,
                      params={"epochs": 10}, n_boot=50)
    assert set(again["status"]) == {"reused"}
