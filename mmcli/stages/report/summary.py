"""The top of ``report.html``: a banner when the features came from encoders without pretrained weights, and the
headline box (the primary metric with its headline interval and what that interval covers, the patients, the
events or classes, and a one-line reading).

The primary metric is AUROC for classification (macro one-vs-rest for more than two classes), Harrell's
c-index for survival and R^2 for regression; its interval is the one :mod:`mmcli.heads.evaluation.headline`
names as headline (the corrected t-interval over folds for a cross-validation, the bootstrap over patients for
one evaluation set). Whether an encoder was pretrained is read from the store's encoder attributes
(``pretrained``, written at extraction); a store that is not reachable, or imported features that do not
say, give no banner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcli.heads.evaluation import headline
from mmcli.pipeline.rundir import CLASSIFICATION, REGRESSION, Run
from mmcli.stages.report.markup import esc, num

PRIMARY = {"classification": "auroc", "survival": "c_index", "regression": "r2"}
NAMES = {"auroc": "AUROC", "c_index": "c-index (Harrell)", "r2": "R\u00b2"}
CHANCE = 0.5  # AUROC and c-index of a score unrelated to the outcome
R2_CHANCE = 0.0  # R^2 of predicting every patient the mean



def _num(v: Any, digits: int = 3) -> str:
    return num(v, digits, missing="n/a")


# ---- unpretrained encoders -------------------------------------------------------------------------------------
def unpretrained_encoders(run: Run) -> list[dict[str, str]] | None:
    """``[{"modality", "encoder_id", "encoder", "weights"}]`` of the run's encoders whose store attributes say
    ``pretrained: false``; None when the store cannot be read (then nothing can be said)."""
    from mmcli.pipeline.store import open_store

    store = run.store
    if not store or not Path(store).exists():
        return None
    try:
        fs = open_store(Path(store), "r")
    except Exception:  # noqa: BLE001 - an unreadable store only costs the banner
        return None
    out = []
    for modality, eid in run.encoder_ids.items():
        if not eid or eid == "tabular":
            continue
        try:
            attrs = fs.encoder_attrs(modality, eid) or {}
        except Exception:  # noqa: BLE001
            continue
        if attrs.get("pretrained") is False:
            out.append({"modality": modality, "encoder_id": eid, "encoder": str(attrs.get("encoder") or eid),
                        "weights": str(attrs.get("weights") or "random initialisation")})
    return out


def banner(run: Run) -> str:
    """A warning box naming the encoders that ran without pretrained weights ("" when there are none)."""
    found = unpretrained_encoders(run)
    if not found:
        return ""
    names = "; ".join(f"{esc(e['modality'])}: <code>{esc(e['encoder'])}</code>" for e in found)
    return ("<div class='banner' role='alert'><strong>Features from encoders without pretrained weights</strong> "
            f"({names}). These encoders ran on a seeded random initialisation, so their features are random "
            "projections, not learned representations: the numbers below say nothing about what a pretrained "
            "encoder would give. <code>mmcli doctor</code> names the weights to place offline (or pass "
            "<code>--weights FILE</code> to <code>mmcli extract</code>), then extract again.</div>")


# ---- the headline box ------------------------------------------------------------------------------------------
def primary_metric(run: Run) -> tuple[str, dict[str, Any]] | None:
    """``(name, metrics.json entry)`` of the run's primary metric (first metric when it lacks the usual one)."""
    metrics = (run.metrics or {}).get("metrics") or {}
    entries = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    if not entries:
        return None
    name = PRIMARY.get(run.task)
    return (name, entries[name]) if name in entries else next(iter(entries.items()))


def _cohort_line(run: Run) -> str:
    """Patients and classes (with counts) or events."""
    met, pred = run.metrics or {}, run.predictions
    n = met.get("n_patients") or (len(pred) if pred is not None else None)
    parts = [f"{n} patients" if n is not None else "patients: not recorded"]
    if pred is None:
        return parts[0]
    if run.task == CLASSIFICATION and "y_true" in pred:
        counts = pred["y_true"].astype(str).value_counts()
        parts.append(", ".join(f"{esc(c)} {int(counts.get(c, 0))}" for c in run.classes))
    elif run.task == REGRESSION and "y_true" in pred:
        y = pred["y_true"].to_numpy(dtype=float)
        parts.append(f"{esc(run.config.get('target') or 'target')}: mean {_num(y.mean())}, sd {_num(y.std(ddof=1))}"
                     f", range {_num(y.min())} to {_num(y.max())}")
    elif "event" in pred:
        events = int(pred["event"].sum())
        unit = f" {run.time_unit}" if run.time_unit else ""
        parts.append(f"{events} events ({100 * events / max(len(pred), 1):.0f}%), {len(pred) - events} censored; "
                     f"follow-up up to {_num(pred['time'].max(), 1)}{esc(unit)}")
    return "; ".join(parts)


def reading(run: Run, name: str, value: Any, lo: Any, hi: Any) -> str:
    """One sentence saying what the number means and whether its interval excludes chance."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "The metric could not be computed on these predictions (see the metrics table)."
    if name == "auroc":
        multi = run.task == CLASSIFICATION and len(run.classes) > 2
        what = (f"For a patient of one class and a patient of another, the model scores the first higher for its "
                f"class {100 * v:.0f}% of the time (macro average over the {len(run.classes)} classes, one vs rest)"
                if multi else f"A random patient of class {esc(run.classes[1] if len(run.classes) > 1 else '?')} "
                f"is scored above a random patient of the other class {100 * v:.0f}% of the time")
    elif name == "c_index":
        what = (f"Of the patient pairs whose order of events is known, the patient with the higher predicted risk "
                f"had the event first in {100 * v:.0f}%")
    elif name == "r2":
        return _r2_reading(run, v, lo, hi)
    else:
        return f"{esc(name)} = {_num(v)}."
    if lo is None or hi is None:
        chance = "there is no interval to compare with chance (0.5)"
    elif float(lo) > CHANCE:
        chance = "the interval lies above chance (0.5)"
    elif float(hi) < CHANCE:
        chance = "the interval lies below chance (0.5): the scores rank the wrong way"
    else:
        chance = "the interval includes chance (0.5): not distinguishable from a random score at this size"
    return f"{what}; {chance}."


def _r2_reading(run: Run, v: float, lo: Any, hi: Any) -> str:
    target = esc(run.config.get("target") or "the target")
    what = (f"The predictions explain {100 * v:.0f}% of the variance of {target} across patients" if v >= 0 else
            f"The predictions are further from {target} than its mean would be (R\u00b2 below 0)")
    if lo is None or hi is None:
        chance = "there is no interval to compare with predicting the mean (0)"
    elif float(lo) > R2_CHANCE:
        chance = "the interval lies above 0: better than predicting every patient the mean"
    else:
        chance = "the interval includes or lies below 0: not distinguishable from predicting the mean"
    return f"{what}; {chance}."


def headline_box(run: Run) -> str:
    """The box that opens the report (an empty-metrics run says so in the box)."""
    found = primary_metric(run)
    if found is None:
        return ("<div class='headline'><p class='absent'>No metrics in this run (<code>metrics.json</code> missing "
                "or empty).</p></div>")
    name, m = found
    lo, hi, key = headline.headline_interval(m)
    what = headline.scope(m)
    covers = headline.legend(key, what)[0]
    evaluation = len(m.get("per_fold") or []) < 2
    source = ("On this evaluation cohort (the fitted model, held fixed)" if evaluation else
              f"Out-of-fold, {esc(what)}")
    label = NAMES.get(name, name)
    if name == "auroc" and run.task == CLASSIFICATION and len(run.classes) > 2:
        label = "macro AUROC (one vs rest)"
    return (
        "<div class='headline'>"
        f"<div class='metric'><span class='name'>{esc(label)}</span> "
        f"<span class='value'>{_num(m.get('mean'))}</span> "
        f"<span class='ci'>95% CI [{_num(lo)}, {_num(hi)}]</span></div>"
        f"<p>{source}; 95% CI by {esc(covers)}.</p>"
        f"<p>{_cohort_line(run)}.</p>"
        f"<p class='reading'>{reading(run, name, m.get('mean'), lo, hi)}</p>"
        f"{_overlap_note(run)}</div>")


def _overlap_note(run: Run) -> str:
    """``mmcli evaluate --allow-overlap``: patients that the model was trained on score in-sample."""
    ov = (run.metrics or {}).get("training_overlap") or {}
    n = ov.get("n") or 0
    if not n:
        return ""
    return (f"<p class='wrong'>{int(n)} of these patients were in the training cohort: their predictions are "
            "in-sample, so this number is optimistic.</p>")
