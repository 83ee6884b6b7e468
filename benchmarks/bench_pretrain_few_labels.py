"""Benchmark: few-label fusion_mlp with and without contrastive pretraining (AUROC, paired bootstrap 95% CIs).

The cohort: ``--patients`` patients with two vector modalities (``rna`` 64-d, ``prot`` 48-d), each a noisy
linear view of a shared 8-d latent; the label is a threshold of two latent directions. Pretraining
(:class:`~mmcli.heads.pretrain.ContrastivePretrainer`, symmetric InfoNCE) uses every patient's features and
no label (it is transductive for the features, as self-supervised pretraining on an unlabelled cohort is;
labels never enter it). Then, for each label fraction (``--fractions``, default 10% and 25%), a random
labelled subset is cross-validated (3-fold, out-of-fold predictions) with fusion_mlp from scratch and with
``init`` = the pretrained encoders. Reported: out-of-fold AUROC of each and the paired bootstrap difference
(pretrained - scratch) with its 95% CI and p.

    python benchmarks/bench_pretrain_few_labels.py --patients 1000
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np


def main() -> None:
    from cohorts import binary_target, table_cohort  # tests/heads helpers

    from mmcli.heads.cv import cross_validate
    from mmcli.heads.data import ModalityData, ModalitySpec
    from mmcli.heads.pretrain import ContrastivePretrainer
    from mmcli.heads.stats import auroc, auroc_bootstrap

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--fractions", default="0.1,0.25")
    ap.add_argument("--noise", type=float, default=1.5)
    ap.add_argument("--pretrain-epochs", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    n = a.patients
    z = rng.normal(size=(n, 8))
    y = ((z[:, 0] + z[:, 1]) > 0).astype(int)
    rna = z @ rng.normal(size=(8, 64)) + a.noise * rng.normal(size=(n, 64))
    prot = z @ rng.normal(size=(8, 48)) + a.noise * rng.normal(size=(n, 48))
    pids = [f"P{i:05d}" for i in range(n)]
    cohort = table_cohort(rna, pids, name="rna")
    spec = ModalitySpec("prot", "vector", "store", "synthetic-prot", 48)
    cohort.modalities["prot"] = ModalityData(spec, present=np.ones(n, bool), vectors=prot.astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        pre = ContrastivePretrainer(hidden=32, epochs=a.pretrain_epochs, seed=a.seed).fit(cohort)
        pre.save(tmp)
        print(f"pretraining InfoNCE {pre.losses_[0]:.3f} -> {pre.losses_[-1]:.3f}")
        out = {}
        for frac in (float(f) for f in a.fractions.split(",")):
            idx = np.sort(rng.choice(n, int(round(frac * n)), replace=False))
            sub, target = cohort.subset(idx), binary_target(y[idx], [pids[i] for i in idx])
            probs = {}
            for label, extra in (("scratch", {}), ("pretrained", {"init": tmp})):
                res = cross_validate("fusion_mlp", sub, target, folds=3, seed=a.seed,
                                     params={"epochs": a.epochs, **extra}, explain=False)
                p = np.zeros(len(idx))
                for r in res:
                    p[r.test_idx] = r.pred[:, 1]
                probs[label] = p
            b = auroc_bootstrap(target.y, probs["pretrained"], probs["scratch"], n_boot=a.n_boot, seed=a.seed)
            out[str(frac)] = {"n_labelled": len(idx), "auroc_scratch": auroc(target.y, probs["scratch"]),
                              "auroc_pretrained": auroc(target.y, probs["pretrained"]), "difference": b.difference,
                              "ci_low": b.ci_low, "ci_high": b.ci_high, "p": b.p_value}
            r = out[str(frac)]
            print(f"{frac:.0%} labels ({len(idx)}): AUROC scratch {r['auroc_scratch']:.3f}  pretrained "
                  f"{r['auroc_pretrained']:.3f}  diff {b.difference:+.3f} [{b.ci_low:+.3f}, {b.ci_high:+.3f}] "
                  f"p={b.p_value:.3f}")
    print(json.dumps({"args": vars(a), "results": out}, indent=2))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "heads"))
    main()
