"""Report sections from out-of-fold integrated gradients (``attributions.csv``, ``attributions_windows.csv``).

* :func:`attributions_section`: per-modality attribution shares and, for biological review, a top-features
  table per class (table columns such as genes and proteins by name; embedding and bag modalities as one row,
  their attributions summed).
* :func:`note_windows_section`: for a few out-of-fold patients (highest and lowest score, and the most
  confidently misclassified), the note windows with the largest attributions. The store holds only the
  windows' character offsets; the text is read from the note file named in the item's provenance (the run's
  ``store``) when that file is reachable and unchanged since extraction (same size and first-64-KiB hash),
  else only the offsets are shown.

Attributions are in units of the attributed output: the log-odds of the second class (binary), the logit of
the patient's predicted class (multiclass) or the risk (survival); see :mod:`mmcli.heads.nn.attribution`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.pipeline.rundir import CLASSIFICATION, WINDOW_ATTRIBUTIONS, Run, read_csv
from mmcli.stages.report import plots
from mmcli.stages.report.markup import absent, esc, num

TOP_FEATURES = 10
SNIPPET_CHARS = 600
SUM = "(sum)"





def _label(feature: str, modality: str) -> str:
    return f"{modality} (embedding, summed)" if feature == SUM else str(feature)


# ---- per modality and per feature ------------------------------------------------------------------------
def modality_shares(ig: pd.DataFrame) -> pd.DataFrame:
    """Per modality: ``n_patients``, ``mean_net`` (mean over patients of the modality's signed total),
    ``mean_abs`` (mean of its absolute value) and ``share`` (``mean_abs`` normalised to sum 1). A table's
    features are summed per patient first, so that tables and embeddings are compared alike."""
    net = ig.groupby(["modality", "patient_id"], sort=False)["attribution"].sum().reset_index()
    out = net.groupby("modality", sort=False)["attribution"].agg(
        n_patients="size", mean_net="mean", mean_abs=lambda s: s.abs().mean())
    total = out["mean_abs"].sum()
    out["share"] = out["mean_abs"] / total if total > 0 else 0.0
    return out.sort_values("share", ascending=False)


def top_features(ig: pd.DataFrame, run: Run, k: int = TOP_FEATURES) -> list[tuple[str, pd.DataFrame]]:
    """``(title, table)`` per class (survival: per direction of risk); each table the ``k`` features with the
    largest mean attribution toward it, with their mean |attribution| and patient count."""
    ig = ig.assign(label=[_label(f, m) for f, m in zip(ig["feature"], ig["modality"])])
    groups: list[tuple[str, pd.DataFrame, float]] = []
    if run.task != CLASSIFICATION:
        groups = [("toward higher risk", ig, 1.0), ("toward lower risk", ig, -1.0)]
    else:
        classes = run.classes
        if len(classes) == 2:  # the attributed output is the log-odds of classes[1]
            groups = [(f"toward class {classes[1]}", ig, 1.0), (f"toward class {classes[0]}", ig, -1.0)]
        elif run.predictions is not None and classes:  # the logit of each patient's predicted class
            predicted = dict(zip(run.predictions["patient_id"].astype(str),
                                 np.asarray(classes)[run.prob_matrix().argmax(1)]))
            cls = ig["patient_id"].astype(str).map(predicted)
            groups = [(f"class {c} (patients predicted {c})", ig[cls == c], 1.0) for c in classes]
    out = []
    for title, df, sign in groups:
        if df.empty:
            continue
        agg = df.groupby(["modality", "label"], sort=False)["attribution"].agg(
            mean="mean", mean_abs=lambda s: s.abs().mean(), n="size").reset_index()
        agg["toward"] = sign * agg["mean"]
        out.append((title, agg.sort_values("toward", ascending=False).head(k)))
    return out


def attributions_section(run: Run) -> str:
    path = run.optional("attributions.csv")
    if path is None:
        return absent("No <code>attributions.csv</code> (out-of-fold integrated gradients, written by "
                       "<code>fusion_mlp</code> and <code>attention_mil</code> runs).")
    ig = read_csv(path)
    if ig.empty:
        return absent("<code>attributions.csv</code> has no rows.")
    ig["attribution"] = pd.to_numeric(ig["attribution"], errors="coerce")
    ig = ig.dropna(subset=["attribution"])
    shares = modality_shares(ig)
    intro = (f"<p class='note'>{ig['patient_id'].nunique()} patients, integrated gradients on each patient's "
             f"held-out fold. {_units(run)} A modality's attribution is the sum over its features (a table's columns, "
             "an embedding's dimensions, a bag's tiles)")
    if len(shares) == 1:  # a share over one modality is 1 by construction: say so instead of drawing a full bar
        (m, r), = shares.iterrows()
        overview = (f"{intro}. One modality (<code>{esc(m)}</code>): its share is 1 by construction, so no share "
                    f"is drawn; its mean |attribution| is {num(r.mean_abs)} and its mean signed attribution "
                    f"{num(r.mean_net)} over {int(r.n_patients)} patients.</p>")
    else:
        rows = "".join(f"<tr><td>{esc(m)}</td><td class='num'>{int(r.n_patients)}</td>"
                       f"<td class='num'>{num(r.share)}</td><td class='num'>{num(r.mean_abs)}</td>"
                       f"<td class='num'>{num(r.mean_net)}</td></tr>" for m, r in shares.iterrows())
        png = plots.bar_figure(list(shares.index), shares["share"].to_numpy(),
                               title="Attribution share per modality",
                               xlabel="share of mean |attribution| (out-of-fold IG)")
        overview = (f"{intro}; its share is its mean |attribution| over the patients that have it, normalised over "
                    "modalities.</p><table><tr><th>modality</th><th>patients</th><th>share</th><th>mean "
                    f"|attribution|</th><th>mean attribution</th></tr>{rows}</table>"
                    f"{plots.img_tag(png, 'attribution shares')}")
    parts = [
        overview,
        "<h3>Top features per class</h3><p class='note'>For biological review: table columns (genes, proteins, "
        "clinical variables, <code>&lt;col&gt;__missing</code> indicators) by name; embeddings and tile bags are "
        "not interpretable per dimension and appear as one summed row. Mean over the patients that have the "
        "feature; a positive <em>toward</em> value pushes the output toward the column's class.</p>",
    ]
    for title, table in top_features(ig, run):
        body = "".join(f"<tr><td>{esc(r.label)}</td><td>{esc(r.modality)}</td><td class='num'>{num(r.toward)}"
                       f"</td><td class='num'>{num(r.mean_abs)}</td><td class='num'>{int(r.n)}</td></tr>"
                       for r in table.itertuples())
        parts.append(f"<h4>{esc(title)}</h4><table><tr><th>feature</th><th>modality</th><th>toward</th>"
                     f"<th>mean |attribution|</th><th>patients</th></tr>{body}</table>")
    return "\n".join(parts)


def _units(run: Run) -> str:
    if run.task != CLASSIFICATION:
        return "Units: the model's risk (log hazard ratio)."
    if len(run.classes) == 2:
        return f"Units: log-odds of class {esc(run.classes[1])}."
    return "Units: the logit of each patient's predicted class."


# ---- note windows ------------------------------------------------------------------------------------------
def pick_patients(run: Run, candidates: set[str], n: int) -> list[tuple[str, str]]:
    """Up to ``n`` ``(patient_id, why)`` among ``candidates``: the most confidently misclassified (classification),
    then alternately the highest and lowest out-of-fold score."""
    pred = run.predictions
    if pred is None:
        return [(p, "") for p in sorted(candidates)[:n]]
    pid = pred["patient_id"].astype(str).to_numpy()
    score = run.score()
    keep = np.array([p in candidates for p in pid])
    chosen: list[tuple[str, str]] = []
    if run.task == CLASSIFICATION and "y_pred" in pred:
        wrong = keep & (pred["y_pred"].astype(str).to_numpy() != pred["y_true"].astype(str).to_numpy())
        conf = run.prob_matrix().max(axis=1)
        for i in np.argsort(-np.where(wrong, conf, -np.inf))[: max(1, n // 3)]:
            if wrong[i]:
                chosen.append((pid[i], f"misclassified: true {pred['y_true'].iloc[i]}, predicted "
                                       f"{pred['y_pred'].iloc[i]} (p={conf[i]:.2f})"))
    what = "risk" if run.task != CLASSIFICATION else "score"
    order = [i for i in np.argsort(-score, kind="stable") if keep[i]]
    high, low = list(order), list(reversed(order))
    taken = {c for c, _ in chosen}
    while len(chosen) < n and (high or low):
        for seq, tag in ((high, "highest"), (low, "lowest")):
            while seq and pid[seq[0]] in taken:
                seq.pop(0)
            if seq and len(chosen) < n:
                i = seq.pop(0)
                chosen.append((pid[i], f"{tag} out-of-fold {what} ({score[i]:.2f})"))
                taken.add(pid[i])
    return chosen


class NoteReader:
    """Reads a window's text from the note file named in the store item's provenance, when that file is
    reachable and unchanged since extraction (size and first-64-KiB hash); caches notes and the store."""

    def __init__(self, store: str | None) -> None:
        self.store_path = store
        self._store: Any = None
        self._notes: dict[tuple[str, str, str, str], tuple[str | None, str]] = {}

    def _open(self) -> Any:
        if self._store is None and self.store_path and Path(self.store_path).exists():
            from mmcli.pipeline.store import open_store

            self._store = open_store(self.store_path, "r")
        return self._store

    def note(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> tuple[str | None, str]:
        """``(text or None, why not)``."""
        key = (modality, encoder_id, patient_id, item_id)
        if key not in self._notes:
            self._notes[key] = self._read(*key)
        return self._notes[key]

    def _read(self, modality: str, encoder_id: str, patient_id: str, item_id: str) -> tuple[str | None, str]:
        from mmcli.features.text import read_note
        from mmcli.pipeline.fingerprint import source_fingerprint

        try:
            store = self._open()
        except Exception as e:  # noqa: BLE001 - an unreadable store costs the text, not the section
            return None, f"store not readable ({type(e).__name__})"
        if store is None:
            return None, "the run's store is not reachable"
        attrs = store.item_attrs(modality, encoder_id, patient_id, item_id) or {}
        fp = attrs.get("source_fingerprint") or {}
        path = fp.get("path")
        if not path or not Path(path).is_file():
            return None, "note file not reachable"
        now = source_fingerprint(path)
        if (now["size"], now["head_sha256"]) != (fp.get("size"), fp.get("head_sha256")):
            return None, "note file changed since extraction"
        try:
            return read_note(path)[0], ""
        except Exception as e:  # noqa: BLE001
            return None, f"note file not readable ({type(e).__name__})"


def note_windows_section(run: Run, n_patients: int = 6, top_k: int = 3) -> str:
    path = run.optional(WINDOW_ATTRIBUTIONS)
    if path is None:
        return absent(f"No <code>{WINDOW_ATTRIBUTIONS}</code>: written by <code>fusion_mlp</code> runs with a "
                       "note modality extracted as per-window rows (<code>mmcli extract --modality text</code> "
                       "of this version).")
    win = read_csv(path)
    if win.empty:
        return absent(f"<code>{WINDOW_ATTRIBUTIONS}</code> has no rows.")
    win["patient_id"] = win["patient_id"].astype(str)
    win["item_id"] = win["item_id"].astype(str)
    for c in ("attribution", "char_start", "char_end", "tokens", "window"):
        win[c] = pd.to_numeric(win[c], errors="coerce")
    reader = NoteReader(run.store)
    encoders = run.encoder_ids
    parts = [f"<p class='note'>Per patient, the {top_k} note windows with the largest |attribution| (integrated "
             "gradients on each window's embedding, out-of-fold; a patient's windows sum to its note modality's "
             f"attribution). {_units(run)} The store keeps only character offsets; the text below is read from "
             "the note file when it is reachable and unchanged.</p>"]
    for pid, why in pick_patients(run, set(win["patient_id"]), n_patients):
        rows = win[win["patient_id"] == pid]
        total = rows.groupby("modality")["attribution"].sum()
        head = ", ".join(f"{esc(m)} total {num(v)}" for m, v in total.items())
        parts.append(f"<h4>{esc(pid)}</h4><p class='note'>{esc(why)}; {head}; {len(rows)} windows.</p>")
        body = []
        for r in rows.reindex(rows["attribution"].abs().sort_values(ascending=False).index).head(top_k).itertuples():
            text, reason = reader.note(str(r.modality), encoders.get(str(r.modality), ""), pid, str(r.item_id))
            start, end = int(r.char_start), int(r.char_end)
            if text is not None and 0 <= start < end <= len(text):
                snippet = text[start:end]
                cut = len(snippet) > SNIPPET_CHARS
                shown = f"<q>{esc(snippet[:SNIPPET_CHARS])}{'…' if cut else ''}</q>"
            else:
                shown = f"<span class='absent'>offsets only: {esc(reason or 'offsets outside the note')}</span>"
            sign = "pos" if r.attribution > 0 else "neg"
            body.append(f"<tr><td>{esc(r.item_id)}#{int(r.window)}</td><td class='num {sign}'>"
                        f"{num(r.attribution)}</td><td class='num'>{start}–{end}</td><td class='num'>"
                        f"{int(r.tokens)}</td><td>{shown}</td></tr>")
        parts.append("<table><tr><th>window</th><th>attribution</th><th>chars</th><th>tokens</th><th>text</th>"
                     f"</tr>{''.join(body)}</table>")
    return "\n".join(parts)
