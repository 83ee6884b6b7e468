"""Run dirs written by hand, as ``mmcli fit`` writes them (config.json, metrics.json, predictions.csv and the
optional artefacts), with realistic out-of-fold predictions made with numpy. Metric values are computed with
scikit-learn / lifelines on the written predictions, so a report or comparison can be checked against them.
``from helpers.fake_runs import ...``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score


def _metric(values: Sequence[float]) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "ci_low": float(v.min()), "ci_high": float(v.max()), "per_fold": v.tolist()}


def _write(path: Path, config: dict, metrics: dict, pred: pd.DataFrame) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pred.to_csv(path / "predictions.csv", index=False)
    return path


def patient_ids(n: int) -> list[str]:
    return [f"P{i:04d}" for i in range(n)]


def classification_labels(n: int, classes: Sequence[str], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(classes), n)


def classification_run(
    path: Path, *, classes: Sequence[str] = ("neg", "pos"), n: int = 120, seed: int = 0, signal: float = 1.5,
    y: np.ndarray | None = None, ids: Sequence[str] | None = None, head: str = "xgboost",
    modalities: Sequence[str] = ("wsi", "omics"), target: str = "subtype", folds: int = 5, store: str | None = None,
) -> Path:
    """A classification run dir; ``signal`` scales how well the probabilities separate the classes."""
    rng = np.random.default_rng(seed + 1000)
    ids = list(ids) if ids is not None else patient_ids(n)
    y = np.asarray(y) if y is not None else classification_labels(len(ids), classes)
    k = len(classes)
    logits = signal * np.eye(k)[y] + rng.normal(0, 1, (len(ids), k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    fold = np.arange(len(ids)) % folds
    pred = pd.DataFrame({"patient_id": ids, "fold": fold, "y_true": np.asarray(classes)[y],
                         "y_pred": np.asarray(classes)[probs.argmax(1)]})
    for j, c in enumerate(classes):
        pred[f"prob_{c}"] = probs[:, j]
    per = {"auroc": [], "f1_macro": [], "balanced_accuracy": []}
    for f in range(folds):
        m = fold == f
        yp = probs[m].argmax(1)
        per["auroc"].append(roc_auc_score(y[m], probs[m][:, 1]) if k == 2 else
                            roc_auc_score(y[m], probs[m], multi_class="ovr", labels=list(range(k))))
        per["f1_macro"].append(f1_score(y[m], yp, average="macro"))
        per["balanced_accuracy"].append(balanced_accuracy_score(y[m], yp))
    metrics = {"head": head, "task": "classification", "modalities": list(modalities), "folds": folds,
               "n_patients": len(ids), "metrics": {k_: _metric(v) for k_, v in per.items()},
               "encoder_ids": {m: f"enc-{m}" for m in modalities}, "seed": 0, "created": "2026-01-01T00:00:00"}
    config = {"head": head, "params": {"n_estimators": 50}, "task": "classification", "target": target,
              "classes": list(classes), "modalities": list(modalities),
              "encoder_ids": metrics["encoder_ids"], "folds": folds, "seed": 0, "store": store,
              "labels": "labels.csv", "features_sha256": "ab" * 32, "mmcli_version": "0.1.0",
              "created": "2026-01-01T00:00:00"}
    return _write(path, config, metrics, pred)


def survival_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, time in months, event) with higher x = shorter survival; ~65 % events."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, rng.exponential(30 * np.exp(-x)) + 0.5, (rng.random(n) < 0.65).astype(int)


def survival_run(
    path: Path, *, n: int = 120, seed: int = 0, noise: float = 0.5, ids: Sequence[str] | None = None,
    head: str = "cox", modalities: Sequence[str] = ("omics",), folds: int = 5, time_col: str = "os_months",
    event_col: str = "os_event", data: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> Path:
    """A survival run dir; risk = x + noise, so a smaller ``noise`` gives a higher c-index."""
    ids = list(ids) if ids is not None else patient_ids(n)
    x, time, event = data if data is not None else survival_data(len(ids))
    risk = x + np.random.default_rng(seed + 2000).normal(0, noise, len(ids))
    fold = np.arange(len(ids)) % folds
    pred = pd.DataFrame({"patient_id": ids, "fold": fold, "time": time, "event": event, "risk": risk})
    cs = [concordance_index(time[fold == f], -risk[fold == f], event[fold == f]) for f in range(folds)]
    metrics = {"head": head, "task": "survival", "modalities": list(modalities), "folds": folds,
               "n_patients": len(ids), "metrics": {"c_index": _metric(cs), "ibs": _metric([0.18] * folds)},
               "encoder_ids": {}, "seed": 0, "created": "2026-01-01T00:00:00"}
    config = {"head": head, "params": {"penalizer": 0.1}, "task": "survival", "time": time_col,
              "event": event_col, "modalities": list(modalities), "encoder_ids": {}, "folds": folds, "seed": 0,
              "store": None, "labels": "labels.csv", "features_sha256": "cd" * 32, "mmcli_version": "0.1.0",
              "created": "2026-01-01T00:00:00"}
    return _write(path, config, metrics, pred)


def write_slide(path: Path, width: int = 1024, height: int = 768, seed: int = 0) -> Path:
    """A tiled RGB TIFF with 0.5 um/px resolution tags that OpenSlide opens (vendor generic-tiff)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 235, np.uint8)
    img[height // 4: 3 * height // 4, width // 5: 4 * width // 5] = (200, 120, 170)  # "tissue"
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), photometric="rgb", compression="zlib",
                 resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    return path
