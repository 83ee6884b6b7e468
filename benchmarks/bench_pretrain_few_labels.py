"""Benchmark: few-label fusion_mlp with and without contrastive pretraining (test AUROC, CIs over replicates).

Cohort (fresh per replicate): ``--pool`` training patients plus ``--test`` held-out patients, two vector
modalities (``rna`` ``--features`` wide, ``prot`` 3/4 of that). Each modality is
``x = z A + u B + noise``: ``z`` (``--latent`` dims) is shared by both modalities and drives the label
(``y = 1[z0 + z1 > 0]``); ``u`` (``--private-dims``, scale ``--private-sd``) is a modality-specific programme
unrelated to the label and to the other modality; ``noise`` is per feature (``--noise``). This is the setting
cross-modal pretraining is for: the label-relevant signal is what the modalities share, and most of the variance
is not it. ``--private-dims 0 --noise 1.5 --features 64 --latent 8`` is the earlier, saturated cohort (each
feature nearly noise-free in the shared signal, so 100 labels already suffice).

Per replicate: :class:`~mmcli.heads.training.pretrain.ContrastivePretrainer` (symmetric InfoNCE) on all ``--pool``
patients' features, labels unused; then for each label fraction a random labelled subset of the pool trains
fusion_mlp four ways: ``scratch`` (defaults: in-fold PCA to 32 dims), ``scratch_nopca`` (no PCA),
``finetune`` (``init`` = the pretrained encoders, trained further) and ``frozen`` (``init`` +
``freeze_init``: the encoders fixed). Each is scored on the ``--test`` patients, which neither pretraining nor
training saw. Replicates are independent (new cohort, pretraining, labelled subset), so the mean AUROC and the
mean paired difference against ``scratch`` get Student-t 95% CIs over replicates.

    python benchmarks/bench_pretrain_few_labels.py --replicates 8
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

ARMS = ("scratch", "scratch_nopca", "finetune", "frozen")


def make_cohort(rng: np.random.Generator, n: int, features: int, latent: int, private_dims: int,
                private_sd: float, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rna (n, features), prot (n, 3/4 features), y (n,)) of the model in the module docstring."""
    z = rng.normal(size=(n, latent))
    y = ((z[:, 0] + z[:, 1]) > 0).astype(int)

    def view(d: int) -> np.ndarray:
        x = z @ rng.normal(size=(latent, d)) + noise * rng.normal(size=(n, d))
        if private_dims:
            x += private_sd * rng.normal(size=(n, private_dims)) @ rng.normal(size=(private_dims, d))
        return x.astype(np.float32)

    return view(features), view(max(2, 3 * features // 4)), y


def cohort_of(rna: np.ndarray, prot: np.ndarray, pids: list[str]):  # noqa: ANN201 (mmcli Cohort)
    from mmcli.heads.data import Cohort, ModalityData, ModalitySpec

    mods = {}
    for name, X in (("rna", rna), ("prot", prot)):
        spec = ModalitySpec(name, "vector", "store", f"synthetic-{name}", X.shape[1])
        mods[name] = ModalityData(spec, present=np.ones(len(X), bool), vectors=X)
    return Cohort(list(pids), mods, "bench")


def t_interval(x: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) Student-t 95% interval of the mean of independent replicates."""
    from scipy.stats import t

    a = np.asarray(x, dtype=np.float64)
    m = float(a.mean())
    if len(a) < 2:
        return m, float("nan"), float("nan")
    half = float(t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))
    return m, m - half, m + half


def main() -> None:
    from mmcli.heads import create_head
    from mmcli.heads.evaluation.stats import auroc
    from mmcli.heads.training.pretrain import ContrastivePretrainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=2000, help="pretraining / training patients per replicate")
    ap.add_argument("--test", type=int, default=1000, help="held-out test patients per replicate")
    ap.add_argument("--fractions", default="0.1,0.25", help="labelled shares of the pool")
    ap.add_argument("--features", type=int, default=200)
    ap.add_argument("--latent", type=int, default=4)
    ap.add_argument("--private-dims", type=int, default=16)
    ap.add_argument("--private-sd", type=float, default=2.0)
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=40, help="fusion_mlp epochs (its default)")
    ap.add_argument("--replicates", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    fractions = [float(f) for f in a.fractions.split(",")]
    auc: dict[float, dict[str, list[float]]] = {f: {arm: [] for arm in ARMS} for f in fractions}
    losses = []
    t0 = time.perf_counter()
    for r in range(a.replicates):
        rng = np.random.default_rng([a.seed, r])
        n = a.pool + a.test
        rna, prot, y = make_cohort(rng, n, a.features, a.latent, a.private_dims, a.private_sd, a.noise)
        pids = [f"P{i:05d}" for i in range(n)]
        pool, test = np.arange(a.pool), np.arange(a.pool, n)
        X_test = cohort_of(rna[test], prot[test], [pids[i] for i in test])
        pre = ContrastivePretrainer(hidden=32, epochs=a.pretrain_epochs, seed=a.seed + r).fit(
            cohort_of(rna[pool], prot[pool], [pids[i] for i in pool]))  # features only: y is not passed
        losses.append((pre.losses_[0], pre.losses_[-1]))
        with tempfile.TemporaryDirectory() as tmp:
            pre.save(tmp)
            arms = {"scratch": {}, "scratch_nopca": {"n_components": None}, "finetune": {"init": tmp},
                    "frozen": {"init": tmp, "freeze_init": True}}
            for frac in fractions:
                lab = np.sort(rng.choice(pool, int(round(frac * a.pool)), replace=False))
                X_lab = cohort_of(rna[lab], prot[lab], [pids[i] for i in lab])
                for arm, params in arms.items():
                    head = create_head("fusion_mlp", task="binary", n_classes=2, seed=a.seed + r, epochs=a.epochs,
                                       **params).fit(X_lab, y[lab])
                    auc[frac][arm].append(auroc(y[test], head.predict(X_test)[:, 1]))
        print(f"replicate {r + 1}/{a.replicates}: InfoNCE {losses[-1][0]:.2f} -> {losses[-1][1]:.2f}; " + "; ".join(
            f"{f:.0%}: " + " ".join(f"{arm} {auc[f][arm][-1]:.3f}" for arm in ARMS) for f in fractions), flush=True)
    out: dict[str, dict] = {}
    print(f"\n{a.replicates} replicates, {a.pool} pool / {a.test} test patients, {time.perf_counter() - t0:.0f}s")
    print("labels | arm | test AUROC mean [95% CI] | minus scratch [95% CI] | replicates better")
    for frac in fractions:
        rows = out[str(frac)] = {"n_labelled": int(round(frac * a.pool))}
        for arm in ARMS:
            m, lo, hi = t_interval(auc[frac][arm])
            d = np.asarray(auc[frac][arm]) - np.asarray(auc[frac]["scratch"])
            dm, dlo, dhi = t_interval(list(d))
            rows[arm] = {"auroc": m, "ci": [lo, hi], "diff": dm, "diff_ci": [dlo, dhi],
                         "better": int((d > 0).sum()), "per_replicate": auc[frac][arm]}
            diff = "" if arm == "scratch" else f"{dm:+.3f} [{dlo:+.3f}, {dhi:+.3f}] | {int((d > 0).sum())}/{len(d)}"
            print(f"{frac:.0%} ({rows['n_labelled']}) | {arm} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {diff}")
    print(json.dumps({"args": vars(a), "infonce_first_last": losses, "results": out}, indent=1))


if __name__ == "__main__":
    main()
