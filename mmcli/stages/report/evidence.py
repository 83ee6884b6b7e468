"""Report sections for the evidence blocks of metrics.json: calibration (reliability diagram with intercept and
slope), operating point, decision curve, subgroups, and, for ``mmcli evaluate``, drift and missing data.
Everything is drawn from metrics.json (no recomputation), so the report shows exactly what was stored."""
from __future__ import annotations

from typing import Any

import numpy as np

from mmcli.pipeline.rundir import Run
from mmcli.stages.report import plots
from mmcli.stages.report.markup import absent, esc, num


def _ci(d: dict[str, Any] | None, key: str = "value") -> str:
    """``value [low, high]``; a null interval of a defined value says why (the bootstrap's validity rule)."""
    d = d or {}
    if d.get("ci_low") is None and d.get(key) is not None and d.get("n_valid") is not None:
        return f"{num(d.get(key))} [no CI: {d['n_valid']} valid resamples, under 95%]"
    return f"{num(d.get(key))} [{num(d.get('ci_low'))}, {num(d.get('ci_high'))}]"



def _block(run: Run, key: str) -> Any:
    return (run.metrics or {}).get(key)


# ---- calibration -----------------------------------------------------------------------------------------------
def reliability_figure(per_class: dict[str, Any]) -> str:
    fig = plots.new_figure(5.2, 4.4)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="ideal")
    for name, c in per_class.items():
        rel = c.get("reliability") or {}
        x, y = rel.get("mean_predicted"), rel.get("observed")
        if not x:
            continue
        label = (f"{name}: intercept {num(c['intercept']['value'], 2)}, slope {num(c['slope']['value'], 2)}")
        sizes = np.asarray(rel.get("n") or [20] * len(x), dtype=float)
        ax.plot(x, y, marker="o", lw=1.4, label=label)
        ax.scatter(x, y, s=8 + 60 * sizes / max(sizes.max(), 1), alpha=0.35)
    ax.set(xlabel="mean predicted probability (quantile bins)", ylabel="observed frequency",
           title="Reliability diagram", xlim=(0, 1), ylim=(0, 1.02))
    plots.legend_below(fig, ax, ncol=1, fontsize=7)
    return plots.to_base64(fig)


def calibration_section(run: Run) -> str:
    cal = _block(run, "calibration")
    if not cal:
        return absent("No calibration block in <code>metrics.json</code> (survival runs, or runs written before "
                       "it existed).")
    per_class = cal.get("classes") or {}
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td class='num'>{_ci(c['intercept'])}</td><td class='num'>{_ci(c['slope'])}</td>"
        f"<td class='num'>{num(c.get('brier'))}</td><td class='num'>{num(c.get('mean_predicted'))}</td>"
        f"<td class='num'>{num(c.get('observed_rate'))}</td><td class='num'>{c.get('n')}</td></tr>"
        for k, c in per_class.items())
    before = cal.get("brier_before_recalibration")
    extra = f" Brier before recalibration: {num(before)}." if before is not None else ""
    return (f"<p class='note'>Recalibration: <code>{esc(cal.get('method'))}</code>; assessed on "
            f"{esc(cal.get('what'))}. Intercept: {esc(cal.get('intercept_definition'))}; slope: "
            f"{esc(cal.get('slope_definition'))}. {esc(cal.get('ci'))}.{esc(extra)}</p>"
            "<table><tr><th>class</th><th>intercept [95% CI]</th><th>slope [95% CI]</th><th>Brier</th>"
            f"<th>mean predicted</th><th>observed rate</th><th>patients</th></tr>{rows}</table>"
            f"<div class='figs'>{plots.img_tag(reliability_figure(per_class), 'reliability diagram')}</div>")


# ---- operating point ---------------------------------------------------------------------------------------------
def operating_point_section(run: Run) -> str:
    op = _block(run, "operating_point")
    if not op:
        return absent("No operating point (fit with <code>--operating-point sens=0.9</code> or "
                       "<code>spec=0.9</code>, binary tasks).")
    m = op["metrics"]
    rows = "".join(f"<tr><td>{esc(k)}</td><td class='num'>{_ci(m[k])}</td></tr>"
                   for k in ("sensitivity", "specificity", "ppv", "npv"))
    c = m.get("counts") or {}
    target = (op.get("target") or {}).get("text", "–")
    thr = op.get("final_threshold", op.get("threshold"))
    per_fold = op.get("threshold_per_fold")
    folds = (f" Per-fold thresholds (each chosen on its training patients): "
             f"{', '.join(num(t) for t in per_fold)}." if per_fold else "")
    return (f"<p class='note'>Target <code>{esc(target)}</code>; positive class <code>"
            f"{esc(op.get('positive_class'))}</code> when P &ge; threshold. Model threshold: <b>{num(thr, 4)}"
            f"</b> (chosen on {esc(op.get('chosen_on', '–'))}).{esc(folds)}</p>"
            f"<table><tr><th>measure</th><th>value [95% CI]</th></tr>{rows}</table>"
            f"<p class='note'>TP {c.get('tp')}, FP {c.get('fp')}, TN {c.get('tn')}, FN {c.get('fn')}.</p>")


# ---- decision curve -----------------------------------------------------------------------------------------------
def decision_figure(dc: dict[str, Any]) -> str:
    t = np.asarray(dc["thresholds"], dtype=float)
    nb = dc["net_benefit"]
    fig = plots.new_figure(5.6, 4.2)
    ax = fig.subplots()
    model = np.asarray([np.nan if v is None else v for v in nb["model"]], dtype=float)
    alln = np.asarray([np.nan if v is None else v for v in nb["treat_all"]], dtype=float)
    ax.plot(t, model, lw=1.8, label="model")
    ax.plot(t, alln, lw=1.0, c="grey", label="treat all")
    ax.axhline(0, lw=1.0, c="black", ls="--", label="treat none")
    for r in dc.get("model_beats_both_ranges") or []:
        ax.axvspan(r["from"], r["to"], color="#2a9d8f", alpha=0.12, lw=0)
    if dc.get("model_beats_both_ranges"):
        ax.plot([], [], lw=6, c="#2a9d8f", alpha=0.3, label="beats both (95% CI)")
    top = np.nanmax(np.r_[model, alln, 0.01])
    ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve", xlim=(t.min(), t.max()),
           ylim=(-0.05 * max(top, 0.1), top * 1.1 + 0.01))
    plots.legend_below(fig, ax, ncol=2)
    return plots.to_base64(fig)


def decision_curve_section(run: Run) -> str:
    dc = _block(run, "decision_curve")
    if not dc:
        return absent("No decision curve in <code>metrics.json</code>.")
    if "skipped" in dc:
        return absent(esc(dc["skipped"]))
    beats = dc.get("model_beats_both_at") or []
    span = (f"{len(beats)} of {len(dc['thresholds'])} thresholds, between {beats[0]:g} and {beats[-1]:g}"
            if beats else "no threshold")
    ranges = dc.get("model_beats_both_ranges")
    if ranges is None:
        claim = (f"The model's point estimate beats treat-all and treat-none at: {span} (no resamples, so no "
                 "interval: a point estimate alone does not show a benefit).")
    else:
        where = ", ".join(f"{r['from']:g}–{r['to']:g}" for r in ranges) or "no threshold"
        claim = (f"The model beats treat-all and treat-none, with the pointwise 95% CI of the net-benefit "
                 f"difference above 0, at: <b>{esc(where)}</b> (point estimates alone: {esc(span)}).")
    diff = dc.get("net_benefit_difference") or {}
    lows, highs = diff.get("ci_low"), diff.get("ci_high")
    t = np.asarray(dc["thresholds"], dtype=float)
    show = [i for i, v in enumerate(t) if np.isclose(v * 20, round(v * 20))] or list(range(len(t)))

    def gap(i: int) -> str:
        v = (diff.get("value") or [None] * len(t))[i]
        if lows is None:
            return f"<td class='num'>{num(v)}</td>"
        return f"<td class='num'>{num(v)} [{num(lows[i])}, {num(highs[i])}]</td>"

    rows = "".join(f"<tr><td class='num'>{t[i]:g}</td><td class='num'>{num(dc['net_benefit']['model'][i])}</td>"
                   f"<td class='num'>{num(dc['net_benefit']['treat_all'][i])}</td><td class='num'>0</td>{gap(i)}</tr>"
                   for i in show)
    return (f"<p class='note'>{esc(dc.get('method'))}: net benefit = TP/n − FP/n · pt/(1 − pt) of treating "
            f"patients whose predicted risk ({esc(dc.get('what'))}) is at least the threshold pt; "
            f"prevalence {num(dc.get('prevalence'))}, {dc.get('n')} patients. {claim}</p>"
            f"<div class='figs'>{plots.img_tag(decision_figure(dc), 'decision curve')}"
            "<table><tr><th>threshold</th><th>model</th><th>treat all</th><th>treat none</th>"
            "<th>model − best of the two [95% CI]</th></tr>"
            f"{rows}</table></div>")


# ---- subgroups ----------------------------------------------------------------------------------------------------
def subgroups_section(run: Run) -> str:
    sg = _block(run, "subgroups")
    if not sg:
        return absent("No subgroup analysis (pass <code>--subgroups COL[,COL]</code>).")
    parts = [f"<p class='note'>{esc(sg.get('what'))}; {esc(sg.get('ci'))}; {esc(sg.get('method'))}. "
             f"Groups under {sg.get('min_size')} patients are listed as too small.</p>"]
    for col, c in (sg.get("columns") or {}).items():
        names = list((c.get("overall") or {}).keys())
        how = (f"numeric, bins at {', '.join(f'{e:g}' for e in c.get('edges', []))} ({esc(c.get('binning'))})"
               if c.get("kind") == "numeric" else "categorical")
        head = "".join(f"<th>{esc(n)} [95% CI]<br>gap to overall</th>" for n in names)
        overall = "".join(f"<td class='num'>{num(c['overall'][n])}</td>" for n in names)
        rows = [f"<tr><td><b>overall</b></td><td class='num'>{sum(g['n'] for g in c['groups'])}</td>{overall}</tr>"]
        for g in c["groups"]:
            if g.get("too_small"):
                rows.append(f"<tr><td>{esc(g['group'])}</td><td class='num'>{g['n']}</td>"
                            f"<td colspan='{len(names)}' class='absent'>too small (&lt; {sg.get('min_size')})"
                            "</td></tr>")
                continue
            cells = "".join(
                f"<td class='num'>{_ci(g['metrics'][n])}<br>{_gap(g['metrics'][n])}</td>" for n in names)
            rows.append(f"<tr><td>{esc(g['group'])}</td><td class='num'>{g['n']}</td>{cells}</tr>")
        parts.append(f"<h3>{esc(col)}</h3><p class='note'>from {esc(c.get('source'))}; {how}</p>"
                     f"<table><tr><th>group</th><th>patients</th>{head}</tr>{''.join(rows)}</table>")
    return "".join(parts)


def _gap(m: dict[str, Any]) -> str:
    g = m.get("gap")
    sign = "+" if g is not None and g >= 0 else ""
    if g is not None and m.get("gap_ci_low") is None and m.get("gap_n_valid") is not None:
        return f"<span class='note'>{sign}{num(g)} [no CI: {m['gap_n_valid']} valid resamples]</span>"
    return (f"<span class='note'>{sign}{num(g)} [{num(m.get('gap_ci_low'))}, "
            f"{num(m.get('gap_ci_high'))}]</span>")


# ---- external validation -----------------------------------------------------------------------------------------
def drift_section(run: Run) -> str:
    dr = _block(run, "drift")
    if not dr:
        return absent("No drift block (written by <code>mmcli evaluate</code>).")
    if "skipped" in dr:
        return absent(esc(dr["skipped"]))
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td class='num'>{d.get('n_train')}</td><td class='num'>{d.get('n_new')}</td>"
        f"<td class='num'>{d.get('n_features')}</td><td class='num'>{num(d.get('auroc'))}</td>"
        f"<td class='num'>{num(d.get('p_value'), 4)}</td><td class='num'>{num(d.get('mean_smd'))}</td>"
        f"<td class='num'>{num(d.get('max_smd'))} ({esc(d.get('max_feature'))})</td>"
        f"<td>{'<b>shift</b>' if d.get('shift_detected') else 'no evidence of shift'}</td></tr>"
        for name, d in (dr.get("modalities") or {}).items())
    return (f"<p class='note'>{esc(dr.get('method'))}. Training store: <code>{esc(dr.get('training_store'))}"
            f"</code> ({dr.get('n_train_patients')} patients).</p>"
            "<table><tr><th>modality</th><th>train</th><th>new</th><th>features</th><th>AUROC</th><th>p</th>"
            f"<th>mean SMD</th><th>max SMD</th><th></th></tr>{rows}</table>")


def missing_section(run: Run) -> str:
    miss = _block(run, "missing")
    if not miss:
        return absent("No missing-data block (written by <code>mmcli evaluate</code>).")
    rows = []
    for key, v in miss.items():
        if key == "modality_missing":
            for name, n in v.items():
                rows.append(f"<tr><td>patients without {esc(name)}</td><td class='num'>{n}</td><td></td></tr>")
            continue
        ids = v.get("patients") or []
        more = f" and {len(ids) - 8} more" if len(ids) > 8 else ""
        rows.append(f"<tr><td>{esc(key.replace('_', ' '))}</td><td class='num'>{v.get('n')}</td>"
                    f"<td>{esc(', '.join(ids[:8]) + more)}</td></tr>")
    return f"<table><tr><th>what</th><th>patients</th><th>examples</th></tr>{''.join(rows)}</table>"


def is_evaluation(run: Run) -> bool:
    return run.config.get("kind") == "external_validation"
