"""``mmcli report --run DIR``: a self-contained ``DIR/report.html`` for one run dir.

Self-contained means one file: figures are inline base64 PNGs, the CSS is inline, there is no script and no
external link, so the report can be mailed or archived as is. The page leads with the answer and ends with the
provenance:

1. a banner when the features came from encoders without pretrained weights, and the headline box (the primary
   metric, its interval and what that interval covers, the patients, the events or classes, a one-line reading;
   :mod:`mmcli.stages.report.summary`);
2. the metrics table (every metric, both 95% intervals labelled, per-fold values);
3. the plots: classification ROC / precision-recall / confusion matrix (and a calibration curve only when
   metrics.json has no calibration block, whose reliability diagram comes next), or survival Kaplan-Meier curves
   of out-of-fold risk groups with the log-rank p; the evidence blocks of metrics.json that the run has
   (calibration, operating point, decision curve, subgroups; :mod:`mmcli.stages.report.evidence`), drift and
   missing data for ``mmcli evaluate`` folders; fusion modality weights; xgboost SHAP summary; attention heatmaps
   and top tiles (:mod:`mmcli.stages.report.attention`); integrated-gradients attributions and the note windows
   that drive a few patients' predictions (:mod:`mmcli.stages.report.attributions`);
4. one list of what this run does not have (artefacts other heads write, evidence not asked for), with how to
   get it;
5. the provenance table (run dir, head and parameters, encoders, store, labels, seed, versions).

A broken optional artefact costs its own section (which says why), never the report.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.heads.evaluation import headline
from mmcli.pipeline.io import atomic_write_text
from mmcli.pipeline.rundir import (
    CLASSIFICATION,
    REGRESSION,
    WINDOW_ATTRIBUTIONS,
    Run,
    load_run,
    read_csv,
    read_json,
)
from mmcli.stages.report import evidence, plots, summary
from mmcli.stages.report.attention import attention_section
from mmcli.stages.report.attributions import attributions_section, note_windows_section
from mmcli.stages.report.markup import absent, esc, num

REPORT_NAME = "report.html"
SHAP_TOP = 20
_NON_FEATURE = {"patient_id", "fold", "bias", "base_value", "expected_value"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.absent{color:#8a6d3b;background:#fcf8e3;padding:.4em .7em;border-radius:4px}.note{color:#555;font-size:.9em}
img{max-width:100%;margin:.3em .5em .3em 0;vertical-align:top}.figs{display:flex;flex-wrap:wrap}
code{background:#f4f4f6;padding:0 .25em;border-radius:3px}td.pos{color:#b2182b}td.neg{color:#2166ac}
q{font-family:Georgia,serif;font-size:.92em}footer{margin-top:2.5em;color:#888;font-size:.85em}
.headline{border-left:6px solid #2c7fb8;background:#f0f6fb;padding:.7em 1.1em;margin:1em 0 1.4em;border-radius:4px}
.headline p{margin:.35em 0}.headline .metric{font-size:1.15em}.headline .value{font-size:2em;font-weight:600;
margin:0 .25em;font-variant-numeric:tabular-nums}.headline .ci{font-size:1.1em;color:#333}
.headline .reading{font-weight:500}
.banner{border-left:6px solid #b2182b;background:#fdecea;color:#5c0a12;padding:.7em 1.1em;margin:1em 0;
border-radius:4px}ul.lacking li{margin:.25em 0;color:#555}.wrong{color:#b2182b;font-weight:700}
p.said{font-size:1.05em;margin:.2em 0 .6em}h3 small{font-weight:normal;color:#555}
"""



def _text(v: Any) -> str:
    """Header cell text: dicts as compact sorted JSON, everything else as ``str``."""
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict) else str(v)


def _fmt(v: Any, digits: int = 3) -> str:
    """A number as :func:`~.markup.num` gives it; anything that is not numeric as escaped text."""
    try:
        float(v)
    except (TypeError, ValueError):
        return esc(v)
    return num(v, digits)



def _section(title: str, build: Callable[[], str]) -> str:
    """One ``<h2>`` section; a failure inside it is shown in place instead of killing the report."""
    try:
        body = build()
    except Exception as e:  # noqa: BLE001 - a broken artefact costs its section, not the report
        body = absent(f"this section could not be drawn: {esc(type(e).__name__)}: {esc(e)}")
    return f"<section><h2>{esc(title)}</h2>\n{body}\n</section>"


# ---- sections -----------------------------------------------------------------------------------------
CLASSIFICATION_ONLY_PARAMS = ("loss", "focal_gamma", "class_weight")  # torch heads' classification loss options


def _task_params(run: Run) -> Any:
    """The head params that apply to the run's task: a survival run trains on the Cox loss, so the
    classification loss options it still carries (their defaults) would mislead a reader."""
    params = run.params
    if run.task == CLASSIFICATION or not isinstance(params, dict):
        return params
    return {k: v for k, v in params.items() if k not in CLASSIFICATION_ONLY_PARAMS}


def _name(path: Any) -> str | None:
    """The file or folder name of a recorded path, without the folders above it (no absolute paths in a report)."""
    return Path(str(path)).name or None if path else None


def _header(run: Run) -> str:
    cfg, met = run.config, run.metrics or {}
    rows: list[tuple[str, Any]] = [
        ("run", run.path.resolve().name),  # names only: the report is shared, the folders it came from are not
        ("head", run.head),
        ("head params", _task_params(run)),
        ("task", run.task),
    ]
    if run.task == CLASSIFICATION:
        rows += [("target", cfg.get("target")), ("classes", ", ".join(run.classes))]
    elif run.task == REGRESSION:
        rows += [("target", f"{cfg.get('target')} (a value, in its own unit)")]
    else:
        rows += [("time / event", f"{cfg.get('time')} / {cfg.get('event')} (event 1 = observed)")]
    enc = run.encoder_ids
    rows += [
        ("modalities", ", ".join(run.modalities)),
        ("encoder ids", "; ".join(f"{m}: {e}" for m, e in enc.items()) if enc else None),
        ("patients", met.get("n_patients", cfg.get("n_patients",
                                                   None if run.predictions is None else len(run.predictions)))),
        ("folds", cfg.get("folds", met.get("folds"))),
        ("seed", cfg.get("seed", met.get("seed"))),
        ("store", _name(run.store)),
        ("labels", _name(cfg.get("labels"))),
        ("schema version", run.schema_version),
        ("features sha256", cfg.get("features_sha256")),
        ("mmcli version", cfg.get("mmcli_version")),
        ("created", cfg.get("created", met.get("created"))),
    ]
    excluded = {k: len(v) for k, v in (cfg.get("excluded_patients") or {}).items() if v}
    if excluded:
        rows.append(("excluded patients", ", ".join(f"{k}: {n}" for k, n in excluded.items())))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_text(v))}</td></tr>" for k, v in rows
                   if v not in (None, "", {}, []))
    return f"<table>{body}</table>"


def _metrics_table(run: Run) -> str:
    """Metric, its value (fold mean or the one evaluation set's value), both 95% intervals labelled, the headline
    one first (:mod:`mmcli.heads.evaluation.headline`), and the per-fold values."""
    if run.metrics is None:
        return absent("No <code>metrics.json</code> in this run.")
    metrics = run.metrics.get("metrics") or {}
    if not metrics:
        return absent("<code>metrics.json</code> holds no metrics.")
    entries = [m for m in metrics.values() if isinstance(m, dict)]
    n_folds = max((len(m.get("per_fold") or []) for m in entries), default=0)
    key = headline.headline_key(entries[0]) if entries else headline.CI_BOOT
    other = headline.CI_BOOT if key == headline.CI_T else None
    what = headline.scope(entries[0]) if entries else "value"
    head = "".join(f"<th>fold {i + 1}</th>" for i in range(n_folds)) if n_folds > 1 else ""
    ci_heads = f"<th>95% CI: {esc(headline.short_label(key, what))}</th>" + (
        f"<th>95% CI: {esc(headline.SHORT[other])}</th>" if other else "")
    out = [f"<table><tr><th>metric</th><th>{esc(what)}</th>{ci_heads}{head}</tr>"]
    blank = "<td></td>" * ((2 if other else 1) + (n_folds if n_folds > 1 else 0))
    for name, m in metrics.items():
        if not isinstance(m, dict):
            out.append(f"<tr><td>{esc(name)}</td><td class='num'>{_fmt(m)}</td>{blank}</tr>")
            continue
        folds = list(m.get("per_fold") or []) if n_folds > 1 else []
        cells = "".join(f"<td class='num'>{_fmt(v)}</td>" for v in folds)
        cells += "<td></td>" * ((n_folds - len(folds)) if n_folds > 1 else 0)
        cis = "".join(f"<td class='num'>{_ci_pair(*headline.interval(m, k))}</td>"
                      for k in ((headline.headline_key(m), other) if other else (headline.headline_key(m),)))
        out.append(f"<tr><td>{esc(name)}</td><td class='num'>{_fmt(m.get('mean'))}</td>{cis}{cells}</tr>")
    legend = "; ".join(headline.legend(key, what))
    note = run.metrics.get("metrics_note") or "Mean of the per-fold values, each on a held-out fold."
    out.append(f"</table><p class='note'>{esc(note)} 95% CIs: {esc(legend)} (coverage measured by "
               "benchmarks/bench_coverage.py).</p>")
    return "".join(out)


def _ci_pair(lo: Any, hi: Any) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _classification_figs(run: Run) -> str:
    pred = run.require_predictions()
    classes = run.classes
    y, probs = run.class_index(), run.prob_matrix()
    if "y_pred" in pred.columns:
        lookup = {c: i for i, c in enumerate(classes)}
        y_pred_raw = pred["y_pred"].astype(str)
        y_pred = (np.array([lookup[v] for v in y_pred_raw]) if y_pred_raw.isin(lookup).all()
                  else probs.argmax(axis=1))
    else:
        y_pred = probs.argmax(axis=1)
    note = (f"Positive class: <code>{esc(classes[1])}</code>." if len(classes) == 2
            else "Multiclass: one curve per class (one-vs-rest).")
    figs = [plots.img_tag(plots.roc_figure(y, probs, classes, "external cohort" if evidence.is_evaluation(run)
                                           else "out-of-fold"), "ROC curve"),
            plots.img_tag(plots.pr_figure(y, probs, classes), "precision-recall curve"),
            plots.img_tag(plots.confusion_figure(y, y_pred, classes), "confusion matrix")]
    if not (run.metrics or {}).get("calibration"):  # else the Calibration section draws the reliability diagram
        figs.insert(2, plots.img_tag(plots.calibration_figure(y, probs, classes), "calibration curve"))
    what = "predictions of the fitted model" if evidence.is_evaluation(run) else "out-of-fold predictions"
    return f"<p class='note'>{len(y)} patients, {what}. {note}</p><div class='figs'>" \
           + "".join(figs) + "</div>"


def _survival_figs(run: Run) -> str:
    pred = run.require_predictions()
    time, event = pred["time"].to_numpy(float), pred["event"].to_numpy(int)
    risk = pred["risk"].to_numpy(float)
    if event.sum() == 0:
        return absent("No observed events among the out-of-fold predictions: Kaplan-Meier groups are "
                       "not informative.")
    png, info = plots.km_figure(time, event, risk, time_unit=run.time_unit or "")
    from mmcli.heads.evaluation.stats import concordance

    c_oof = concordance(time, event, risk)
    cm = ((run.metrics or {}).get("metrics") or {}).get("c_index") or {}
    rows = "".join(f"<tr><td>{esc(g)}</td><td class='num'>{n}</td><td class='num'>{e}</td></tr>"
                   for g, n, e in zip(info["groups"], info["sizes"], info["events"]))
    p = info["logrank_p"]
    parts = [
        f"<p class='note'>Patients split by out-of-fold predicted risk "
        f"({'tertiles' if len(info['groups']) == 3 else 'median split'}; higher risk = shorter predicted "
        f"survival). {esc(info['test'])} p = {_fmt(p, 4) if p is not None else '–'}. "
        f"Harrell's c-index of the pooled out-of-fold risk: {_fmt(c_oof)}"
        + (f"; {esc(headline.scope(cm))} {_fmt(cm.get('mean'))} [95% CI {_fmt(headline.headline_interval(cm)[0])}, "
           f"{_fmt(headline.headline_interval(cm)[1])}, "
           f"{esc(headline.short_label(headline.headline_key(cm), headline.scope(cm)))}]"
           if cm else "") + ".</p>",
        f"<table><tr><th>group</th><th>patients</th><th>events</th></tr>{rows}</table>",
        f"<div class='figs'>{plots.img_tag(png, 'Kaplan-Meier curves by risk group')}</div>",
    ]
    return "".join(parts)


def _regression_figs(run: Run) -> str:
    pred = run.require_predictions()
    y, value = pred["y_true"].to_numpy(float), pred["y_pred"].to_numpy(float)
    what = "predictions of the fitted model" if evidence.is_evaluation(run) else "out-of-fold predictions"
    target = run.config.get("target") or "target"
    figs = [plots.img_tag(plots.observed_figure(y, value, target), "predicted against observed"),
            plots.img_tag(plots.residual_figure(y, value, target), "residuals against predicted")]
    resid = y - value
    return (f"<p class='note'>{len(y)} patients, {what}, in the unit of <code>{esc(target)}</code>. Residual "
            f"(observed - predicted): mean {_fmt(resid.mean())}, standard deviation {_fmt(resid.std())}; the "
            "dashed line is perfect agreement.</p><div class='figs'>" + "".join(figs) + "</div>")


def _predictions_section(run: Run) -> str:
    if run.predictions is None:
        return absent("No <code>predictions.csv</code> in this run: no curves can be drawn.")
    if run.task == REGRESSION:
        return _regression_figs(run)
    return _classification_figs(run) if run.task == CLASSIFICATION else _survival_figs(run)


def _weights_section(run: Run) -> str:
    path = run.optional("modality_weights.json")
    if path is None:
        return absent("No <code>modality_weights.json</code> (written by <code>fusion_mlp</code> runs).")
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        return absent("<code>modality_weights.json</code> is empty or not a {modality: weight} object.")
    names, means, sds = [], [], []
    for m, w in raw.items():
        vals = np.atleast_1d(np.asarray(w, dtype=float)).ravel()
        names.append(m)
        means.append(float(vals.mean()))
        sds.append(float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
    errors = sds if any(sds) else None
    rows = "".join(f"<tr><td>{esc(n)}</td><td class='num'>{_fmt(v)}</td></tr>" for n, v in zip(names, means))
    png = plots.bar_figure(names, means, errors=errors, title="Learnt modality weights",
                           xlabel="weight" + (" (mean ± sd over folds)" if errors else ""))
    return f"<table><tr><th>modality</th><th>weight</th></tr>{rows}</table>{plots.img_tag(png, 'modality weights')}"


def _shap_section(run: Run) -> str:
    path = run.optional("shap.csv")
    if path is None:
        return absent("No <code>shap.csv</code> (written by <code>xgboost</code> runs).")
    df = read_csv(path)
    feats = [c for c in df.columns if c.lower() not in _NON_FEATURE]
    if not feats or df.empty:
        return absent("<code>shap.csv</code> has no feature columns.")
    vals = df[feats].apply(lambda s: np.abs(s.astype(float))).mean(axis=0)
    top = vals.sort_values(ascending=False).head(SHAP_TOP)
    png = plots.bar_figure(list(top.index), top.to_numpy(), title=f"Top {len(top)} features by mean |SHAP|",
                           xlabel="mean |SHAP value| (out-of-fold, margin units)")
    return (f"<p class='note'>{len(df)} patients, {len(feats)} features; SHAP values from xgboost "
            f"<code>pred_contribs</code> on each patient's held-out fold.</p>{plots.img_tag(png, 'SHAP summary')}")


EVIDENCE = (  # (metrics.json block, section title, builder, what to do to get it)
    ("calibration", "Calibration", evidence.calibration_section,
     "calibration (classification runs of this version; <code>--calibrate platt|isotonic</code> recalibrates)"),
    ("operating_point", "Operating point", evidence.operating_point_section,
     "operating point (binary tasks: fit with <code>--operating-point sens=0.9</code> or <code>spec=0.9</code>)"),
    ("decision_curve", "Decision curve", evidence.decision_curve_section, "decision curve"),
    ("subgroups", "Subgroups", evidence.subgroups_section,
     "subgroup metrics (fit with <code>--subgroups COL[,COL]</code>)"),
)
PROBABILITY_ONLY = ("calibration", "operating_point", "decision_curve")
OPTIONAL = (  # (run file, section title, what writes it)
    ("modality_weights.json", "Fusion modality weights", "modality weights: fusion_mlp"),
    ("shap.csv", "SHAP summary (xgboost)", "SHAP: xgboost"),
    ("attention.csv", "Attention", "attention: attention heads, or <code>mmcli predict --attention</code>"),
    ("attributions.csv", "Attributions (integrated gradients)", "attributions: torch heads"),
    (WINDOW_ATTRIBUTIONS, "Note windows that drive predictions", "note windows: fusion_mlp on windowed notes"),
)


def _evidence_present(run: Run, key: str) -> str | None:
    """None when the block is there to draw, else why not (a skipped block's own reason)."""
    block = (run.metrics or {}).get(key)
    if not block:
        return ""
    if isinstance(block, dict) and block.get("skipped"):
        return str(block["skipped"])
    return None


def _render(run: Run, attention_patients: int, top_tiles: int) -> str:
    external = evidence.is_evaluation(run)
    title = f"mmcli {'external validation' if external else 'report'}: {run.head} ({run.task})"
    optional_builders = {
        "modality_weights.json": lambda: _weights_section(run),
        "shap.csv": lambda: _shap_section(run),
        "attention.csv": lambda: attention_section(run, n_patients=attention_patients, top_k=top_tiles),
        "attributions.csv": lambda: attributions_section(run),
        WINDOW_ATTRIBUTIONS: lambda: note_windows_section(run),
    }
    sections = [
        _section("Metrics", lambda: _metrics_table(run)),
        _section("Predictions (external cohort)" if external else "Out-of-fold predictions",
                 lambda: _predictions_section(run)),
    ]
    lacking: list[str] = []
    for key, name, build, how in EVIDENCE:
        if run.task == REGRESSION and key in PROBABILITY_ONLY:
            continue  # a value, not a probability: nothing to calibrate, threshold or weigh as a net benefit
        why = _evidence_present(run, key)
        if why is None:
            sections.append(_section(name, lambda build=build: build(run)))
        else:
            lacking.append(f"No {how}" + (f": {esc(why)}" if why else "") + ".")
    if external:
        sections += [_section("Drift (training vs this cohort)", lambda: evidence.drift_section(run)),
                     _section("Missing patients and modalities", lambda: evidence.missing_section(run))]
    for name, heading, who in OPTIONAL:
        if run.optional(name) is not None:
            sections.append(_section(heading, optional_builders[name]))
        else:
            lacking.append(f"No <code>{esc(name)}</code> ({who}).")
    if lacking:
        sections.append("<section><h2>Not in this run</h2>\n<ul class='lacking'>"
                        + "".join(f"<li>{item}</li>" for item in lacking) + "</ul>\n</section>")
    sections.append(_section("Provenance", lambda: _header(run)))
    try:
        top = summary.banner(run) + summary.headline_box(run)
    except Exception as e:  # noqa: BLE001 - a broken box costs the box, not the report
        top = absent(f"the headline could not be drawn: {esc(type(e).__name__)}: {esc(e)}")
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n{top}\n" + "\n".join(sections)
            + f"\n<footer>Generated by mmcli {esc(__version__)} on {esc(now)}.</footer>\n</body></html>\n")


def report(run_dir: str | Path, *, out: str | Path | None = None, attention_patients: int = 3,
           top_tiles: int = 8) -> Path:
    """Write ``report.html`` for ``run_dir`` (or to ``out``) and return its path.

    ``attention_patients``: how many patients (highest out-of-fold score first) get attention heatmaps;
    ``top_tiles``: how many highest-attention tiles are shown per slide.

    Raises :class:`~mmcli.pipeline.errors.InputError` only when ``run_dir`` is not a run dir or a required
    file is malformed; missing optional artefacts become sections that say so.
    """
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / REPORT_NAME
    text = _render(run, attention_patients, top_tiles)
    return atomic_write_text(target, text)
