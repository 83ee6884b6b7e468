"""``mmcli run study.yaml``: a whole study from one file (:mod:`mmcli.workflows.study_file` is the format).

Steps, in this order, each calling the same stage function as its CLI verb:

1. cohort: ``mmcli synth`` into ``OUT/cohort`` (files already there with the same bytes are left alone), or the
   given manifest, labels and tables;
2. extract: each modality of ``extract:`` into the store (cached items are skipped), then every table;
3. a check of every fit before the first one runs (store, labels, columns, subgroups: ``read_inputs``);
4. fits: each into ``OUT/runs/<name>`` with its ``report.html`` (one line per run: its headline metric and the
   report's path), the fit's own progress lines passed through;
5. comparisons (``OUT/compare/<a>-vs-<b>.json``), ablations (``OUT/<name>``), exports (QuPath GeoJSON, heatmaps).

The study is written back resolved (:func:`~mmcli.workflows.study_file.write_resolved`) to ``OUT/study.yaml``
before anything runs and into every run and ablation folder when it is done, so each result can be replayed
with ``mmcli run <that file> --only <name>``. ``only`` restricts steps 4-5 to the named fits, ablations,
comparisons (``a-vs-b``) and exports of named runs; the cohort and extraction steps always run (cached items are
skipped, so they cost a check). A stopped extraction (SIGINT/SIGTERM, a full disk) stops the study.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import InputError, MmcliError, ModalityNotAvailable
from mmcli.pipeline.io import atomic_write_text
from mmcli.workflows.study_file import Study, StudyError, write_resolved

Echo = Callable[[str], None]
STUDY_FILE = "study.yaml"
HEADLINE = {"classification": "auroc", "survival": "c_index"}


@dataclass
class StudyResult:
    """What a study run did; ``code`` is its exit code (0 ok, 1 some item or fit failed, else a stop's code)."""

    code: int = 0
    cohort: Any = None
    store: Path | None = None
    extracted: list[str] = field(default_factory=list)
    fits: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    compares: dict[str, dict[str, Any]] = field(default_factory=dict)
    ablations: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None


def headline_line(name: str, res: dict[str, Any], report: Path | None) -> str:
    """``attention_mil  AUROC 0.812 [0.75, 0.86] (mean of 5 folds)  -> runs/attention_mil/report.html``."""
    from mmcli.heads.evaluation import headline

    key = HEADLINE.get(res.get("task", ""), "")
    m = (res.get("metrics") or {}).get(key)
    if isinstance(m, dict) and m.get("mean") is not None:
        lo, hi, _ = headline.headline_interval(m)
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
        text = f"{'AUROC' if key == 'auroc' else 'c-index'} {m['mean']:.3f}{ci} ({headline.scope(m)})"
    else:
        text = "no headline metric"
    return f"{name}: {text}" + (f" -> {report}" if report else "")


def _selected(name: str, only: set[str] | None) -> bool:
    return only is None or name in only


def run_study(study: Study, *, only: Sequence[str] | None = None, echo: Echo = print, progress: bool = True,
              fit: Callable[..., dict[str, Any]] | None = None) -> StudyResult:
    """Run ``study`` (module docstring); ``only``: names of the fits, ablations and comparisons to run. ``fit``
    replaces the fit-and-report step (tests)."""
    wanted = set(only) if only else None
    if wanted:
        unknown = sorted(wanted - set(study.names()))
        if unknown:
            raise StudyError(f"--only {','.join(unknown)}: no such fit, ablation or comparison in the study "
                             f"(names: {', '.join(study.names())}).")
    res = StudyResult(store=study.store)
    study.out.mkdir(parents=True, exist_ok=True)
    write_resolved(study, study.out / STUDY_FILE)
    t0 = time.perf_counter()

    echo("== cohort")
    t = time.perf_counter()
    res.cohort = _cohort(study, echo)
    res.timings["synth" if study.cohort.synth else "cohort"] = time.perf_counter() - t

    echo("== extract")
    t = time.perf_counter()
    if not _extract(study, res, echo, progress):
        res.timings["total"] = time.perf_counter() - t0
        return res
    res.timings["extract"] = time.perf_counter() - t

    fits = [f for f in study.fits if _selected(f.name, wanted)]
    if fits:
        echo("== check every fit before the first one runs")
        _preflight(fits)
        echo(f"== fit ({len(fits)} run{'s' if len(fits) > 1 else ''})")
        t = time.perf_counter()
        run_fit = fit or _fit_and_report
        for k, step in enumerate(fits, 1):
            tf = time.perf_counter()
            echo(f"-- {k}/{len(fits)} {step.name}: {step.options.head} -> {step.options.out}")
            try:
                out, report = run_fit(study, step, lambda line, name=step.name: echo(f"   {name}: {line}"))
            except MmcliError as e:
                res.failed[step.name] = str(e)
                res.code = max(res.code, 1)
                echo(f"{step.name}: FAILED: {e}")
                continue
            res.fits[step.name] = out
            if report is not None:
                res.reports[step.name] = report
            write_resolved(study, step.options.out / STUDY_FILE, only=step.name)
            res.timings[f"fit {step.name}"] = time.perf_counter() - tf
            echo(headline_line(step.name, out, report))
        res.timings["fit"] = time.perf_counter() - t

    _compare(study, res, wanted, echo)
    _ablate(study, res, wanted, echo)
    _exports(study, res, wanted, echo)
    res.timings["total"] = time.perf_counter() - t0
    return res


# ---- steps ---------------------------------------------------------------------------------------------------------
def _cohort(study: Study, echo: Echo) -> Any:
    from types import SimpleNamespace

    if study.cohort.synth is not None:
        from mmcli.stages.synth import synth

        s = study.cohort.synth
        cohort = synth(study.cohort_dir, patients=s.patients, seed=s.seed)
        echo(f"synthetic cohort of {cohort.patients} patients in {cohort.out_dir} ({cohort.written} file(s) written, "
             f"{cohort.unchanged} unchanged)")
        return cohort
    c = study.cohort
    for what, p in (("manifest", c.manifest), ("labels", c.labels),
                    *((f"tables.{k}", t.table) for k, t in c.tables.items())):
        if p is None or not Path(p).is_file():
            raise InputError(f"cohort.{what}: {p}: no such file. Fix: check the path in the study file.")
    echo(f"cohort: manifest {c.manifest}, labels {c.labels}, {len(c.tables)} table(s)")
    return SimpleNamespace(manifest=c.manifest, labels=c.labels, tables={k: t.table for k, t in c.tables.items()})


def _extract(study: Study, res: StudyResult, echo: Echo, progress: bool) -> bool:
    """Every modality, then every table; False when an extraction was stopped (the study stops with it)."""
    from mmcli.features.tabular import ingest_table
    from mmcli.stages.extract import extract

    for step in study.extract:
        try:
            summary = extract(step.modality, res.cohort.manifest, study.store, force=step.force,
                              scheduler=step.scheduler, workers=step.workers, progress=progress,
                              **step.options.to_json())
        except ModalityNotAvailable as e:
            echo(f"skipped {step.modality}: {e}")
            continue
        res.code = max(res.code, summary.exit_code)
        echo(f"{step.modality}: done {summary.count('done')}, cached {summary.count('cached')}, failed "
             f"{len(summary.problems)} ({summary.seconds:.1f}s)")
        if summary.stopped:
            res.stopped = summary.stopped
            res.code = summary.exit_code
            echo(f"stopped: {summary.stopped}")
            return False
        res.extracted.append(step.modality)
    specs = study.cohort.tables if study.cohort.synth is None else {}
    for name, path in res.cohort.tables.items():
        spec = specs.get(name)
        ingest_table(table=path, name=name, store=study.store, id_column=spec.id_column if spec else "patient_id",
                     categorical=spec.categorical if spec else None)
        res.extracted.append(name)
    if res.cohort.tables:
        echo(f"tables: {', '.join(res.cohort.tables)} -> {study.store}")
    return True


def _preflight(fits: Sequence[Any]) -> None:
    """Open the store and labels and check every fit's columns (subgroups included) now, so that a bad
    column of the fifth fit does not surface after four cross-validations."""
    from mmcli.heads.training.fitting import read_inputs

    problems = []
    for step in fits:
        try:
            read_inputs(step.options, lambda _line: None)
        except MmcliError as e:
            problems.append(f"fits {step.name}: {e}")
    if problems:
        raise InputError("; ".join(problems))


def _fit_and_report(study: Study, step: Any, log: Echo) -> tuple[dict[str, Any], Path | None]:
    from mmcli.stages.fit import fit
    from mmcli.stages.report import report

    out = fit(options=step.options, log=log)
    path = None
    if step.report:
        r = study.reports
        path = report(step.options.out, attention_patients=r.attention_patients, top_tiles=r.top_tiles)
        if r.card:
            from mmcli.heads.card import write_card

            write_card(step.options.out)
    return out, path


def _compare(study: Study, res: StudyResult, wanted: set[str] | None, echo: Echo) -> None:
    from mmcli.pipeline.io import dumps
    from mmcli.stages.compare import compare, format_comparison

    for c in study.compare:
        name = f"{c.a}-vs-{c.b}"
        if not _selected(name, wanted):
            continue
        if c.a not in res.fits and not (study.run_dir(c.a) / "metrics.json").is_file():
            echo(f"compare {name}: skipped, {c.a} was not fitted")
            continue
        echo(f"== compare {name}")
        out = compare(study.run_dir(c.a), study.run_dir(c.b), n_boot=c.n_boot, seed=c.seed, alpha=c.alpha)
        path = study.out / "compare" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dumps(out))
        res.compares[name] = out
        echo(format_comparison(out))
        echo(f"-> {path}")


def subsets_for(spec: Any, extracted: Sequence[str]) -> list[tuple[str, ...]] | None:
    """The ablation's subsets: explicit lists as given, ``singles+all`` from what was extracted (each alone and
    all together), ``default`` None (the ablation's own grid)."""
    if spec.subsets == "default":
        return None
    if spec.subsets == "singles+all":
        names = list(spec.modalities or extracted)
        return [(m,) for m in names] + ([tuple(names)] if len(names) > 1 else [])
    return [tuple(s) for s in spec.subsets]


def _ablate(study: Study, res: StudyResult, wanted: set[str] | None, echo: Echo) -> None:
    from mmcli.stages.ablate import ablate, format_ablation

    for a in study.ablations:
        if not _selected(a.name, wanted):
            continue
        subsets = subsets_for(a, res.extracted)
        if subsets is not None and len(subsets) < 2:
            echo(f"ablation {a.name}: skipped, fewer than two modalities were extracted")
            continue
        echo(f"== ablation {a.name}")
        t = time.perf_counter()
        table = ablate(study.store, study.labels, study.out / a.name, target=a.target, time=a.time,
                       event=a.event, modalities=a.modalities, fusions=a.fusions, heads=tuple(a.heads),
                       encoders=a.encoders or None, folds=a.folds, seed=a.seed, params=a.params or None,
                       max_subset_size=a.max_subset_size, subsets=subsets, metric=a.metric, force=a.force,
                       compare_best=a.compare_best, n_boot=a.n_boot, drop_unmatched=a.drop_unmatched,
                       echo=lambda line: echo(f"   {line}"))
        res.timings[f"ablate {a.name}"] = time.perf_counter() - t
        echo(format_ablation(table))
        if "status" in table and table["status"].astype(str).str.startswith("failed").any():
            res.code = max(res.code, 1)  # as `mmcli ablate` exits
        res.ablations[a.name] = table.attrs.get("summary")
        write_resolved(study, study.out / a.name / STUDY_FILE, only=a.name)
        echo(f"{a.name}: -> {study.out / a.name / 'ablation.csv'}, {study.out / a.name / 'ablation.png'}")


def _exports(study: Study, res: StudyResult, wanted: set[str] | None, echo: Echo) -> None:
    from mmcli.workflows.exports import export_attention_geojson, export_heatmaps

    for q in study.exports.qupath:
        if not _selected(q.run, wanted):
            continue
        echo(f"== QuPath GeoJSON of {q.run}")
        try:
            gj, png = export_attention_geojson(study.store, study.run_dir(q.run), study.out / "qupath")
        except (MmcliError, RuntimeError) as e:
            echo(f"GeoJSON export of {q.run} failed: {e}")
            res.code = max(res.code, 1)
            continue
        res.exports.setdefault("qupath", {})[q.run] = {"geojson": str(gj), "preview": str(png)}
        echo(f"QuPath GeoJSON {gj} (File > Import objects from file), drawn over the slide in {png}")
    for h in study.exports.heatmaps:
        if not _selected(h.run, wanted):
            continue
        echo(f"== heatmaps of {h.run}")
        try:
            written = export_heatmaps(study, h, echo)
        except MmcliError as e:
            echo(f"heatmaps of {h.run} failed: {e}")
            res.code = max(res.code, 1)
            continue
        res.exports.setdefault("heatmaps", {})[h.run] = written


def results_doc(res: StudyResult) -> dict[str, Any]:
    """A JSON-able summary of a study run (the demo writes it as demo_results.json)."""
    return json.loads(json.dumps({
        "results": res.fits, "reports": {k: str(v) for k, v in res.reports.items()}, "failed": res.failed,
        "ablation": next(iter(res.ablations.values()), None) if len(res.ablations) == 1 else res.ablations,
        "compare": res.compares, "exports": res.exports, "geojson": next(iter(
            (res.exports.get("qupath") or {}).values()), None), "timings_s": res.timings,
        "extracted": res.extracted}, default=str))
