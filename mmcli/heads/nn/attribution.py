"""Integrated gradients (captum): ``fusion_mlp`` per input feature of tables, summed per embedding modality, and
per note window; ``attention_mil`` summed over the bag.

What is attributed, per patient, is the network's output margin: the log-odds ``logit_1 - logit_0`` (binary),
the logit of the patient's predicted class (multiclass), or the risk (survival). Inputs and baselines:

* **vector modalities** (tables, MRI / text embeddings): the in-fold imputed, batch-corrected, standardised
  values *before* the PCA projection (the projection runs inside the attributed function), so a table's
  attributions are per named column (and per missingness indicator ``<col>__missing``); baseline 0 = the
  training-fold mean. Embedding modalities are reported as one row, the sum over their dimensions.
* **windowed vector modalities** (clinical notes stored as per-window rows with ``row_weights``, see
  :mod:`mmcli.features.text`), with :func:`window_integrated_gradients`: the input is each window's
  standardised embedding, pooled inside the attributed function with the coefficients the cohort's vector was
  pooled with (:func:`read_windows`); baseline 0 for every window. The path is the same as the pooled vector's
  (preprocessing is affine on observed values and the coefficients sum to 1), so the windows' attributions
  sum to that modality's ``(sum)`` row.
* **bag modalities** (WSI tiles): the raw instances; baseline = the training-fold instance mean (standardised
  0); summed over tiles and dimensions. ``attention_mil``: likewise (:func:`mil_integrated_gradients`).

Presence flags are held fixed (a missing modality gets no attribution), and dropout is off (eval mode). The
IG completeness axiom holds up to the integral's approximation: per patient, the attributions sum to the
output minus the baseline output (both written alongside, so that anyone can check).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmcli.heads.data import Cohort
from mmcli.heads.preprocess.vector import VectorPreprocessor
from mmcli.heads.windows import Windows

SUM = "(sum)"
COLUMNS = ["patient_id", "modality", "feature", "attribution", "output", "baseline_output"]
TILE_COLUMNS = ["patient_id", "item_id", "index", "attribution", "output", "baseline_output"]
WINDOW_COLUMNS = ["patient_id", "modality", "item_id", "window", "char_start", "char_end", "tokens", "attribution"]
MAX_IG_FLOATS = 1 << 25  # bag elements per captum forward (128 MB of float32) for attention_mil


def output_kind(head: Any) -> str:
    """``scalar`` (survival risk, a regression's standardised value), ``binary`` or ``multiclass``: which margin
    of the head's output is attributed."""
    if head.is_survival or head.is_regression:
        return "scalar"
    return "binary" if head.is_binary else "multiclass"


def _margin(out: torch.Tensor, task: str, target: torch.Tensor | None) -> torch.Tensor:
    if task == "scalar":
        return out[:, 0]
    if task == "binary":
        return out[:, 1] - out[:, 0]
    assert target is not None
    return out.gather(1, target[:, None])[:, 0]


def integrated_gradients(head: Any, X: Cohort, n_steps: int = 64, batch_size: int = 16) -> pd.DataFrame:
    """Rows ``patient_id, modality, feature, attribution, output, baseline_output`` for the patients of ``X``
    (a fitted :class:`~mmcli.heads.models.fusion_mlp.FusionMLPHead`; aligned to the model's modalities here)."""
    return _fusion_ig(head, X, {}, n_steps, batch_size)[0]


def window_integrated_gradients(head: Any, X: Cohort, windows: dict[str, dict[str, Windows]], n_steps: int = 64,
                                batch_size: int = 16) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`integrated_gradients` with the vector modalities in ``windows`` (``{modality: {patient_id:
    Windows}}``, from :func:`read_windows`) attributed per window: the usual rows, and rows
    :data:`WINDOW_COLUMNS` (one per window; per patient and modality they sum to its ``(sum)`` row).
    A patient of such a modality without windows is attributed as one pooled row (no window rows)."""
    specs = {s.name: s for s in head.spec_}
    usable = {m: w for m, w in windows.items() if m in specs and specs[m].kind == "vector"
              and specs[m].source != "table"}
    return _fusion_ig(head, X, usable, n_steps, batch_size)


def _fusion_ig(head: Any, X: Cohort, windows: dict[str, dict[str, Windows]], n_steps: int, batch_size: int
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    from captum.attr import IntegratedGradients

    X = head.align(X)
    specs = head.spec_
    M = len(specs)
    net = head.module_
    net.eval()
    rows: list[pd.DataFrame] = []
    wrows: list[pd.DataFrame] = []
    for start in range(0, len(X), batch_size):
        idx = np.arange(start, min(start + batch_size, len(X)))
        inputs = head._inputs(X, idx, None)
        present = inputs["present"]
        masks = [inputs.get(f"mask{k}") for k in range(M)]
        norms = [(inputs[f"mean{k}"], inputs[f"scale{k}"]) if f"mean{k}" in inputs else None for k in range(M)]
        attr_in, base_in, proj = [], [], []
        coefs: list[torch.Tensor | None] = [None] * M
        for k, spec in enumerate(specs):
            prep = head.preprocessors_[spec.name]
            if spec.kind == "bag":
                x = inputs[f"x{k}"].float()
                attr_in.append(x)
                base_in.append(norms[k][0].float().expand_as(x).contiguous())
                proj.append(None)
                continue
            assert isinstance(prep, VectorPreprocessor)
            m = X.modalities[spec.name]
            ok = m.present[idx]
            z = np.zeros((len(idx), len(prep.mean_)), dtype=np.float32)
            if ok.any():
                rows_ok = idx[ok]
                z[ok] = prep.standardised(m.vectors[rows_ok], [X.patients[i] for i in rows_ok], X.covariates)
            if spec.name in windows:
                zt, coefs[k] = _window_inputs(prep, z, ok, idx, X, windows[spec.name])
                attr_in.append(zt)
                base_in.append(torch.zeros_like(zt))
                proj.append(None if prep.components_ is None else
                            (torch.from_numpy(prep.pca_mean_).float(), torch.from_numpy(prep.components_).float()))
                continue
            zt = torch.from_numpy(z)
            attr_in.append(zt)
            base_in.append(torch.zeros_like(zt))
            proj.append(None if prep.components_ is None else
                        (torch.from_numpy(prep.pca_mean_).float(), torch.from_numpy(prep.components_).float()))

        def feats_of(xs: tuple[torch.Tensor, ...] | list[torch.Tensor], rep: int, proj: list = proj,
                     coefs: list = coefs) -> list[torch.Tensor]:
            feats = []
            for x, p, c in zip(xs, proj, coefs):
                if c is not None:  # windows (B, W, D) pooled with the cohort's coefficients
                    x = (x * c.repeat(rep, 1).unsqueeze(-1)).sum(1)
                feats.append(x if p is None else (x - p[0]) @ p[1].T)
            return feats

        def f(*xs: torch.Tensor, present: torch.Tensor = present, masks: list = masks, norms: list = norms,
              target: torch.Tensor | None = None) -> torch.Tensor:
            n = xs[0].shape[0]
            rep = n // present.shape[0]  # captum stacks the path steps along the batch
            ms = [None if mk is None else mk.repeat(rep, *[1] * (mk.dim() - 1)) for mk in masks]
            out = net(feats_of(xs, rep), ms, present.repeat(rep, 1), norms)[0]
            return _margin(out, output_kind(head), None if target is None else target.repeat(rep))

        with torch.no_grad():
            out = net(feats_of(attr_in, 1), masks, present, norms)[0]
            target = out.argmax(1) if output_kind(head) == "multiclass" else None
            y_out = _margin(out, output_kind(head), target).double().numpy()
            base = net(feats_of(base_in, 1), masks, present, norms)[0]
            y_base = _margin(base, output_kind(head), target).double().numpy()
        ig = IntegratedGradients(partial(f, target=target))
        attrs = ig.attribute(tuple(attr_in), baselines=tuple(base_in), n_steps=n_steps, method="gausslegendre",
                             internal_batch_size=None)
        for k, spec in enumerate(specs):
            a = attrs[k].detach().double().numpy()
            ok = X.modalities[spec.name].present[idx]
            pids = [X.patients[i] for i, o in zip(idx, ok) if o]
            if not pids:
                continue
            if spec.source == "table":
                prep = head.preprocessors_[spec.name]
                names = prep.feature_names(list(spec.columns or [str(j) for j in range(spec.dim)]))
                vals = a[ok]
                rows.append(pd.DataFrame({
                    "patient_id": np.repeat(pids, len(names)), "modality": spec.name,
                    "feature": np.tile(names, len(pids)), "attribution": vals.reshape(-1),
                    "output": np.repeat(y_out[ok], len(names)), "baseline_output": np.repeat(y_base[ok], len(names)),
                }))
            else:
                total = a.reshape(len(idx), -1).sum(1)[ok]
                rows.append(pd.DataFrame({"patient_id": pids, "modality": spec.name, "feature": SUM,
                                          "attribution": total, "output": y_out[ok], "baseline_output": y_base[ok]}))
                if spec.name in windows:
                    wrows += _window_rows(spec.name, a.sum(-1), idx, ok, X, windows[spec.name])
    order = {p: i for i, p in enumerate(X.patients)}
    return _ordered(rows, COLUMNS, order), _ordered(wrows, WINDOW_COLUMNS, order)


def _ordered(frames: list[pd.DataFrame], columns: list[str], order: dict[str, int]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=columns)
    df = pd.concat(frames, ignore_index=True)
    return df.iloc[np.argsort(df["patient_id"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)


def _window_inputs(prep: VectorPreprocessor, z: np.ndarray, ok: np.ndarray, idx: np.ndarray, X: Cohort,
                   windows: dict[str, Windows]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W_max, D) standardised windows and (B, W_max) pooling coefficients (0 on padding); a present patient
    without windows gets its pooled vector ``z`` as one window of coefficient 1, an absent one all zeros."""
    per = []
    for row, (i, present) in enumerate(zip(idx, ok)):
        w = windows.get(X.patients[i]) if present else None
        if w is None:
            per.append((z[row:row + 1], np.array([1.0 if present else 0.0])))
        else:
            zw = prep.standardised(w.features, [X.patients[i]] * len(w.features), X.covariates)
            per.append((zw.astype(np.float32), w.coef))
    width = max(len(c) for _, c in per)
    x = np.zeros((len(idx), width, z.shape[1]), dtype=np.float32)
    c = np.zeros((len(idx), width), dtype=np.float32)
    for row, (zw, cw) in enumerate(per):
        x[row, :len(cw)] = zw
        c[row, :len(cw)] = cw
    return torch.from_numpy(x), torch.from_numpy(c)


def _window_rows(modality: str, a: np.ndarray, idx: np.ndarray, ok: np.ndarray, X: Cohort,
                 windows: dict[str, Windows]) -> list[pd.DataFrame]:
    """One row per window of each present patient with windows; ``a`` (B, W_max) attributions."""
    out = []
    for row, (i, present) in enumerate(zip(idx, ok)):
        w = windows.get(X.patients[i]) if present else None
        if w is None:
            continue
        n = len(w.coef)
        out.append(pd.DataFrame({"patient_id": X.patients[i], "modality": modality, "item_id": w.item_ids,
                                 "window": w.index, "char_start": w.chars[:, 0], "char_end": w.chars[:, 1],
                                 "tokens": w.tokens, "attribution": a[row, :n]}))
    return out


def mil_integrated_gradients(head: Any, X: Cohort, n_steps: int = 64) -> pd.DataFrame:
    """Per-tile integrated gradients of a fitted bag head with the ``ABMIL`` forward
    (:class:`~mmcli.heads.models.attention_mil.AttentionMILHead`): rows :data:`TILE_COLUMNS`, each tile's
    attribution summed over its feature dimensions (raw instances; baseline = the training-fold instance mean,
    i.e. standardised 0; the padding mask held fixed), plus per patient ``output`` and ``baseline_output`` (by
    completeness a bag's tiles sum to ``output - baseline_output``, up to the integration error). One patient per
    captum call, its path steps batched so that no forward holds more than :data:`MAX_IG_FLOATS` bag elements."""
    from captum.attr import IntegratedGradients

    X = head.align(X)
    net = head.module_
    net.eval()
    name = head.spec_[0].name
    m = X.modalities[name]
    assert m.bags is not None and m.items is not None
    frames = []
    for i in range(len(X)):
        if not m.bags.length(i):
            continue
        inputs = head._inputs(X, np.array([i]), None)
        x, mask, mean, scale = (inputs[k] for k in ("x", "mask", "mean", "scale"))
        x = x.float()
        base = mean.float().expand_as(x).contiguous()

        def f(xs: torch.Tensor, target: torch.Tensor | None = None, mask: torch.Tensor = mask,
              mean: torch.Tensor = mean, scale: torch.Tensor = scale) -> torch.Tensor:
            rep = xs.shape[0]
            out = net(xs, mask.repeat(rep, 1), mean, scale)[0]
            return _margin(out, output_kind(head), None if target is None else target.repeat(rep))

        with torch.no_grad():
            out = net(torch.cat([x, base]), mask.repeat(2, 1), mean, scale)[0]
            target = out[:1].argmax(1) if output_kind(head) == "multiclass" else None
            both = _margin(out, output_kind(head), None if target is None else target.repeat(2)).double().numpy()
        steps = max(1, MAX_IG_FLOATS // max(1, x[0].numel()))
        a = IntegratedGradients(partial(f, target=target)).attribute(
            x, baselines=base, n_steps=n_steps, method="gausslegendre", internal_batch_size=min(n_steps, steps))
        per_tile = a[0].double().sum(dim=-1).numpy()[: m.bags.length(i)]
        item_ids = np.concatenate([np.full(n, iid, dtype=object) for iid, n in m.items[i]])
        index = np.concatenate([np.arange(n) for _, n in m.items[i]])
        frames.append(pd.DataFrame({"patient_id": X.patients[i], "item_id": item_ids, "index": index,
                                    "attribution": per_tile, "output": float(both[0]),
                                    "baseline_output": float(both[1])}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TILE_COLUMNS)
