"""The model card of a fitted run: ``model_card.json`` and ``model_card.md`` (``mmcli report --card``), and
the JSON that ``mmcli serve`` answers on ``GET /model``.

Everything comes from the run folder (config.json, metrics.json, predictions.csv, model/); the store the run
was fitted on is read only for the encoders' ``pretrained`` attribute and the modality coverage, when it is
still reachable ("unknown" otherwise). The card carries no patient ids and no file paths.

``model_sha256`` identifies the served model: sha256 over the files of ``model/`` in sorted order of their
relative paths, each as ``path NUL size NUL bytes`` (so a renamed, added or changed file changes it).
"""
from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.heads.evaluation import headline
from mmcli.pipeline.errors import InputError, RunFolderError
from mmcli.pipeline.io import atomic_write_text, jsonable, write_json
from mmcli.pipeline.rundir import CONFIG, MODEL_DIR, SURVIVAL, Run, load_run, read_json, resolve_model_dir

CARD_JSON, CARD_MD = "model_card.json", "model_card.md"
CARD_SCHEMA = "mmcli-model-card/1"
SYNTH_MARKER = ".mmcli_synth.json"  # mmcli.stages.synth.MARKER (not imported: that pulls the image writers in)
SMALL_N = 100  # below this many patients the card says the intervals are wide
FEW_PER_CLASS = 10
OPEN_LICENCES = ("Apache-2.0", "MIT", "BSD-3-Clause", "BSD-2-Clause")  # no condition a card must repeat
FEW_EVENTS = 30


def model_sha256(model_dir: str | Path) -> str:
    """sha256 over ``model_dir``'s files (sorted relative paths; ``path NUL size NUL bytes`` each)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        h.update(rel.encode("utf-8") + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _run_of(path: Path) -> tuple[Run | None, Path]:
    """(the run, its model folder) for a run folder or a model folder (a bare model folder has no run)."""
    model_dir = resolve_model_dir(path)
    if not (model_dir / CONFIG).is_file():
        raise InputError(f"{path}: not a run folder or model folder (no model/config.json).",
                         fix="pass the --out folder of `mmcli fit`.")
    run_dir = model_dir.parent if model_dir.name == MODEL_DIR else None
    run = None
    if run_dir is not None and (run_dir / CONFIG).is_file():
        run = load_run(run_dir)
    return run, model_dir


def _open_store(store: str | Path | None) -> Any:
    if not store:
        return None
    from mmcli.pipeline.store import open_store

    try:
        return open_store(Path(store), "r") if Path(store).exists() else None
    except Exception:  # noqa: BLE001 - an unreadable store only makes the card say "unknown"
        return None


def _encoder(recorded: dict[str, Any] | None, fs: Any, modality: str, encoder_id: str | None) -> dict[str, Any]:
    """An encoder's entry: name, pretrained (True / False / "unknown" / "not applicable") and licence, from what
    fit recorded in the run (``encoder_provenance``), else from the training store's encoder attrs if reachable."""
    if encoder_id is None:
        return {"encoder": None, "pretrained": "not applicable", "licence": None, "licence_terms": None,
                "gated": None}
    attrs = recorded
    if not attrs and fs is not None:  # runs fitted before fit recorded it, or nothing recorded
        try:
            attrs = fs.encoder_attrs(modality, encoder_id)
        except Exception:  # noqa: BLE001 - an unreadable store only makes the card say "unknown"
            attrs = None
    attrs = attrs or {}
    value = attrs.get("pretrained")
    return {"encoder": attrs.get("encoder"), "pretrained": value if isinstance(value, bool) else "unknown",
            "licence": attrs.get("licence"), "licence_terms": attrs.get("licence_terms"),
            "gated": attrs.get("gated")}


def _coverage(fs: Any, specs: list[dict[str, Any]], patients: list[str]) -> dict[str, int] | None:
    """Training patients with each modality (None without the store or the patient list)."""
    if fs is None or not patients:
        return None
    wanted, out = set(patients), {}
    try:
        for s in specs:
            if s["source"] == "table":
                table = fs.read_table(s["name"])
                rows = table.reindex([p for p in table.index.astype(str) if p in wanted])
                out[s["name"]] = int((~rows.isna().all(axis=1)).sum())
            else:
                out[s["name"]] = len(wanted & set(fs.patients(s["name"], s["encoder_id"])))
    except Exception:  # noqa: BLE001 - the store changed since the fit: no coverage rather than a wrong one
        return None
    return out


def _synthetic(config: dict[str, Any]) -> bool | None:
    """True when the labels or the store come from `mmcli synth` (its marker beside them), None if unknown."""
    places = [config.get("labels"), config.get("store")]
    seen = False
    for p in places:
        if not p or p == "<DataFrame>":
            continue
        folder = Path(p).parent
        if Path(p).exists():
            seen = True
            if (folder / SYNTH_MARKER).is_file() or (folder / "cohort" / SYNTH_MARKER).is_file():
                return True
    return False if seen else None


def _data_summary(run: Run | None, config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_patients": config.get("n_patients")}
    excluded = config.get("excluded_patients") or {}
    out["excluded_patients"] = {k: len(v) if isinstance(v, (list, tuple)) else int(v) for k, v in excluded.items()}
    pred = run.predictions if run is not None else None
    if pred is None:
        return out
    out["n_patients"] = out["n_patients"] or len(pred)
    if run is not None and run.task == SURVIVAL:
        events = pred["event"].astype(int)
        t = pred["time"].astype(float)
        out["survival"] = {"events": int(events.sum()), "censored": int((events == 0).sum()),
                           "median_time": float(np.median(t)), "max_time": float(t.max()),
                           "time_unit": config.get("time_unit")}
    else:
        counts = pred["y_true"].astype(str).value_counts()
        out["classes"] = {c: int(counts.get(c, 0)) for c in (run.classes if run is not None else counts.index)}
    return out


def _limitations(card: dict[str, Any]) -> list[str]:
    out = ["Internal validation only: metrics are from patient-level cross-validation on one cohort; "
           "performance on another site, scanner or population is unknown until validated there."]
    random = [e["modality"] for e in card["encoders"] if e["pretrained"] is False]
    unknown = [e["modality"] for e in card["encoders"] if e["pretrained"] == "unknown"]
    if random:
        out.append(f"Random-init encoders for {random}: their features carry no pretrained knowledge "
                   "(a plumbing check, not a usable model for those modalities).")
    if unknown:
        out.append(f"Whether the encoders for {unknown} were pretrained is unknown (the training store is "
                   "not reachable or does not record it).")
    restricted = [f"{e['modality']}: {e['encoder']} ({e['licence']}: {e.get('licence_terms') or 'see its card'})"
                  for e in card["encoders"] if e.get("licence") and e["licence"] not in OPEN_LICENCES]
    if restricted:
        out.append(f"Encoder licences with conditions: {'; '.join(restricted)}. Check them before any use beyond "
                   "academic research; some count models trained on their outputs, this one included, as derivatives.")
    synthetic = card["data"].get("synthetic")
    if synthetic:
        out.append("Trained on synthetic data (`mmcli synth`): the numbers show the pipeline works, "
                   "not that the model predicts anything in real patients.")
    elif synthetic is None:
        out.append("Data provenance unknown: the labels and store the run was fitted on are not reachable.")
    n = card["data"].get("n_patients") or 0
    if n and n < SMALL_N:
        out.append(f"Small cohort (n = {n}): confidence intervals are wide and may be optimistic.")
    classes = card["data"].get("classes") or {}
    small = [c for c, k in classes.items() if k < FEW_PER_CLASS]
    if small:
        out.append(f"Classes with fewer than {FEW_PER_CLASS} patients: {small}.")
    surv = card["data"].get("survival")
    if surv and surv["events"] < FEW_EVENTS:
        out.append(f"Few events ({surv['events']}): survival metrics are imprecise.")
    cal = card["calibration"]
    if (cal is None or cal.get("method") == "none") and card["model"]["task"] != SURVIVAL:
        out.append("Calibration not assessed: probabilities are not recalibrated (class-weighted training "
                   "shifts them toward balanced classes); do not read them as absolute risks.")
    if card["subgroups"] is None:
        out.append("No subgroup analysis: performance across age, sex, site or batch is unknown.")
    excluded = sum(card["data"].get("excluded_patients", {}).values())
    if excluded:
        out.append(f"{excluded} patients were left out of training (see data.excluded_patients).")
    return out


def build_card(path: str | Path) -> dict[str, Any]:
    """The model card of a run folder (or a bare model folder) as a JSON-ready dict."""
    run, model_dir = _run_of(Path(path))
    model_cfg = read_json(model_dir / CONFIG)
    config = dict(model_cfg.get("run") or {})
    if run is not None:
        config.update(run.config)
    metrics_doc = (run.metrics if run is not None else None) or {}
    specs = list(model_cfg.get("modalities") or [])
    fs = _open_store(config.get("store"))
    encoders = []
    recorded = config.get("encoder_provenance") or {}
    for s in specs:
        encoders.append({"modality": s["name"], "encoder_id": s.get("encoder_id") or "tabular",
                         **_encoder(recorded.get(s["name"]), fs, s["name"], s.get("encoder_id"))})
    task = config.get("task") or ("survival" if model_cfg["params"].get("task") == "survival" else "classification")
    folds_doc = (run.path / "folds.json") if run is not None else None
    patients = list(read_json(folds_doc)) if folds_doc is not None and folds_doc.is_file() else []
    data = _data_summary(run, config)
    data["modalities"] = [s["name"] for s in specs]
    data["coverage"] = _coverage(fs, specs, patients)
    data["synthetic"] = _synthetic(config)
    data["features_sha256"] = config.get("features_sha256")
    endpoint = ({"time": config.get("time"), "event": config.get("event")} if task == SURVIVAL
                else {"target": config.get("target")})
    what = (f"survival risk ({endpoint['time']}, {endpoint['event']})" if task == SURVIVAL
            else f"the value of {endpoint['target']}" if task == "regression"
            else f"{endpoint['target']} ({', '.join(map(str, config.get('classes') or []))})")
    card: dict[str, Any] = {
        "schema": CARD_SCHEMA,
        "model": {
            "head": model_cfg.get("head"), "params": model_cfg.get("params"), "task": task,
            **endpoint,
            "classes": config.get("classes"), "risk_convention": config.get("risk_convention"),
            "modalities": specs, "encoder_ids": config.get("encoder_ids") or {},
            "features_sha256": config.get("features_sha256"), "model_sha256": model_sha256(model_dir),
            "fitted_with_mmcli": config.get("mmcli_version") or model_cfg.get("mmcli_version"),
            "created": config.get("created"), "seed": config.get("seed"),
        },
        "mmcli_version": __version__,
        "intended_use": (f"Research use: predicts {what} from cached {', '.join(data['modalities'])} features. "
                         "Inputs must come from the same encoders and settings (encoder_ids) as training. Not a "
                         "medical device and not validated for clinical decisions; any clinical use needs "
                         "external validation and the approvals that apply where it is used."),
        "data": data,
        "validation": {"scheme": "patient-level stratified K-fold cross-validation; metrics on out-of-fold "
                       "predictions (mean over folds) with two 95% intervals: the corrected resampled t over folds "
                       "(headline: covers training and test variability) and the percentile bootstrap over test "
                       "patients (fold models fixed: test variability only)", "folds": config.get("folds"),
                       "n_boot": config.get("n_boot"), "seed": config.get("seed")},
        "encoders": encoders,
        "metrics": metrics_doc.get("metrics"),
        "calibration": metrics_doc.get("calibration", config.get("calibration")),
        "operating_point": metrics_doc.get("operating_point", model_cfg.get("operating_point")),
        "subgroups": metrics_doc.get("subgroups"),
    }
    card["limitations"] = _limitations(card)
    return jsonable(card)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|~])")


def _md(v: Any) -> str:
    """``v`` as literal Markdown text: Markdown punctuation backslash-escaped and HTML escaped (``<``, ``>``,
    ``&``, quotes), so a class label such as ``<img src=x onerror=...>`` or ``[x](javascript:...)`` is shown as
    text by any renderer, never run or linked; newlines become spaces (one table cell, one list item)."""
    text = " ".join(str(v).splitlines())
    return html.escape(_MD_SPECIAL.sub(r"\\\1", text), quote=True)


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return _md(", ".join(map(str, v)))
    return _md(v)


def _fenced(text: str, lang: str = "json") -> str:
    """``text`` in a code fence longer than any backtick run inside it (a label cannot close the fence)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown (the same content as the JSON). Every value that comes from the data or the config
    (labels, column and modality names, free text) is escaped (:func:`_md`)."""
    m, d = card["model"], card["data"]
    lines = [f"# Model card: {_md(m['head'])} ({_md(m['task'])})", "",
             f"mmcli {_md(card['mmcli_version'])} (fitted with {_md(m['fitted_with_mmcli'])}), created "
             f"{_md(m['created'])}", "",
             "## Intended use", "", _md(card["intended_use"]), "",
             "## Model", "", "| field | value |", "| --- | --- |"]
    for key in ("head", "target", "time", "event", "classes", "risk_convention", "seed",
                "model_sha256", "features_sha256"):
        if key in m and m[key] is not None:
            lines.append(f"| {key} | {_cell(m[key])} |")
    lines += ["", "## Data", "", f"- patients: {_md(d.get('n_patients'))}"]
    for c, k in (d.get("classes") or {}).items():
        lines.append(f"- class {_md(c)}: {_md(k)}")
    if d.get("survival"):
        s = d["survival"]
        unit = f" {_md(s['time_unit'])}" if s.get("time_unit") else ""
        lines.append(f"- events: {s['events']}, censored: {s['censored']}, median time {s['median_time']:.3g}{unit}")
    cov = d.get("coverage") or {}
    lines.append("- modalities: " + ", ".join(f"{_md(n)} ({cov[n]} patients)" if n in cov else _md(n)
                                              for n in d["modalities"]))
    for reason, k in (d.get("excluded_patients") or {}).items():
        lines.append(f"- excluded ({_md(reason)}): {_md(k)}")
    synth = {True: "yes (mmcli synth)", False: "no", None: "unknown"}[d.get("synthetic")]
    lines += [f"- synthetic data: {synth}", "", "## Encoders", "",
              "| modality | encoder_id | encoder | pretrained | licence |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {_cell(e['modality'])} | {_cell(e['encoder_id'])} | {_cell(e['encoder'])} | "
              f"{_cell(e['pretrained'])} | {_cell(e.get('licence'))} |" for e in card["encoders"]]
    v = card["validation"]
    lines += ["", "## Metrics", "", f"{_md(v['scheme'])}; {_md(v['folds'])} folds, {_md(v['n_boot'])} bootstrap "
              "resamples.", ""]
    lines += _metric_rows(card["metrics"] or {})
    for key, title in (("calibration", "Calibration"), ("operating_point", "Operating point"),
                       ("subgroups", "Subgroups")):
        lines += ["", f"## {title}", ""]
        lines.append("not computed for this run" if card[key] is None else _fenced(_pretty(card[key])))
    lines += ["", "## Limitations", ""] + [f"- {_md(x)}" for x in card["limitations"]]
    return "\n".join(lines) + "\n"


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    """The metrics table: value, the headline interval, then the other one, each column saying what it covers
    (:mod:`mmcli.heads.evaluation.headline`)."""
    entries = {k: m for k, m in metrics.items() if isinstance(m, dict)}
    if not entries:
        return ["no metrics"]
    key = headline.headline_key(next(iter(entries.values())))
    keys = [key] + ([headline.CI_BOOT] if key == headline.CI_T else [])
    what = headline.scope(next(iter(entries.values())))
    rows = ["| metric | " + what + " | " + " | ".join(f"95% CI: {headline.short_label(k, what)}" for k in keys)
            + " |",
            "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for name, mv in entries.items():
        cis = " | ".join(f"[{_cell(lo)}, {_cell(hi)}]" for lo, hi in (headline.interval(mv, k) for k in keys))
        rows.append(f"| {_cell(name)} | {_cell(mv.get('mean'))} | {cis} |")
    rows += [""] + [f"- {line}" for line in headline.legend(key, what)]
    return rows


def _pretty(doc: Any) -> str:
    import json

    return json.dumps(doc, indent=2)


def write_card(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``model_card.md`` into the run folder; returns their paths."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunFolderError(f"{run_dir}: not a run folder (no config.json).", fix="pass the --out folder of "
                             "`mmcli fit`.")
    card = build_card(run_dir)
    js = write_json(run_dir / CARD_JSON, card)
    md = atomic_write_text(run_dir / CARD_MD, card_markdown(card))
    return md, js
