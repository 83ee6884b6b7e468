"""Integrated gradients (captum) for ``fusion_mlp``: per input feature of tables, summed per embedding modality.

What is attributed, per patient, is the network's output margin: the log-odds ``logit_1 - logit_0`` (binary),
the logit of the patient's predicted class (multiclass), or the risk (survival). Inputs and baselines:

* **vector modalities** (tables, MRI / text embeddings): the in-fold imputed, batch-corrected, standardised
  values *before* the PCA projection (the projection runs inside the attributed function), so a table's
  attributions are per named column (and per missingness indicator ``<col>__missing``); baseline 0 = the
  training-fold mean. Embedding modalities are reported as one row, the sum over their dimensions.
* **bag modalities** (WSI tiles): the raw instances; baseline = the training-fold instance mean (standardised
  0); summed over tiles and dimensions.

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
from mmcli.heads.preprocess import VectorPreprocessor

SUM = "(sum)"


def _margin(out: torch.Tensor, task: str, target: torch.Tensor | None) -> torch.Tensor:
    if task == "survival":
        return out[:, 0]
    if task == "binary":
        return out[:, 1] - out[:, 0]
    assert target is not None
    return out.gather(1, target[:, None])[:, 0]


def integrated_gradients(head: Any, X: Cohort, n_steps: int = 64, batch_size: int = 16) -> pd.DataFrame:
    """Rows ``patient_id, modality, feature, attribution, output, baseline_output`` for the patients of ``X``
    (a fitted :class:`~mmcli.heads.fusion_mlp.FusionMLPHead`; aligned to the model's modalities here)."""
    from captum.attr import IntegratedGradients

    X = head.align(X)
    specs = head.spec_
    M = len(specs)
    net = head.module_
    net.eval()
    rows: list[pd.DataFrame] = []
    for start in range(0, len(X), batch_size):
        idx = np.arange(start, min(start + batch_size, len(X)))
        inputs = head._inputs(X, idx, None)
        present = inputs["present"]
        masks = [inputs.get(f"mask{k}") for k in range(M)]
        norms = [(inputs[f"mean{k}"], inputs[f"scale{k}"]) if f"mean{k}" in inputs else None for k in range(M)]
        attr_in, base_in, proj = [], [], []
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
            zt = torch.from_numpy(z)
            attr_in.append(zt)
            base_in.append(torch.zeros_like(zt))
            proj.append(None if prep.components_ is None else
                        (torch.from_numpy(prep.pca_mean_).float(), torch.from_numpy(prep.components_).float()))

        def f(*xs: torch.Tensor, present: torch.Tensor = present, masks: list = masks, norms: list = norms,
              proj: list = proj, target: torch.Tensor | None = None) -> torch.Tensor:
            n = xs[0].shape[0]
            rep = n // present.shape[0]  # captum stacks the path steps along the batch
            feats = []
            for x, p in zip(xs, proj):
                feats.append(x if p is None else (x - p[0]) @ p[1].T)
            ms = [None if mk is None else mk.repeat(rep, *[1] * (mk.dim() - 1)) for mk in masks]
            out = net(feats, ms, present.repeat(rep, 1), norms)[0]
            return _margin(out, head.task, None if target is None else target.repeat(rep))

        with torch.no_grad():
            out = net([x if p is None else (x - p[0]) @ p[1].T for x, p in zip(attr_in, proj)], masks, present,
                      norms)[0]
            target = out.argmax(1) if head.task == "multiclass" else None
            y_out = _margin(out, head.task, target).double().numpy()
            base = net([b if p is None else (b - p[0]) @ p[1].T for b, p in zip(base_in, proj)], masks, present,
                       norms)[0]
            y_base = _margin(base, head.task, target).double().numpy()
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
    if not rows:
        return pd.DataFrame(columns=["patient_id", "modality", "feature", "attribution", "output", "baseline_output"])
    df = pd.concat(rows, ignore_index=True)
    order = {p: i for i, p in enumerate(X.patients)}
    return df.iloc[np.argsort(df["patient_id"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
