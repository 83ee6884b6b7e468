"""Stage-2 commands: fit, predict, evaluate, report, compare, ablate, pretrain, federate, heads.

Each builds its typed options once (``fit``: :class:`~mmcli.heads.training.options.FitOptions`) and calls the
stage; help texts come from the options models' field descriptions (:mod:`mmcli.cli.flags`).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import typer

from mmcli.cli.app import app, handled, num, say, warn
from mmcli.cli.flags import (
    EVIDENCE,
    DcaOpt,
    EncoderIdOpt,
    HorizonOpt,
    JsonOpt,
    MinSubgroupOpt,
    ModalitiesOpt,
    ParamOpt,
    SubgroupsOpt,
    csv_list,
    help_of,
)
from mmcli.heads.evaluation.options import DEFAULT_THRESHOLDS, EvidenceOptions
from mmcli.heads.preprocess.params import VectorPrepParams
from mmcli.heads.registry import HEADS
from mmcli.heads.training.options import FitOptions
from mmcli.pipeline.log import get_logger
from mmcli.pipeline.options import CohortOptions

HEAD_FLAGS = "Head settings (shortcuts for --param; `mmcli heads` lists every parameter)"
SCALE = "Scale (memory budget, dask)"
BudgetH = help_of(FitOptions, "memory_budget")
StoreH = help_of(CohortOptions, "store", default=False)
LabelsH = help_of(CohortOptions, "labels", default=False)
TargetH, TimeH, EventH = (help_of(CohortOptions, f) for f in ("target", "time", "event"))


def _fit_log(kw: dict[str, Any]) -> Path:
    """fit.log is written into the run's staging folder, which becomes ``--out`` when the fit succeeds (until
    then the previous run's fit.log is left alone)."""
    from mmcli.pipeline.rundir import LOG_NAME, staging_path

    return staging_path(kw["out"]) / LOG_NAME


@app.command()
@handled(log=_fit_log)
def fit(
    head: str = typer.Option(..., "--head", help=f"The head: {' | '.join(HEADS.declared())} (any case; aliases "
                             "such as abmil; `mmcli heads` lists them with their parameters)."),
    store: Path = typer.Option(..., "--store", help=StoreH),
    labels: Path = typer.Option(..., "--labels", help=LabelsH),
    out: Path = typer.Option(..., "--out", help=help_of(FitOptions, "out")),
    target: str | None = typer.Option(None, "--target", help=TargetH),
    time: str | None = typer.Option(None, "--time", help=TimeH),
    event: str | None = typer.Option(None, "--event", help=EventH),
    task: str | None = typer.Option(None, "--task", help=help_of(FitOptions, "task")),
    modalities: ModalitiesOpt = None,
    encoder: EncoderIdOpt = [],  # noqa: B006 - typer reads the default; never mutated
    param: ParamOpt = [],  # noqa: B006
    folds: int = typer.Option(5, "--folds", help=help_of(FitOptions, "folds", default=False)),
    seed: int = typer.Option(0, "--seed", help=help_of(CohortOptions, "seed", default=False)),
    n_boot: int = typer.Option(1000, "--n-boot", help=help_of(CohortOptions, "n_boot", default=False)),
    drop_unmatched: bool = typer.Option(False, "--drop-unmatched", help=help_of(CohortOptions, "drop_unmatched",
                                                                                  default=False)),
    explain: str = typer.Option("default", "--explain", help=help_of(FitOptions, "explain", default=False)),
    overwrite: bool = typer.Option(False, "--overwrite", help=help_of(FitOptions, "overwrite", default=False)),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=help_of(FitOptions, "memory_budget"),
                                             rich_help_panel=SCALE),
    scheduler: str | None = typer.Option(None, "--scheduler", help=help_of(FitOptions, "scheduler"),
                                         rich_help_panel=SCALE),
    workers: int | None = typer.Option(None, "--workers", help=help_of(FitOptions, "workers"),
                                       rich_help_panel=SCALE),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the fold / epoch progress bars."),
    impute: str | None = typer.Option(None, "--impute", help=help_of(VectorPrepParams, "impute"),
                                      rich_help_panel=HEAD_FLAGS),
    batch_correct: str | None = typer.Option(None, "--batch-correct", help=help_of(VectorPrepParams, "batch_correct"),
                                             rich_help_panel=HEAD_FLAGS),
    batch_column: str | None = typer.Option(None, "--batch-column", help=help_of(VectorPrepParams, "batch_column"),
                                            rich_help_panel=HEAD_FLAGS),
    batch_keep: str | None = typer.Option(None, "--batch-keep", help="Comma list: " + help_of(
        VectorPrepParams, "batch_keep"), rich_help_panel=HEAD_FLAGS),
    fusion: str | None = typer.Option(None, "--fusion", help="fusion_mlp's operator: concat | gated | attention | "
                                      "cross_attention | bilinear  (default: concat)", rich_help_panel=HEAD_FLAGS),
    init: Path | None = typer.Option(None, "--init", help="fusion_mlp: start the per-modality projections from the "
                                     "encoders of `mmcli pretrain --out DIR`.", rich_help_panel=HEAD_FLAGS),
    init_in_fold: bool = typer.Option(False, "--init-in-fold", help=help_of(
        FitOptions, "init_in_fold", default=False), rich_help_panel=HEAD_FLAGS),
    calibrate: str = typer.Option("none", "--calibrate", help=help_of(EvidenceOptions, "calibrate", default=False),
                                  rich_help_panel=EVIDENCE),
    operating_point: str | None = typer.Option(None, "--operating-point", help=help_of(
        EvidenceOptions, "operating_point"), rich_help_panel=EVIDENCE),
    subgroups: SubgroupsOpt = None,
    min_subgroup: MinSubgroupOpt = 10,
    dca_thresholds: DcaOpt = DEFAULT_THRESHOLDS,
    horizon: HorizonOpt = None,
    inner_folds: int = typer.Option(5, "--inner-folds", help=help_of(EvidenceOptions, "inner_folds", default=False),
                                    rich_help_panel=EVIDENCE),
) -> None:
    """Stage 2: cross-validate a head on cached features, then refit on all patients for `predict`.

    --out is locked while the fit runs and replaced only at the end: an error, a full disk, Ctrl-C or SIGTERM
    leave the previous run there as it was.
    """
    from mmcli.heads.training.options import build_fit_options
    from mmcli.stages.fit import fit as run_fit
    from mmcli.stages.fit import parse_encoders, parse_params

    options = build_fit_options(dict(
        head=HEADS.canonical(head), store=store, labels=labels, out=out, target=target, time=time, event=event,
        task=task,
        modalities=csv_list(modalities), encoders=parse_encoders(encoder), folds=folds, seed=seed,
        params=parse_params(param), n_boot=n_boot, drop_unmatched=drop_unmatched, explain=explain, impute=impute,
        batch_correct=batch_correct, batch_column=batch_column, batch_keep=csv_list(batch_keep), fusion=fusion,
        init=init, init_in_fold=init_in_fold, overwrite=overwrite, memory_budget=memory_budget, scheduler=scheduler,
        workers=workers,
        evidence=dict(calibrate=calibrate, operating_point=operating_point, subgroups=subgroups,
                      min_subgroup=min_subgroup, dca_thresholds=dca_thresholds, horizon=horizon,
                      inner_folds=inner_folds)))
    res = run_fit(options=options, log=get_logger().info, progress=not no_progress)
    say(f"{options.head} ({res['task']}, {res['n_patients']} patients, {res['folds']} folds) -> {out}")
    say_metrics(res)
    say_evidence(res)


def say_metrics(res: dict) -> None:
    """The metric lines of a metrics.json: what the number is (fold mean or value) and both intervals, labelled,
    the headline one first (:func:`mmcli.heads.evaluation.headline.metric_lines`)."""
    from mmcli.heads.evaluation.headline import metric_lines

    for line in metric_lines(res["metrics"]):
        say(line)


def say_evidence(res: dict) -> None:
    """Console lines for the calibration / operating point / decision curve / drift blocks of a metrics.json."""
    for cls, c in ((res.get("calibration") or {}).get("classes") or {}).items():
        a, b = c["intercept"], c["slope"]
        say(f"  calibration {cls}: intercept {num(a['value'])} [{num(a['ci_low'])}, {num(a['ci_high'])}], "
            f"slope {num(b['value'])} [{num(b['ci_low'])}, {num(b['ci_high'])}]")
    op = res.get("operating_point")
    if op:
        thr = op.get("final_threshold", op.get("threshold"))
        parts = [f"{k} {num(v['value'])} [{num(v['ci_low'])}, {num(v['ci_high'])}]"
                 for k, v in op["metrics"].items() if k != "counts"]
        say(f"  operating point (threshold {num(thr)}): " + ", ".join(parts))
    ranges = (res.get("decision_curve") or {}).get("model_beats_both_ranges")
    if ranges is not None:
        where = ", ".join(f"{r['from']:g}-{r['to']:g}" for r in ranges) or "no threshold"
        say(f"  decision curve: beats treat-all and treat-none (95% CI of the difference above 0) at {where}")
    for name, d in ((res.get("drift") or {}).get("modalities") or {}).items():
        say(f"  drift {name}: AUROC {num(d.get('auroc'))}, p {num(d.get('p_value'))}, "
            f"mean SMD {num(d.get('mean_smd'))}{' (shift)' if d.get('shift_detected') else ''}")


@app.command()
@handled(log=lambda kw: kw["out"] / "pretrain.log")
def pretrain(
    store: Path = typer.Option(..., "--store", help=StoreH + " (labels are not needed)."),
    modalities: str = typer.Option(..., "--modalities", help="Comma list of >= 2 store modalities / tables, "
                                   "e.g. wsi,text,genes."),
    out: Path = typer.Option(..., "--out", help="Folder for the encoders (safetensors + pretrain.json)."),
    encoder: EncoderIdOpt = [],  # noqa: B006
    hidden: int = typer.Option(32, "--hidden", help="Encoder size; equal to fusion_mlp's hidden (default 32)."),
    epochs: int = typer.Option(100, "--epochs", help="Passes over the patients."),
    temperature: float = typer.Option(0.1, "--temperature", help="InfoNCE temperature, > 0."),
    seed: int = typer.Option(0, "--seed", help=help_of(CohortOptions, "seed", default=False)),
) -> None:
    """Contrastive (CLIP-style) pretraining of per-modality encoders on cached modality pairs."""
    from mmcli.stages.fit import parse_encoders
    from mmcli.stages.pretrain import pretrain as run_pretrain

    res = run_pretrain(store, csv_list(modalities) or [], out, encoders=parse_encoders(encoder) or None,
                       hidden=hidden, epochs=epochs, temperature=temperature, seed=seed, log=get_logger().info)
    say(f"pretrained on {res['patients']} patients {res['pairs']}: InfoNCE {res['loss_first']:.3f} -> "
        f"{res['loss_last']:.3f} -> {out}")


@app.command()
@handled(log=lambda kw: kw["out"].with_name(kw["out"].stem + ".predict.log"))
def predict(
    model: Path = typer.Option(..., "--model", help="Run folder of `mmcli fit` (or its model/ folder)."),
    store: Path = typer.Option(..., "--store", help="Feature store holding the patients to score."),
    out: Path = typer.Option(..., "--out", help="Predictions CSV to write."),
    attention: bool = typer.Option(False, "--attention", help="Also write <out stem>.attention.csv "
                                   "(patient_id,item_id,index,attention) for attention heads."),
    covariates: Path | None = typer.Option(None, "--covariates", help="CSV with patient_id and the batch column "
                                           "(and protected covariates) of a batch-corrected model."),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BudgetH),
) -> None:
    """Score every patient of a store with a fitted model (CPU is fine)."""
    from mmcli.stages.predict import predict as run_predict

    df = run_predict(model, store, out, attention=attention, covariates=covariates, memory_budget=memory_budget)
    if "batch_corrected" in df and not df["batch_corrected"].all():
        warn(f"{int((~df['batch_corrected']).sum())} patient(s) left without batch correction (batch missing or "
             "not seen in training); see the batch_corrected column.")
    say(f"scored {len(df)} patients -> {out}")


@app.command()
@handled(log=lambda kw: kw["out"] / "evaluate.log")
def evaluate(
    model: Path = typer.Option(..., "--model", help="Run folder of `mmcli fit` (or its model/ folder)."),
    store: Path = typer.Option(..., "--store", help="Feature store of the new (external) cohort."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV of the new cohort (also read for the batch "
                                "column of a batch-corrected model)."),
    out: Path = typer.Option(..., "--out", help="Folder: metrics.json, predictions.csv, report.html."),
    target: str | None = typer.Option(None, "--target", help="Classification column  (default: the run's)"),
    time: str | None = typer.Option(None, "--time", help="Survival time column  (default: the run's)"),
    event: str | None = typer.Option(None, "--event", help="Survival event column  (default: the run's)"),
    train_store: Path | None = typer.Option(None, "--train-store", help="Store the model was fitted on, for the "
                                            "drift section  (default: the one recorded in the run)"),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Evaluate patients the model was trained on "
                                       "anyway (recorded as training_overlap; their scores are in-sample)."),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BudgetH),
    subgroups: SubgroupsOpt = None,
    min_subgroup: MinSubgroupOpt = 10,
    dca_thresholds: DcaOpt = DEFAULT_THRESHOLDS,
    horizon: HorizonOpt = None,
    n_boot: int = typer.Option(1000, "--n-boot", help=help_of(CohortOptions, "n_boot", default=False)),
    n_permutations: int = typer.Option(200, "--n-permutations", help="Permutations of the drift test."),
    seed: int = typer.Option(0, "--seed", help=help_of(CohortOptions, "seed", default=False)),
    drop_unmatched: bool = typer.Option(False, "--drop-unmatched", help=help_of(CohortOptions, "drop_unmatched",
                                                                                  default=False)),
) -> None:
    """External validation: score another cohort with a fitted model; metrics, calibration, decision curve,
    subgroups, drift against the training store, and a report."""
    from mmcli.stages.evaluate import evaluate as run_evaluate

    evidence = EvidenceOptions.build(dict(subgroups=subgroups, min_subgroup=min_subgroup,
                                          dca_thresholds=dca_thresholds, horizon=horizon)).check()
    CohortOptions.build(dict(store=store, labels=labels, seed=seed, n_boot=n_boot))  # ranges, named by flag
    res = run_evaluate(model, store, labels, out, target=target, time=time, event=event, train_store=train_store,
                       evidence=evidence, n_boot=n_boot, seed=seed, n_permutations=n_permutations,
                       drop_unmatched=drop_unmatched, allow_overlap=allow_overlap, memory_budget=memory_budget,
                       log=get_logger().info)
    from mmcli.stages.report import report as write_report

    write_report(out)
    say(f"evaluated {res['head']} ({res['task']}) on {res['n_patients']} patients -> {out}")
    say_metrics(res)
    say_evidence(res)
    say(f"wrote {out / 'metrics.json'}, {out / 'predictions.csv'} and {out / 'report.html'}")


@app.command()
@handled(log=lambda kw: (kw["out"].parent if kw["out"] else kw["run"]) / "report.log")
def report(
    run: Path = typer.Option(..., "--run", help="Run folder of `mmcli fit`."),
    out: Path | None = typer.Option(None, "--out", help="HTML file  (default: RUN/report.html)"),
    attention_patients: int = typer.Option(3, "--attention-patients", help="Patients with attention heatmaps."),
    top_tiles: int = typer.Option(8, "--top-tiles", help="Top-attention tiles shown per patient."),
    card: bool = typer.Option(False, "--card", help="Also write RUN/model_card.md and RUN/model_card.json."),
) -> None:
    """Write a self-contained HTML report (metrics with CIs, curves, calibration, KM, attention, SHAP)."""
    from mmcli.stages.report import report as run_report

    path = run_report(run, out=out, attention_patients=attention_patients, top_tiles=top_tiles)
    say(str(path))
    if card:
        from mmcli.heads.card import write_card

        for p in write_card(run):
            say(str(p))


@app.command()
@handled()
def compare(
    run_a: Path = typer.Argument(..., help="First run folder."),
    run_b: Path = typer.Argument(..., help="Second run folder."),
    as_json: JsonOpt = False,
    n_boot: int = typer.Option(2000, "--n-boot", help=help_of(CohortOptions, "n_boot", default=False)),
    seed: int = typer.Option(0, "--seed", help=help_of(CohortOptions, "seed", default=False)),
    alpha: float = typer.Option(0.05, "--alpha", help="Level of the test and 1 - coverage of the interval."),
) -> None:
    """Is run A better than run B on the same patients? The procedures (corrected paired t over the shared folds)
    and these fitted models (DeLong for AUROC, paired bootstrap for macro AUROC / c-index)."""
    from mmcli.stages.compare import compare as run_compare
    from mmcli.stages.compare import format_comparison

    res = run_compare(run_a, run_b, n_boot=n_boot, seed=seed, alpha=alpha)
    say(json.dumps(res, indent=2, default=str) if as_json else format_comparison(res))


@app.command()
@handled(log=lambda kw: kw["out"] / "ablate.log")
def ablate(
    store: Path = typer.Option(..., "--store", help=StoreH),
    labels: Path = typer.Option(..., "--labels", help=LabelsH),
    out: Path = typer.Option(..., "--out", help="Folder: one run per fit, ablation.csv, ablation.png."),
    target: str | None = typer.Option(None, "--target", help=TargetH),
    time: str | None = typer.Option(None, "--time", help=TimeH),
    event: str | None = typer.Option(None, "--event", help=EventH),
    modalities: str | None = typer.Option(None, "--modalities", help="Comma list  (default: all in the store)"),
    fusions: str = typer.Option("concat,gated,attention,cross_attention,bilinear", "--fusions",
                                help="Fusion operators of the heads that take one (comma list)."),
    heads: str = typer.Option("fusion_mlp", "--heads", help="Heads to fit (comma list)."),
    max_subset_size: int | None = typer.Option(None, "--max-subset-size", help="Every subset up to K modalities "
                                               "(default: singles, pairs and the full set)"),
    subsets: str | None = typer.Option(None, "--subsets", help='Exactly these subsets, e.g. "wsi+genes,wsi"'),
    encoder: EncoderIdOpt = [],  # noqa: B006
    param: ParamOpt = [],  # noqa: B006
    folds: int = typer.Option(5, "--folds", help=help_of(FitOptions, "folds", default=False)),
    seed: int = typer.Option(0, "--seed", help=help_of(CohortOptions, "seed", default=False)),
    task: str | None = typer.Option(None, "--task", help=help_of(FitOptions, "task")),
    metric: str | None = typer.Option(None, "--metric", help="Metric of the table  (default: auroc for "
                                      "classification, c_index for survival, r2 for regression)"),
    n_boot: int = typer.Option(1000, "--n-boot", help=help_of(CohortOptions, "n_boot", default=False)),
    keep_unmatched: bool = typer.Option(False, "--keep-unmatched", help="Stop instead of dropping patients "
                                        "that lack a subset's modalities."),
    force: bool = typer.Option(False, "--force", help="Refit runs that already exist."),
    no_compare: bool = typer.Option(False, "--no-compare", help="Skip best-fused vs best-single test."),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BudgetH, rich_help_panel=SCALE),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Run the fits as dask tasks: local (a "
                                         "LocalCluster), a scheduler address tcp://HOST:8786 or a scheduler file; "
                                         "default: in this process.", rich_help_panel=SCALE),
    workers: int | None = typer.Option(None, "--workers", help=help_of(FitOptions, "workers"),
                                       rich_help_panel=SCALE),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide each fit's fold / epoch progress bars."),
) -> None:
    """Fit modality subsets x fusion operators; write a table and a bar chart with CIs."""
    from mmcli.stages.ablate import ablate as run_ablate
    from mmcli.stages.ablate import format_ablation, parse_subsets
    from mmcli.stages.fit import parse_encoders, parse_params

    head_names = [HEADS.canonical(h) for h in csv_list(heads) or ()]
    table = run_ablate(
        store, labels, out, target=target, time=time, event=event, modalities=csv_list(modalities),
        fusions=tuple(csv_list(fusions) or ()), heads=tuple(head_names),
        encoders=parse_encoders(encoder) or None, folds=folds, seed=seed,
        params=parse_params(param, head_names) or None,
        max_subset_size=max_subset_size, subsets=parse_subsets(subsets) if subsets else None, metric=metric,
        force=force, compare_best=not no_compare, n_boot=n_boot, drop_unmatched=not keep_unmatched,
        echo=say, scheduler=scheduler, workers=workers, memory_budget=memory_budget, task=task,
        progress=not no_progress)
    say(format_ablation(table))
    say(f"wrote {out / 'ablation.csv'}, {out / 'ablation.png'} and {out / 'ablation_summary.json'}")
    failed = table["status"].astype(str).str.startswith("failed").any() if "status" in table else False
    raise typer.Exit(1 if failed else 0)


@app.command()
@handled(log=lambda kw: kw["out"] / "federate.log")
def federate(
    head: str = typer.Option("fusion_mlp", "--head", help="A torch head: fusion_mlp | attention_mil."),
    sites: str = typer.Option(..., "--sites", help="Comma list of site feature stores, e.g. "
                              "site_a.zarr,site_b.zarr (patient ids unique across sites)."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV covering every site's patients."),
    target: str | None = typer.Option(None, "--target", help=TargetH),
    time: str | None = typer.Option(None, "--time", help=TimeH),
    event: str | None = typer.Option(None, "--event", help=EventH),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, predictions.csv, models/<site>/."),
    rounds: int = typer.Option(10, "--rounds", help="Federated rounds."),
    local_epochs: int = typer.Option(2, "--local-epochs", help="Epochs each site trains per round."),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg | fedprox"),
    proximal_mu: float = typer.Option(0.01, "--proximal-mu", help="FedProx proximal term weight mu (>= 0)."),
    test_size: float = typer.Option(0.3, "--test-size", help="Share of each site's patients held out for testing."),
    modalities: str | None = typer.Option(None, "--modalities", help="Comma list of modalities and tables "
                                          "(default: all the head can use)."),
    param: ParamOpt = [],  # noqa: B006
    engine: str = typer.Option("simulation", "--engine", help="simulation (Flower's simulation engine, Ray) | "
                               "local (the same Flower strategy and clients driven in this process)."),
    seed: int = typer.Option(0, "--seed", help=help_of(CohortOptions, "seed", default=False)),
    n_boot: int = typer.Option(1000, "--n-boot", help=help_of(CohortOptions, "n_boot", default=False)),
) -> None:
    """Federated training across site stores with Flower (only weights move), evaluated per site and pooled
    against centralised training on the same patients."""
    from mmcli.stages.federate import federate as run_federate
    from mmcli.stages.fit import parse_params

    head = HEADS.canonical(head)
    res = run_federate(head, csv_list(sites) or [], labels, out, target=target, time=time, event=event,
                       rounds=rounds, local_epochs=local_epochs, strategy=strategy, proximal_mu=proximal_mu,
                       test_size=test_size, modalities=csv_list(modalities), seed=seed,
                       params=parse_params(param) or None, n_boot=n_boot, engine=engine, log=get_logger().info)
    say(f"{head} federated ({res['strategy']}, {len(res['sites'])} sites, {res['rounds']} rounds) -> {out}")
    metric = res["comparison"]["metric"]
    for name, s in [*res["sites"].items(), ("pooled", res["pooled"])]:
        f, c = s["federated"][metric], s["centralised"][metric]
        say(f"  {name:12s} {metric} federated {num(f['mean'])} [{num(f['ci_low'])}, {num(f['ci_high'])}]  "
            f"centralised {num(c['mean'])} [{num(c['ci_low'])}, {num(c['ci_high'])}]")


@app.command("heads")
@handled()
def heads_cmd(
    name: str | None = typer.Argument(None, help="One head (default: all)."),
    as_json: JsonOpt = False,
    markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown page docs/heads.md (every head with "
                                  "its reference and its parameters)."),
) -> None:
    """The heads: tasks, inputs, reference, and every parameter (--param KEY=VALUE) with its default and range."""
    from mmcli.heads.registry import head_class

    names = [HEADS.canonical(name)] if name else HEADS.names()
    docs = {n: head_doc(head_class(n)) for n in names}
    if markdown:
        typer.echo(heads_markdown(docs), nl=False)
        return
    if as_json:
        say(json.dumps(docs, indent=2, default=str))
        return
    for n, d in docs.items():
        say(f"{n}: {d['summary']}")
        say(f"  tasks: {', '.join(d['tasks'])}; input: {d['input']}"
            + (f"; aliases: {', '.join(d['aliases'])}" if d["aliases"] else ""))
        width = max((len(f"{p['name']}={p['default']}") for p in d["params"]), default=0)
        for p in d["params"]:
            say(f"  --param {p['name'] + '=' + str(p['default']):<{width}}  {p['description']}")
        say("")


def head_doc(cls: Any) -> dict[str, Any]:
    """A head's documentation from its class and its Params model (what `mmcli heads` and the docs show)."""
    from mmcli.heads.base import RUN_PARAMS

    params = []
    for f in cls.Params.fields():
        if f in RUN_PARAMS:
            continue
        info = cls.Params.model_fields[f]
        default = info.get_default(call_default_factory=True)
        params.append({"name": f, "default": json.dumps(default) if not isinstance(default, str) else default,
                       "description": info.description or ""})
    first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the class docstring's first paragraph
    summary = re.sub(r";?\s*parameters:.*$", "", first).rstrip(".") + "." if first else ""
    aliases = sorted(a for a, n in HEADS.aliases().items() if n == cls.name)
    module = re.sub(r":(?:class|func|meth|mod|attr|data):`~?([^`]+)`", lambda m: f"``{m.group(1).split('.')[-1]}``",
                    (sys.modules[cls.__module__].__doc__ or "").strip())  # Sphinx roles -> code spans
    reference = " ".join(module.split("\n\n")[0].split())  # the module docstring's first paragraph
    return {"summary": summary, "tasks": list(cls.tasks), "input": cls.input_kind, "aliases": aliases,
            "reference": reference, "method": module, "module": cls.__module__, "params": params}


HEADS_PAGE_INTRO = """\
# Heads

<!-- Generated by `mmcli heads --markdown > docs/heads.md` from each head's class, module docstring and parameter
model; tests/test_heads_doc.py fails when this file differs from the output. Do not edit by hand. -->

Stage 2 fits one head (`mmcli fit --head NAME`) on the cached features; every head takes
`--param KEY=VALUE` for each parameter below (validated once: an unknown key or a value out of range is an error
naming the key and what it takes). How the MIL heads compare on a public MIL task (MNIST-bags) is in
[fit and evaluate](fit-and-evaluate.md#mil-heads-on-mnist-bags).

"""


def heads_markdown(docs: dict[str, dict[str, Any]]) -> str:
    """docs/heads.md: a summary table, then per head its summary, tasks, input and aliases, its module docstring
    (method, reference, where it differs from the reference code) and a table of its parameters
    (from :func:`head_doc`)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [HEADS_PAGE_INTRO.rstrip("\n"), "", "| head | tasks | input | what it is |", "| --- | --- | --- | --- |"]
    lines += [f"| [`{n}`](#{n}) | {', '.join(d['tasks'])} | {d['input']} | {cell(d['summary'])} |"
              for n, d in docs.items()]
    for n, d in docs.items():
        aliases = f"; aliases: {', '.join(f'`{a}`' for a in d['aliases'])}" if d["aliases"] else ""
        lines += ["", f"## {n}", "", cell(d["summary"]), "",
                  f"Tasks: {', '.join(d['tasks'])}; input: {d['input']}{aliases}; code: `{d['module']}`.", "",
                  *d["method"].splitlines(), "",
                  "| parameter | default | description |", "| --- | --- | --- |"]
        lines += [f"| `{p['name']}` | `{cell(p['default'])}` | {cell(p['description'])} |" for p in d["params"]]
    return "\n".join(lines) + "\n"
