"""``mmcli ablate``: fit modality subsets x fusion operators and compare them, with CIs.

Which subsets (``modalities`` = M names):

* default: every single modality, every pair, and the full set (M + M(M-1)/2 + 1 subsets; 22 for M = 6
  instead of 63);
* ``max_subset_size=k``: every subset of 1..k modalities (k >= M: all 2^M - 1);
* ``subsets=[("wsi", "omics"), ...]``: exactly these.

Each subset with two or more modalities is fitted once per fusion operator by a head that takes a ``fusion``
parameter (``fusion_mlp``; operators: the fusion registry, :data:`mmcli.heads.nn.fusion.FUSIONS`); a single modality
is fitted once (fusion label ``single``, fitted with ``concat``: with one modality there is nothing to fuse).
Other heads fit each subset once (fusion ``-``). Every fit goes through
:func:`mmcli.heads.training.fitting.fit_run` (without explanations) into ``out/<m1+m2+...>__<fusion or head>/``;
a fit whose folder already holds the same finished job is reused (``force=True`` refits). One failing fit is
recorded and the others go on.

Outputs: ``out/ablation.csv`` (subset, n_modalities, head, fusion, metric, mean, ci_low, ci_high, n_patients,
run_dir, status), ``out/ablation.png`` (bars with 95% CI, best single modality highlighted) and
``out/ablation_summary.json`` (best single, best fusion, and ``mmcli compare`` of the two on shared patients).
"""
from __future__ import annotations

import itertools
import json
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.heads.training.fitting import fit_run
from mmcli.heads.training.options import build_fit_options
from mmcli.pipeline.errors import InputError, MmcliError
from mmcli.pipeline.io import atomic_write_with, write_csv, write_json
from mmcli.pipeline.rundir import read_metrics

DEFAULT_HEAD = "fusion_mlp"
SINGLE = "single"
SINGLE_FUSION = "concat"  # what a single-modality fit of a fusing head runs with
NO_FUSION = "-"
DEFAULT_METRIC = {"classification": "auroc", "survival": "c_index", "regression": "r2"}
JOB_FILE = "ablation_job.json"
SELECTION_NOTE = ("the best single and best multimodal fits are picked on the same out-of-fold predictions "
                  "they are compared on; with many fits, read the p-value as exploratory")
COLUMNS = ["subset", "n_modalities", "head", "fusion", "metric", "mean", "ci_low", "ci_high", "n_patients",
           "run_dir", "status"]


@dataclass(frozen=True)
class Job:
    """One fit of the ablation: a modality subset with one head (and fusion operator)."""

    subset: tuple[str, ...]
    head: str
    fusion: str  # operator name, SINGLE, or NO_FUSION for heads without fusion operators

    @property
    def fuses(self) -> bool:
        return self.fusion != NO_FUSION

    @property
    def name(self) -> str:
        return f"{'+'.join(self.subset)}__{self.fusion if self.fuses else self.head}"

    def fit_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        p = dict(params or {})
        if self.fuses:
            p["fusion"] = SINGLE_FUSION if self.fusion == SINGLE else self.fusion
        return p


def fusion_names() -> list[str]:
    """The fusion operators, from the fusion registry (imports the fusion module, hence torch)."""
    from mmcli.heads.nn.fusion import FUSIONS

    return FUSIONS.names()


def takes_fusion(head: str) -> bool:
    """Whether head ``head`` has a ``fusion`` parameter (from its parameter model, not its name)."""
    from mmcli.heads import head_class

    return "fusion" in head_class(head).param_names()


# ---- planning ---------------------------------------------------------------------------------------------
def parse_subsets(text: str) -> list[tuple[str, ...]]:
    """``"wsi+omics,wsi,omics"`` -> ``[("wsi", "omics"), ("wsi",), ("omics",)]`` (CLI ``--subsets``)."""
    out = []
    for part in text.split(","):
        names = tuple(n.strip() for n in part.split("+") if n.strip())
        if not names:
            raise InputError(f"--subsets {text!r}: empty subset. Fix: e.g. --subsets wsi+omics,wsi,omics")
        out.append(names)
    return out


def enumerate_subsets(
    modalities: Sequence[str], *, max_subset_size: int | None = None,
    subsets: Sequence[Sequence[str]] | None = None,
) -> list[tuple[str, ...]]:
    """Modality subsets to fit, each in the order of ``modalities``, sorted by size then position."""
    mods = list(modalities)
    if not mods:
        raise InputError("ablation needs at least one modality")
    if len(set(mods)) != len(mods):
        raise InputError(f"modality listed twice in {mods}")
    pos = {m: i for i, m in enumerate(mods)}
    if subsets is not None:
        out = []
        for s in subsets:
            unknown = [m for m in s if m not in pos]
            if unknown or not s or len(set(s)) != len(s):
                raise InputError(f"subset {list(s)}: " + (f"unknown modalities {unknown} (known: {mods})"
                                                          if unknown else "empty or repeats a modality"))
            t = tuple(sorted(s, key=pos.__getitem__))
            if t not in out:
                out.append(t)
        return sorted(out, key=lambda t: (len(t), [pos[m] for m in t]))
    if max_subset_size is None:
        sizes = sorted({1, min(2, len(mods)), len(mods)})
    else:
        if max_subset_size < 1:
            raise InputError(f"max_subset_size must be >= 1, got {max_subset_size}")
        sizes = list(range(1, min(max_subset_size, len(mods)) + 1))
    return [c for k in sizes for c in itertools.combinations(mods, k)]


def plan_jobs(
    subsets: Sequence[tuple[str, ...]], *, heads: Sequence[str] = (DEFAULT_HEAD,),
    fusions: Sequence[str] | None = None,
) -> list[Job]:
    """Jobs for every subset x head (x fusion operator for subsets of 2+ modalities of a fusing head);
    ``fusions`` default: every registered operator."""
    known = fusion_names()
    fusions = known if fusions is None else list(fusions)
    bad = [f for f in fusions if f not in known]
    if bad or not fusions:
        raise InputError(f"unknown fusion operator(s) {bad or '(none given)'}; choose from {known}")
    if not heads:
        raise InputError("ablation needs at least one head")
    fusing = {h: takes_fusion(h) for h in dict.fromkeys(heads)}
    jobs = []
    for s in subsets:
        for h in heads:
            if not fusing[h]:
                jobs.append(Job(s, h, NO_FUSION))
            elif len(s) == 1:
                jobs.append(Job(s, h, SINGLE))
            else:
                jobs.extend(Job(s, h, f) for f in dict.fromkeys(fusions))
    return jobs


# ---- running ----------------------------------------------------------------------------------------------
def _spec(job: Job, common: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    return {"job": asdict(job), "params": job.fit_params(params), **common}


def _reusable(run_dir: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The finished fit's metrics when ``run_dir`` holds exactly this job, else None."""
    try:
        if json.loads((run_dir / JOB_FILE).read_text()) == json.loads(json.dumps(spec, default=str)):
            return read_metrics(run_dir)
    except (OSError, ValueError):
        pass
    return None


def _row(job: Job, run_dir: Path, metric: str, result: dict[str, Any] | None, status: str) -> dict[str, Any]:
    m = ((result or {}).get("metrics") or {}).get(metric) or {}
    m = {k: np.nan if m.get(k) is None else m[k] for k in ("mean", "ci_low", "ci_high")}  # None: undefined
    return {"subset": "+".join(job.subset), "n_modalities": len(job.subset), "head": job.head,
            "fusion": job.fusion, "metric": metric, "mean": m["mean"],
            "ci_low": m["ci_low"], "ci_high": m["ci_high"],
            "n_patients": (result or {}).get("n_patients"), "run_dir": str(run_dir), "status": status}


def ablate(
    store: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    target: str | None = None,
    time: str | None = None,
    event: str | None = None,
    modalities: Sequence[str] | None = None,
    fusions: Sequence[str] | None = None,
    heads: Sequence[str] = (DEFAULT_HEAD,),
    encoders: dict[str, str] | None = None,
    folds: int = 5,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    max_subset_size: int | None = None,
    subsets: Sequence[Sequence[str]] | None = None,
    metric: str | None = None,
    force: bool = False,
    compare_best: bool = True,
    n_boot: int = 1000,
    drop_unmatched: bool = True,
    echo: Callable[[str], None] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_budget: str | None = None,
    task: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Fit every planned subset x fusion (see the module doc) and return the ablation table.

    ``metric`` defaults to ``auroc`` (classification) or ``c_index`` (survival). ``n_boot``: bootstrap
    replicates of each fit's CIs and of the best-multimodal vs best-single comparison. ``drop_unmatched``
    (default True, passed to fit): each fit uses the labelled patients that have at least one of its
    modalities, so a single-modality fit may see fewer patients than a multimodal one (column ``n_patients``);
    the summary comparison pairs the two runs on their shared patients. The table is also written to
    ``out/ablation.csv`` with ``out/ablation.png`` and ``out/ablation_summary.json``; ``table.attrs["summary"]``
    holds the summary. Rows whose fit failed have ``status = "failed: ..."`` and NaN metric values.
    ``scheduler`` (``local`` or a dask scheduler address): the fits run as dask tasks, ``workers`` at a time on a
    local cluster (a worker lost mid-fit is retried); the table is the same as in-process for the same seed.
    """
    survival = time is not None or event is not None
    if (target is not None) == survival or (survival and (time is None or event is None)):
        raise InputError("give either target (classification) or both time and event (survival)")
    for what, p in (("feature store", store), ("labels table", labels)):
        if not Path(p).exists():
            raise InputError(f"{what} not found: {p}")
    task = task or ("classification" if target is not None else "survival")
    metric = metric or DEFAULT_METRIC[task]
    say = echo or (lambda s: None)
    if modalities is None:
        from mmcli.heads.data import available_modalities
        from mmcli.pipeline.store import open_store

        modalities = available_modalities(open_store(store, "r"))
    jobs = plan_jobs(enumerate_subsets(modalities, max_subset_size=max_subset_size, subsets=subsets),
                     heads=heads, fusions=fusions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"store": str(Path(store).resolve()), "labels": str(Path(labels).resolve()), "target": target,
              "task": task,
              "time": time, "event": event, "encoders": dict(encoders or {}), "folds": folds, "seed": seed,
              "n_boot": n_boot, "drop_unmatched": drop_unmatched}
    rows: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, Job, Any, dict[str, Any]]] = []
    for k, job in enumerate(jobs, 1):
        run_dir = out / job.name
        spec = _spec(job, common, params)
        prefix = f"[{k}/{len(jobs)}] {job.name}"
        cached = None if force else _reusable(run_dir, spec)
        if cached is not None:
            say(f"{prefix}: reused finished fit")
            rows[k] = _row(job, run_dir, metric, cached, "reused")
            continue
        (run_dir / JOB_FILE).unlink(missing_ok=True)
        try:
            opts = build_fit_options(dict(
                head=job.head, store=store, labels=labels, out=run_dir, target=target, time=time, event=event,
                modalities=list(job.subset), encoders=encoders, folds=folds, seed=seed,
                params=job.fit_params(params), n_boot=n_boot, drop_unmatched=drop_unmatched,
                strict_match=not drop_unmatched, explain="none", overwrite=True,  # not reusable: replaced whole
                memory_budget=memory_budget, task=task))
        except MmcliError as e:
            rows[k] = _failed(out, job, run_dir, metric, prefix, e, say)
            continue
        todo.append((k, job, opts, spec))
    runs = (_run_on_dask(todo, say, len(jobs), scheduler, workers) if scheduler is not None
            else _run_here(todo, say, len(jobs), progress))
    for k, job, _opts, spec, result, error in runs:
        run_dir, prefix = out / job.name, f"[{k}/{len(jobs)}] {job.name}"
        if error is not None:
            rows[k] = _failed(out, job, run_dir, metric, prefix, error, say)
            continue
        write_json(run_dir / JOB_FILE, json.loads(json.dumps(spec, default=str)))
        row = _row(job, run_dir, metric, result, "ok")
        say(f"{prefix}: {metric} {row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
        rows[k] = row
    rows = [rows[k] for k in sorted(rows)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_csv(out / "ablation.csv", table, float_format=None)
    from mmcli.stages.ablate.figure import ablation_figure

    atomic_write_with(out / "ablation.png", lambda p: ablation_figure(table, metric).savefig(p, format="png"))
    summary = summarise(table, compare_best=compare_best, n_boot=n_boot, seed=seed)
    write_json(out / "ablation_summary.json", summary, allow_nan=True)
    table.attrs["summary"] = summary
    return table


def _failed(out: Path, job: Job, run_dir: Path, metric: str, prefix: str, e: BaseException,
            say: Callable[[str], None]) -> dict[str, Any]:
    detail = f"{type(e).__name__}: {e}"
    say(f"{prefix}: FAILED {detail}")
    with open(out / "ablation_errors.log", "a") as fh:
        tb = "".join(traceback.format_exception(e)) if not isinstance(e, MmcliError) else detail
        fh.write(f"== {job.name}\n{tb}\n")
    return _row(job, run_dir, metric, None, f"failed: {detail}")


Todo = list[tuple[int, Job, Any, dict[str, Any]]]


def _run_here(todo: Todo, say: Callable[[str], None], n_jobs: int, progress: bool = False
              ) -> Iterator[tuple[int, Job, Any, dict[str, Any], dict[str, Any] | None, BaseException | None]]:
    """The fits one after another in this process (with ``progress``: each fit's fold and epoch bars)."""
    for k, job, opts, spec in todo:
        say(f"[{k}/{n_jobs}] {job.name}: fitting {job.head}" + (f" ({job.fusion})" if job.fuses else ""))
        try:
            yield k, job, opts, spec, fit_run(opts, progress=progress), None
        except Exception as e:  # noqa: BLE001 - one failing fit is reported, the ablation goes on
            yield k, job, opts, spec, None, e


def _fit_task(opts: Any) -> dict[str, Any]:
    """A dask task: one fit of the ablation (its folds in this worker, one after another)."""
    return fit_run(opts)


def _run_on_dask(todo: Todo, say: Callable[[str], None], n_jobs: int, scheduler: str | None, workers: int | None
                 ) -> Iterator[tuple[int, Job, Any, dict[str, Any], dict[str, Any] | None, BaseException | None]]:
    """The fits as dask tasks (each retried twice when its worker dies), reported as they finish."""
    from distributed import as_completed

    from mmcli.pipeline.scale import connect

    assert scheduler is not None
    client, cluster = connect(scheduler, workers)
    try:
        futures = {client.submit(_fit_task, opts, retries=2, pure=False,
                                 key=f"mmcli-ablate-{k}-{uuid.uuid4().hex[:8]}"): (k, job, opts, spec)
                   for k, job, opts, spec in todo}
        say(f"{len(futures)} fit(s) submitted to dask ({scheduler})")
        for fut in as_completed(futures):
            k, job, opts, spec = futures[fut]
            try:
                yield k, job, opts, spec, fut.result(), None
            except Exception as e:  # noqa: BLE001 - one failing fit is reported, the ablation goes on
                yield k, job, opts, spec, None, e
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _best(table: pd.DataFrame) -> dict[str, Any] | None:
    ok = table[table["mean"].notna()]
    if ok.empty:
        return None
    r = ok.loc[ok["mean"].idxmax()]
    return {k: (None if pd.isna(r[k]) else r[k]) for k in ("subset", "head", "fusion", "mean", "ci_low",
                                                           "ci_high", "run_dir")}


def summarise(table: pd.DataFrame, *, compare_best: bool = True, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Best single modality, best multimodal fit and (optionally) ``compare`` of the two."""
    metric = table["metric"].iloc[0] if len(table) else None
    single = _best(table[table["n_modalities"] == 1])
    fused = _best(table[table["n_modalities"] > 1])
    summary: dict[str, Any] = {
        "metric": metric, "n_fits": int(len(table)),
        "n_failed": int(table["status"].str.startswith("failed").sum()),
        "best_single": single, "best_multimodal": fused, "comparison": None,
        "note": SELECTION_NOTE,
    }
    if compare_best and single and fused:
        from mmcli.heads.evaluation.compare import compare

        try:
            summary["comparison"] = compare(fused["run_dir"], single["run_dir"], n_boot=n_boot, seed=seed)
        except MmcliError as e:
            summary["comparison"] = {"error": str(e)}
    return summary


def format_ablation(table: pd.DataFrame) -> str:
    """The ablation table (best first) and the best-multimodal vs best-single comparison, as plain text."""
    if table.empty:
        return "no fits planned"
    metric = table["metric"].iloc[0]
    w = max(12, *(len(str(x)) for x in table["subset"]))
    lines = [f"  {'subset':<{w}} {'fusion':<16} {metric:>8} {'95% CI':>17}  status"]
    for _, r in table.sort_values("mean", ascending=False, na_position="last").iterrows():
        what = r["fusion"] if r["fusion"] != NO_FUSION else r["head"]
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if pd.notna(r["ci_low"]) else ""
        val = f"{r['mean']:.3f}" if pd.notna(r["mean"]) else "–"
        lines.append(f"  {r['subset']:<{w}} {what:<16} {val:>8} {ci:>17}  {r['status']}")
    s = table.attrs.get("summary") or {}
    cmp = s.get("comparison") or {}
    if "difference" in cmp:
        fb, sb = s["best_multimodal"], s["best_single"]
        lines.append(f"\n  best multimodal ({fb['subset']} · {fb['fusion']}) - best single ({sb['subset']}): "
                     f"{cmp['difference']:+.3f} [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}], "
                     f"p = {cmp['p_value']:.3g} ({cmp['method'].replace('_', ' ')}, {cmp['n_matched']} patients)")
        lines.append(f"  note: {SELECTION_NOTE}")
    elif "error" in cmp:
        lines.append(f"\n  comparison of best multimodal vs best single not possible: {cmp['error']}")
    return "\n".join(lines)
