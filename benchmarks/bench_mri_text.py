"""MRI and clinical-note extraction benchmark (a script, not a test): must-show (d) of issue 14, "MRI volumes/s
and notes/s >= 0.85 x their best encoder-alone", everything measured in one run on the same inputs.

- **pipeline**: ``mmcli extract`` (in this process, default options: ``--runtime auto``), its rate taken from the
  item times of the run record (items / the sum of their seconds: read, preprocess or tokenise, encode, store);
  the whole command's wall time is reported beside it.
- **encoder alone**, on inputs prepared up front (MRI: preprocessed ``(1, 1, Z, Y, X)`` volumes; notes: their
  tokenised windows, encoded in the same length buckets and pooled), for every runtime this machine offers:
  torch eager (``--precision auto``), torch.compile (unless ``--no-compile`` or it fails), OpenVINO. The
  **best** of them is the denominator of (d).

The configurations alternate: each round runs the pipeline over all items, then each encoder-alone
configuration over all items (their order rotated from round to round); rates are medians over ``--rounds``
rounds, and (d) is given both as the ratio of those medians and as the median of the per-round ratios. A warm-up
round (model loading, IR conversion, compilation) is not counted. The cosine of OpenVINO to torch fp32 features
(the figure that lets both share an encoder_id) is reported too.

Volumes are synthetic LAS-oriented NIfTI files (``--source-shape`` voxels at 0.8 x 0.8 x 2.5 mm, a bright
ellipsoid in noise), encoded on the default 64^3 grid at 1.5 mm; notes are concatenations of ``mmcli synth``
pathology notes, ~100 to ~1500 tokens long, windows of 256 tokens.
Run: ``python benchmarks/bench_mri_text.py [--volumes 8] [--notes 24] [--rounds 3] [--no-compile] [--out r.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HEADER = "patient_id,modality,path,item_id\n"


def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": round(float(c.mean()), 6), "min": round(float(c.min()), 6)}


def timed_items(fn: Callable[[int], object], n: int) -> list[float]:
    """Seconds of ``fn(i)`` for every item."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def pipeline_items(modality: str, manifest: Path, store: Path) -> tuple[list[float], float]:
    """``mmcli extract --force`` of ``manifest``: the item seconds from its run record, and the wall time."""
    from mmcli.stages.extract import extract

    t0 = time.perf_counter()
    run = extract(modality, manifest, store, force=True, progress=False)
    wall = time.perf_counter() - t0
    record = json.loads(Path(run.record_path).read_text())
    done = [o["seconds"] for o in record["outcomes"] if o["status"] == "done"]
    assert len(done) == len(record["outcomes"]), run.problems
    return done, wall


def alternate(configs: dict[str, Callable[[], list[float]]], rounds: int, n: int) -> dict:
    """Run every configuration once per round (pipeline first, the others rotated); rates and (d)."""
    names = list(configs)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 1):  # round 0 warms up
        others = names[1:]
        k = r % max(1, len(others))
        for name in [names[0], *others[k:], *others[:k]]:
            secs = configs[name]()
            if r:
                rates[name].append(n / sum(secs))
    alone = [k for k in names if k.startswith("alone")]
    med = {k: round(statistics.median(v), 4) for k, v in rates.items()}
    best = max(alone, key=lambda k: med[k])
    per_round = [rates["pipeline"][i] / max(rates[k][i] for k in alone) for i in range(rounds)]
    return {"rates_median": med, "rates_per_round": {k: [round(x, 4) for x in v] for k, v in rates.items()},
            "best_alone": best, "d_ratio_of_medians": round(med["pipeline"] / med[best], 3),
            "d_median_of_round_ratios": round(statistics.median(per_round), 3),
            "d_round_ratios": [round(x, 3) for x in per_round]}


def _encoders(make: Callable[..., object], compile_: bool) -> tuple[dict[str, object], dict[str, str]]:
    """The encoder-alone configurations that run here: name -> encoder; and the ones that could not."""
    from mmcli.features.encoders.runtime import openvino_version

    out, skipped = {"alone_torch": make(runtime="torch", precision="auto")}, {}
    if compile_:
        out["alone_torch_compile"] = make(runtime="torch-compile", precision="auto")
    else:
        skipped["alone_torch_compile"] = "--no-compile"
    if openvino_version():
        out["alone_openvino"] = make(runtime="openvino", precision="auto")
    else:
        skipped["alone_openvino"] = "openvino not installed"
    return out, skipped


def _warm(encoders: dict[str, object], skipped: dict[str, str], first: Callable[[object], object]) -> None:
    """Run each encoder once (conversion, compilation); one that fails is dropped and said why."""
    for name in list(encoders):
        try:
            first(encoders[name])
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a C compiler
            skipped[name] = f"{type(e).__name__}: {str(e)[:200]}"
            del encoders[name]


# ---- MRI ------------------------------------------------------------------------------------------------------
def write_volumes(d: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """``n`` LAS NIfTI volumes (int16, gzip) and a manifest of them."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    spacing = (0.8, 0.8, 2.5)
    aff = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    grid = np.stack(np.meshgrid(*[(np.arange(s) - s / 2) * sp for s, sp in zip(shape, spacing)], indexing="ij"))
    lines = [HEADER.strip()]
    for i in range(n):
        r = rng.uniform(20, 45, 3)
        body = ((grid / r[:, None, None, None]) ** 2).sum(0) < 1.0
        vol = rng.rayleigh(15, shape) + body * rng.uniform(300, 600) + body * rng.normal(0, 40, shape)
        nib.save(nib.Nifti1Image(np.clip(vol, 0, 32767).astype(np.int16), aff), str(d / f"v{i:03d}.nii.gz"))
        lines.append(f"P{i:03d},mri,v{i:03d}.nii.gz,T1")
    (d / "mri.csv").write_text("\n".join(lines) + "\n")
    return d / "mri.csv"


def bench_mri(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from mmcli.features.encoders.registry import create_encoder
    from mmcli.features.mri import DEFAULT_SHAPE, DEFAULT_SPACING, MriParams, load_volume, preprocess, to_tensor_layout
    from mmcli.pipeline.manifest import load_manifest

    d = work / "mri"
    d.mkdir()
    manifest = write_volumes(d, args.volumes, tuple(args.source_shape))
    rows = load_manifest(manifest).rows
    params = MriParams(DEFAULT_SPACING, DEFAULT_SHAPE)
    t0 = time.perf_counter()
    vols = [to_tensor_layout(preprocess(load_volume(r.path)[0], params, r.path.name)[0]) for r in rows]
    prep_s = (time.perf_counter() - t0) / len(rows)
    encs, skipped = _encoders(lambda **kw: create_encoder("r3d18", quiet=True, **kw), args.compile)
    _warm(encs, skipped, lambda e: e.encode(vols[0]))
    n = len(rows)
    configs: dict[str, Callable[[], list[float]]] = {
        "pipeline": lambda: pipeline_items("mri", manifest, work / "mri.zarr")[0]}
    for name, e in encs.items():
        configs[name] = lambda e=e: timed_items(lambda i: e.encode(vols[i]), n)
    res = alternate(configs, args.rounds, n)
    fp32 = create_encoder("r3d18", quiet=True, runtime="torch", precision="fp32")
    ref = np.concatenate([fp32.encode(v) for v in vols])
    cos = {k: _cos(np.concatenate([e.encode(v) for v in vols]), ref) for k, e in encs.items()}
    _, wall = pipeline_items("mri", manifest, work / "mri.zarr")
    return {"volumes": n, "source_shape": list(args.source_shape), "grid": list(DEFAULT_SHAPE),
            "spacing_mm": list(DEFAULT_SPACING), "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
            "precision": {k: e.precision for k, e in encs.items()}, "skipped": skipped, **res,
            "whole_extract_command_volumes_per_s": round(n / wall, 4),
            "read_and_preprocess_s_per_volume": round(prep_s, 4), "cosine_to_torch_fp32": cos}


# ---- notes ----------------------------------------------------------------------------------------------------
def write_notes(d: Path, n: int, seed: int = 0) -> Path:
    """``n`` notes of 1 to 16 concatenated synthetic pathology reports (~100-1500 tokens)."""
    from mmcli.stages.synth.cohort import draw_cohort
    from mmcli.stages.synth.notes import render_note

    pats = draw_cohort(max(16, n), seed)
    rng = np.random.default_rng(seed)
    lines = [HEADER.strip()]
    for i in range(n):
        k = int(rng.integers(1, 17))
        (d / f"n{i:03d}.txt").write_text("\n".join(render_note(seed, pats[(i + j) % len(pats)]) for j in range(k)))
        lines.append(f"P{i:03d},text,n{i:03d}.txt,note")
    (d / "text.csv").write_text("\n".join(lines) + "\n")
    return d / "text.csv"


def bench_text(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from mmcli.features.encoders.registry import create_encoder
    from mmcli.pipeline.manifest import load_manifest

    d = work / "text"
    d.mkdir()
    manifest = write_notes(d, args.notes)
    rows = load_manifest(manifest).rows
    texts = [Path(r.path).read_text() for r in rows]
    encs, skipped = _encoders(lambda **kw: create_encoder("minilm-l6", **kw), args.compile)
    tok = next(iter(encs.values()))
    windows = [tok.tokenize(t) for t in texts]  # tokenised up front: the encoder alone

    def alone(e, i: int) -> np.ndarray:
        v, c = e.encode_windows(windows[i])
        return (v * c[:, None]).sum(0) / c.sum()

    _warm(encs, skipped, lambda e: [alone(e, i) for i in range(len(texts))])
    n = len(rows)
    configs: dict[str, Callable[[], list[float]]] = {
        "pipeline": lambda: pipeline_items("text", manifest, work / "text.zarr")[0]}
    for name, e in encs.items():
        configs[name] = lambda e=e: timed_items(lambda i: alone(e, i), n)
    res = alternate(configs, args.rounds, n)
    fp32 = create_encoder("minilm-l6", runtime="torch", precision="fp32")
    ref = np.stack([alone(fp32, i) for i in range(n)])
    cos = {k: _cos(np.stack([alone(e, i) for i in range(n)]), ref) for k, e in encs.items()}
    _, wall = pipeline_items("text", manifest, work / "text.zarr")
    tokens = [len(tok.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts]
    return {"notes": n, "windows": int(sum(w["input_ids"].shape[0] for w in windows)),
            "tokens_median": int(np.median(tokens)), "tokens_max": int(max(tokens)), "window": tok.window,
            "stride": tok.stride, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
            "precision": {k: e.precision for k, e in encs.items()}, "skipped": skipped, **res,
            "whole_extract_command_notes_per_s": round(n / wall, 4), "cosine_to_torch_fp32": cos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--source-shape", type=int, nargs=3, default=[192, 192, 48], metavar=("X", "Y", "Z"))
    ap.add_argument("--notes", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds after one warm-up round")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    ap.add_argument("--skip", choices=["mri", "text"], action="append", default=[])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="mmcli-bench-mt-"))
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "loadavg_start": os.getloadavg()}}
    try:
        if "mri" not in args.skip:
            res["mri"] = bench_mri(args, work)
            print(json.dumps(res["mri"], indent=2), flush=True)
        if "text" not in args.skip:
            res["text"] = bench_text(args, work)
            print(json.dumps(res["text"], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    from mmcli.features.encoders.runtime import openvino_version

    res["machine"].update(torch=torch.__version__, openvino=openvino_version(), loadavg_end=os.getloadavg(),
                          max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
