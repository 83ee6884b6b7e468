"""The demo cohort under two runtimes, and int8 against float WSI features downstream (a script, not a test).

``runtime`` (issue 14 (f)): the extraction step of ``make demo`` (``mmcli demo``: wsi, mri, text, then the
tables) with the default runtime (``--runtime auto``: OpenVINO on a CPU where it is installed) against
``--runtime torch``, in one run on one cohort built once. Every run writes a fresh store (so tissue detection,
tiling and encoding are all redone, as in ``make demo``). The OpenVINO conversion is paid once per encoder and
OpenVINO version: the first ``auto`` run starts from an empty ``$MMCLI_CACHE`` and is reported apart ("first
run"); then ``--rounds`` rounds alternate the two runtimes (torch first in even rounds, auto first in odd ones)
with the converted models cached; the medians of those rounds give the ratio. The conversion itself is also
timed directly on the WSI encoder (convert + compile, then load from the cache). Modalities whose options take
no ``runtime`` (at the time of writing MRI and notes run on torch) run the same way in both configurations.

``int8`` (issue 14 (b), downstream): one store with the demo cohort's WSI features twice, at the default float
precision and with ``--precision int8`` (each its own ``encoder_id``), plus MRI, notes and tables; every head
that ``mmcli demo`` fits is fitted on each (same seed and folds; ``fit(encoders={"wsi": ...})``), and the two
runs are compared with ``mmcli compare``'s machinery (paired on the same patients: DeLong for a binary AUROC,
paired bootstrap for the multiclass macro AUROC and the c-index). The difference is int8 - float.

Run: ``python benchmarks/bench_demo_runtime.py --patients 120 --rounds 3 --out demo_rt.json`` (120 = what
``make demo`` synthesises; fewer patients give a shorter run on a small machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

MODALITIES = ("wsi", "mri", "text")
WITHIN = 0.01


def build_cohort(work: Path, patients: int, seed: int) -> tuple[Any, float]:
    """The demo's cohort (``mmcli demo`` step 1) and the seconds it took. A complete cohort of the same size and
    seed already in ``work`` (a re-run with ``--work``) is reused as it is: re-writing it would change the
    files' mtimes, and with them the fingerprints of the store items extracted from them."""
    from mmcli.stages.synth import synth

    out = work / "cohort"
    marker = out / ".mmcli_synth.json"
    if marker.is_file():
        doc = json.loads(marker.read_text())
        if doc.get("complete") and doc.get("seed") == seed and doc.get("patients") == patients:
            counts = Counter(line.split(",")[1] for line in (out / "manifest.csv").read_text().splitlines()[1:])
            tables = {p.stem: p for p in sorted((out / "tables").glob("*.csv"))}
            return SimpleNamespace(out_dir=out, manifest=out / "manifest.csv", labels=out / "labels.csv",
                                   tables=tables, patients=patients, slides=counts["wsi"],
                                   mri_volumes=counts["mri"], notes=counts["text"]), 0.0
    t0 = time.perf_counter()
    cohort = synth(out, patients=patients, seed=seed)
    return cohort, time.perf_counter() - t0


def first_patients(cohort: Any, k: int, work: Path) -> Any:
    """The cohort restricted to its first ``k`` patients (a manifest of their rows; the tables stay whole):
    the same files, so a small machine can time a slice of the demo cohort."""
    lines = Path(cohort.manifest).read_text().splitlines()
    keep = sorted({line.split(",")[0] for line in lines[1:]})[:k]
    rows = [line for line in lines[1:] if line.split(",")[0] in keep]
    sub = work / f"manifest_first{k}.csv"
    # paths in the manifest are relative to its folder: make them absolute for a manifest written elsewhere
    base = Path(cohort.manifest).parent
    out = [lines[0]]
    for line in rows:
        pid, modality, path, *rest = line.split(",")
        out.append(",".join([pid, modality, str((base / path).resolve()), *rest]))
    sub.write_text("\n".join(out) + "\n")
    counts = Counter(line.split(",")[1] for line in rows)
    return SimpleNamespace(out_dir=cohort.out_dir, manifest=sub, labels=cohort.labels, tables=cohort.tables,
                           patients=len(keep), slides=counts["wsi"], mri_volumes=counts["mri"], notes=counts["text"])


def _takes_runtime(modality: str) -> bool:
    from mmcli.stages.extract import modality_of

    return "runtime" in modality_of(modality).options.fields()


def extract_like_demo(cohort: Any, store: Path, runtime: str, **wsi_options: Any) -> dict[str, Any]:
    """``mmcli demo``'s step 2 (every modality, then the tables) with ``runtime`` where a modality takes one:
    seconds per modality (the run's own wall time) and overall, the WSI tile count and each run's runtime."""
    from mmcli.features.tabular import ingest_table
    from mmcli.pipeline.store import open_store
    from mmcli.stages.extract import extract

    out: dict[str, Any] = {"seconds": {}, "runtime": {}, "failed": {}}
    t0 = time.perf_counter()
    for modality in MODALITIES:
        opts = {"runtime": runtime} if _takes_runtime(modality) else {}
        if modality == "wsi":
            opts.update(wsi_options)
        t = time.perf_counter()
        summary = extract(modality=modality, manifest=cohort.manifest, store=store, progress=False, **opts)
        out["seconds"][modality] = round(time.perf_counter() - t, 2)
        out["failed"][modality] = len(summary.problems)
        fs = open_store(store, "r")
        keys = list(fs.iter_items(modality, summary.encoder_id))
        first = fs.item_attrs(modality, summary.encoder_id, keys[0].patient_id, keys[0].item_id) if keys else {}
        out["runtime"][modality] = {k: (first or {}).get(k) for k in ("runtime", "precision", "ov_converted_now")}
        if modality == "wsi":
            out["wsi_tiles"] = int(sum(fs.item_attrs("wsi", summary.encoder_id, k.patient_id, k.item_id)["n_tiles"]
                                       for k in keys))
            out["wsi_encoder_id"] = summary.encoder_id
    t = time.perf_counter()
    for name, table in cohort.tables.items():
        ingest_table(table=table, name=name, store=store)
    out["seconds"]["tables"] = round(time.perf_counter() - t, 2)
    out["seconds"]["overall"] = round(time.perf_counter() - t0, 2)
    return out


def conversion_cost(encoder: str, patch_size: int, cache: Path) -> dict[str, float]:
    """Seconds to make the WSI encoder ready on OpenVINO from an empty cache (torch build + conversion + compile +
    one tile) and again from the cache (read the IR + compile, with OpenVINO's blob cache + one tile)."""
    from mmcli.features.encoders.registry import create_encoder

    tile = np.zeros((1, patch_size, patch_size, 3), np.uint8)
    out = {}
    for label in ("first_run_s", "cached_s"):
        if label == "first_run_s":
            shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        create_encoder(encoder, runtime="openvino").encode(tile)
        out[label] = round(time.perf_counter() - t0, 2)
    return out


def runtime_bench(args: argparse.Namespace, cohort: Any, work: Path) -> dict[str, Any]:
    """(f): the demo's extraction, default runtime vs ``--runtime torch``, alternating, medians and ratios."""
    cache = work / "mmcli-cache"
    os.environ["MMCLI_CACHE"] = str(cache)  # an empty cache: the first auto run converts
    runs: list[dict[str, Any]] = []

    def one(runtime: str, rnd: int | str) -> None:
        store = work / f"rt_{runtime}_{rnd}.zarr"
        rec = extract_like_demo(cohort, store, runtime)
        rec.update(config=runtime, round=rnd)
        runs.append(rec)
        print(json.dumps({k: rec[k] for k in ("config", "round", "seconds")}), flush=True)
        for p in store.parent.glob(store.name + "*"):  # the store and its siblings (.plans, .qc, .runs, ...)
            shutil.rmtree(p, ignore_errors=True)

    one("auto", "first")  # converts every OpenVINO model into the empty cache
    for r in range(args.rounds):
        for runtime in (("torch", "auto") if r % 2 == 0 else ("auto", "torch")):
            one(runtime, r)
    keys = [*MODALITIES, "tables", "overall"]
    med = {cfg: {k: round(statistics.median(x["seconds"][k] for x in runs if x["config"] == cfg
                                            and x["round"] != "first"), 2) for k in keys}
           for cfg in ("auto", "torch")}
    first = next(x for x in runs if x["round"] == "first")
    conv = conversion_cost(args.encoder, 224, cache)
    return {
        "patients": cohort.patients, "slides": cohort.slides, "mri_volumes": cohort.mri_volumes,
        "notes": cohort.notes, "wsi_tiles": first["wsi_tiles"], "rounds": args.rounds,
        "runtime_used": {cfg: next(x["runtime"] for x in runs if x["config"] == cfg) for cfg in ("auto", "torch")},
        "median_seconds": med,
        "torch_over_auto": {k: round(med["torch"][k] / med["auto"][k], 2) if med["auto"][k] else None
                            for k in keys},
        "auto_first_run_seconds": first["seconds"],
        "auto_first_minus_cached_median": {k: round(first["seconds"][k] - med["auto"][k], 2) for k in keys},
        "wsi_openvino_conversion": conv,
        "runs": runs,
    }


def int8_bench(args: argparse.Namespace, cohort: Any, work: Path) -> dict[str, Any]:
    """(b) downstream: every demo head on float vs int8 WSI features, compared on the same patients."""
    from mmcli.features.tabular import ingest_table
    from mmcli.heads import head_class
    from mmcli.pipeline.store import open_store
    from mmcli.stages.compare import compare
    from mmcli.stages.extract import extract
    from mmcli.stages.fit import fit
    from mmcli.workflows.demo import HEADS

    store = work / "int8.zarr"
    t0 = time.perf_counter()
    eid_f = extract("wsi", cohort.manifest, store, progress=False).encoder_id
    t_float = time.perf_counter() - t0
    eid_8 = extract("wsi", cohort.manifest, store, precision="int8", progress=False).encoder_id
    t_int8 = time.perf_counter() - t0 - t_float
    for modality in ("mri", "text"):
        extract(modality, cohort.manifest, store, progress=False)
    for name, table in cohort.tables.items():
        ingest_table(table=table, name=name, store=store)
    fs = open_store(store, "r")
    fidelity = (fs.encoder_attrs("wsi", eid_8) or {}).get("int8", {}).get("fidelity")
    heads: dict[str, Any] = {}
    for head in HEADS:
        classifies = bool({"binary", "multiclass"} & set(head_class(head).tasks))
        task = dict(target="subtype") if classifies else dict(time="time", event="event")
        runs = {}
        for tag, eid in (("float", eid_f), ("int8", eid_8)):
            run_dir = work / "runs" / f"{head}_{tag}"
            t = time.perf_counter()
            res = fit(head, store, cohort.labels, run_dir, folds=args.folds, seed=args.seed, drop_unmatched=True,
                      overwrite=True, explain=False, encoders={"wsi": eid}, **task)
            runs[tag] = {"dir": run_dir, "modalities": res.get("modalities"),
                         "fit_s": round(time.perf_counter() - t, 1),
                         "fold_mean": {m: v.get("mean") for m, v in res.get("metrics", {}).items()
                                       if isinstance(v, dict) and m in ("auroc", "c_index")}}
        cmp = compare(runs["int8"]["dir"], runs["float"]["dir"], n_boot=args.n_boot, seed=args.seed)
        d, lo, hi = cmp["difference"], cmp["ci_low"], cmp["ci_high"]
        heads[head] = {
            "metric": cmp["metric"], "method": cmp["method"], "n_patients": cmp["n_matched"],
            "modalities": runs["float"]["modalities"],
            "float": round(cmp["run_b"]["value"], 4), "int8": round(cmp["run_a"]["value"], 4),
            "difference_int8_minus_float": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "p_value": cmp.get("p_value"),
            "within_0.01": abs(d) <= WITHIN, "ci_within_0.01": lo >= -WITHIN and hi <= WITHIN,
            "fold_mean_metrics": {tag: runs[tag]["fold_mean"] for tag in runs},
            "fit_s": {tag: runs[tag]["fit_s"] for tag in runs},
        }
        print(json.dumps({head: heads[head]}), flush=True)
    return {"patients": cohort.patients, "slides": cohort.slides, "folds": args.folds, "seed": args.seed,
            "encoder_ids": {"float": eid_f, "int8": eid_8}, "int8_fidelity": fidelity,
            "extract_s": {"wsi_float": round(t_float, 1), "wsi_int8_incl_calibration": round(t_int8, 1)},
            "heads": heads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=120, help="demo cohort size (make demo: 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--max-patients", type=int, default=None, help="runtime: time only the first N patients' "
                    "files of the cohort (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the runtime comparison")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--encoder", default="resnet50_trunc", help="the WSI encoder (for the conversion timing)")
    ap.add_argument("--skip", choices=["runtime", "int8"], action="append", default=[])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="mmcli-bench-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                       "python": platform.python_version(),
                                       "load_avg_start": os.getloadavg()}}
    try:
        cohort, synth_s = build_cohort(work, args.patients, args.seed)
        res["cohort"] = {"patients": cohort.patients, "slides": cohort.slides, "synth_s": round(synth_s, 1)}
        if "runtime" not in args.skip:
            sub = first_patients(cohort, args.max_patients, work) if args.max_patients else cohort
            res["f_runtime"] = runtime_bench(args, sub, work)
        if "int8" not in args.skip:
            res["b_int8_downstream"] = int8_bench(args, cohort, work)
    finally:
        res["machine"]["load_avg_end"] = os.getloadavg()
        text = json.dumps(res, indent=2, default=str)
        if args.out:
            args.out.write_text(text)
        print(text)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
