"""Latent patient model behind ``mmcli synth`` (see :mod:`mmcli.stages.synth` for the user-facing story).

Every patient has a molecular subtype and four continuous latent *axes*:

- ``lum``: luminal / oestrogen-receptor programme,
- ``her2``: HER2 amplicon activity,
- ``prolif``: proliferation (grade, Ki-67, nuclear density),
- ``basal``: basal-like / immune programme (TNBC).

An axis value is the subtype mean plus patient-level heterogeneity. Each modality then observes
*some* axes through its own noise (:func:`observe`), so modalities carry partly independent
information and their fusion beats any single one.

Randomness: one :class:`numpy.random.SeedSequence` per (seed, patient index, stream) with an explicit
``spawn_key``, so a patient's content never depends on the order in which patients are generated,
and adding a slide to one patient does not change anything else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

SUBTYPES: tuple[str, ...] = ("LumA", "LumB", "HER2-enriched", "TNBC")
SUBTYPE_SHARES: tuple[float, ...] = (0.40, 0.20, 0.15, 0.25)
AXES: tuple[str, ...] = ("lum", "her2", "prolif", "basal")

# Subtype means on the axes (lum, her2, prolif, basal).
SUBTYPE_MEANS: dict[str, tuple[float, float, float, float]] = {
    "LumA": (1.0, -0.4, -0.9, -0.6),
    "LumB": (0.7, 0.2, 0.6, -0.5),
    "HER2-enriched": (-0.5, 1.3, 0.5, -0.2),
    "TNBC": (-1.1, -0.5, 1.0, 1.2),
}
LATENT_SD = 0.35

# Log-hazard of each subtype relative to LumA (survival model, see ``_survival``).
SUBTYPE_LOG_HAZARD: dict[str, float] = {"LumA": 0.0, "LumB": 0.55, "HER2-enriched": 0.7, "TNBC": 1.0}

# Missing modalities: share of the cohort (at least one patient each when the cohort has >= 8).
MISSING_SHARES: dict[str, float] = {"slides": 0.03, "mri": 0.10, "note": 0.05, "proteomics": 0.08}
T2_SHARE = 0.6  # share of patients with MRI that also have a T2 volume
# Noise of the IHC reads of the axes (ER, PR: luminal axis; HER2: her2 axis).
IHC_SD: dict[str, float] = {"er": 1.5, "pr": 1.6, "her2": 1.4}

# Stream numbers of the per-patient SeedSequences (spawn_key = (1, patient_index, stream)).
(STREAM_LATENT, STREAM_SLIDES, STREAM_MRI, STREAM_NOTE, STREAM_GENES, STREAM_PROTEOMICS,
 STREAM_CLINICAL) = range(7)


@dataclass(frozen=True)
class Patient:
    """One synthetic patient: ground truth, derived clinical facts and which modalities exist."""

    index: int
    patient_id: str
    subtype: str
    z: tuple[float, float, float, float]  # latent axes, order as AXES
    age: int  # years
    tumour_size_mm: float  # pathological size, mm
    nodes_examined: int
    positive_nodes: int
    grade: int  # Nottingham 1..3
    ki67: float  # % positive tumour nuclei
    er_pct: int  # % ER-positive nuclei (IHC)
    pr_pct: int  # % PR-positive nuclei (IHC)
    her2_ihc: int  # IHC score 0..3
    her2_fish_ratio: float  # HER2/CEP17 ratio (only reported for IHC 2+)
    histology: str
    laterality: str  # "left" | "right"
    n_slides: int
    has_mri: bool
    has_t2: bool
    has_note: bool
    has_proteomics: bool
    time_months: float
    event: int  # 1 = death/progression observed, 0 = censored

    @property
    def er(self) -> str:
        """ER status as reported (ASCO/CAP: >= 1 % positive nuclei)."""
        return "positive" if self.er_pct >= 1 else "negative"

    @property
    def pr(self) -> str:
        """PR status as reported (>= 1 % positive nuclei)."""
        return "positive" if self.pr_pct >= 1 else "negative"

    @property
    def her2(self) -> str:
        """Final HER2 status: IHC 3+, or IHC 2+ with FISH ratio >= 2."""
        if self.her2_ihc == 3 or (self.her2_ihc == 2 and self.her2_fish_ratio >= 2.0):
            return "positive"
        return "negative"

    def axis(self, name: str) -> float:
        """Latent value of axis ``name``."""
        return self.z[AXES.index(name)]


def patient_rng(seed: int, index: int, stream: int, *sub: int) -> np.random.Generator:
    """Generator for one patient and stream (and sub-stream, e.g. a slide), independent of cohort
    size and generation order."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index, stream, *sub)))


def cohort_rng(seed: int) -> np.random.Generator:
    """Generator for cohort-level draws (subtype quotas, which patients miss a modality)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))


def observe(rng: np.random.Generator, patient: Patient, noise_sd: dict[str, float]) -> dict[str, float]:
    """A modality's noisy view of the latent axes: ``z + N(0, sd)`` for each axis in ``noise_sd``."""
    return {a: patient.axis(a) + float(rng.normal(0.0, sd)) for a, sd in noise_sd.items()}


def _quota(n: int, shares: tuple[float, ...]) -> list[int]:
    """Largest-remainder split of ``n`` by ``shares``, every share at least 1 when ``n`` allows."""
    raw = [n * s for s in shares]
    counts = [max(1, math.floor(r)) if n >= len(shares) else math.floor(r) for r in raw]
    order = sorted(range(len(shares)), key=lambda k: raw[k] - math.floor(raw[k]), reverse=True)
    k = 0
    while sum(counts) < n:
        counts[order[k % len(order)]] += 1
        k += 1
    while sum(counts) > n:  # only when the minimum of 1 overshot: take from the largest
        counts[counts.index(max(counts))] -= 1
    return counts


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _histology(rng: np.random.Generator, subtype: str) -> str:
    table = {
        "LumA": (("invasive ductal carcinoma", 0.68), ("invasive lobular carcinoma", 0.25),
                 ("mucinous carcinoma", 0.07)),
        "LumB": (("invasive ductal carcinoma", 0.85), ("invasive lobular carcinoma", 0.10),
                 ("invasive micropapillary carcinoma", 0.05)),
        "HER2-enriched": (("invasive ductal carcinoma", 0.93), ("invasive micropapillary carcinoma", 0.07)),
        "TNBC": (("invasive ductal carcinoma", 0.80), ("carcinoma with medullary features", 0.12),
                 ("metaplastic carcinoma", 0.08)),
    }[subtype]
    names = [t[0] for t in table]
    return str(rng.choice(names, p=[t[1] for t in table]))


def _survival(rng: np.random.Generator, subtype: str, age: int, nodes: int, size_mm: float,
              prolif: float) -> tuple[float, int]:
    """Weibull event time (months) with administrative censoring and loss to follow-up."""
    lp = (SUBTYPE_LOG_HAZARD[subtype] + 0.025 * (age - 58) + 0.12 * min(nodes, 15)
          + 0.012 * (size_mm - 20) + 0.2 * prolif + rng.normal(0.0, 0.25))
    shape, scale = 1.15, 190.0
    t_event = scale * (-math.log(1.0 - rng.random()) / math.exp(lp)) ** (1.0 / shape)
    t_admin = rng.uniform(6.0, 150.0)  # staggered accrual, common study end
    t_loss = rng.exponential(400.0)
    t_cens = min(t_admin, t_loss)
    time = max(0.5, min(t_event, t_cens))
    return round(time, 1), int(t_event <= t_cens)


def _draw_patient(seed: int, index: int, patient_id: str, subtype: str) -> Patient:
    rng = patient_rng(seed, index, STREAM_LATENT)
    z = np.asarray(SUBTYPE_MEANS[subtype]) + rng.normal(0.0, LATENT_SD, size=4)
    lum, her2, prolif, basal = (float(v) for v in z)

    age_mean = {"LumA": 60, "LumB": 58, "HER2-enriched": 56, "TNBC": 54}[subtype]
    age = int(np.clip(round(rng.normal(age_mean, 11.0)), 26, 89))
    size = float(np.clip(math.exp(math.log(19.0) + 0.22 * prolif + 0.12 * basal + rng.normal(0, 0.38)), 4, 95))
    examined = int(3 + rng.poisson(11))
    p_node = _sigmoid(-0.35 + 0.045 * (size - 20) + 0.35 * prolif + rng.normal(0, 0.6))
    positive = 0
    if rng.random() < p_node:
        positive = int(min(examined, 1 + rng.poisson(math.exp(0.5 + 0.02 * (size - 20)))))
    g = prolif + rng.normal(0, 1.0)
    grade = 1 if g < -0.45 else (2 if g < 0.45 else 3)
    ki67 = float(np.clip(math.exp(math.log(16.0) + 0.6 * prolif + rng.normal(0, 0.6)), 1, 95))

    # IHC calls: noisy reads of the axes, so receptor status and subtype disagree now and then.
    er_score = lum + rng.normal(0, IHC_SD["er"])
    er_pct = int(np.clip(round(55 + 35 * er_score), 1, 100)) if er_score > -0.05 else 0
    pr_score = lum - 0.35 * prolif + rng.normal(0, IHC_SD["pr"])
    pr_pct = int(np.clip(round(40 + 40 * pr_score), 1, 100)) if pr_score > 0.1 else 0
    h = her2 + rng.normal(0, IHC_SD["her2"])
    her2_ihc = 3 if h > 0.95 else (2 if h > 0.45 else (1 if h > -0.2 else 0))
    fish = float(np.clip(math.exp(0.35 + 0.55 * (her2 + rng.normal(0, 0.4))), 0.6, 12.0))

    histology = _histology(rng, subtype)
    laterality = "left" if rng.random() < 0.5 else "right"
    n_slides = int(rng.choice([1, 2, 3], p=[0.55, 0.30, 0.15]))
    has_t2 = bool(rng.random() < T2_SHARE)
    time, event = _survival(rng, subtype, age, positive, size, prolif)
    return Patient(
        index=index, patient_id=patient_id, subtype=subtype, z=(lum, her2, prolif, basal), age=age,
        tumour_size_mm=round(size, 1), nodes_examined=examined, positive_nodes=positive, grade=grade,
        ki67=round(ki67, 1), er_pct=er_pct, pr_pct=pr_pct, her2_ihc=her2_ihc, her2_fish_ratio=round(fish, 2),
        histology=histology, laterality=laterality, n_slides=n_slides, has_mri=True, has_t2=has_t2,
        has_note=True, has_proteomics=True, time_months=time, event=event,
    )


def patient_ids(n: int) -> list[str]:
    """``BRCA-0001`` ... (wider numbers for cohorts above 9999)."""
    width = max(4, len(str(n)))
    return [f"BRCA-{i + 1:0{width}d}" for i in range(n)]


def draw_cohort(n: int, seed: int) -> list[Patient]:
    """Draw ``n`` patients: subtypes by exact quota, then each patient from its own generator."""
    crng = cohort_rng(seed)
    counts = _quota(n, SUBTYPE_SHARES)
    subtypes = np.repeat(np.arange(len(SUBTYPES)), counts)
    crng.shuffle(subtypes)
    ids = patient_ids(n)
    patients = [_draw_patient(seed, i, ids[i], SUBTYPES[int(subtypes[i])]) for i in range(n)]

    # Missing modalities by quota: realistic shares, and every kind present in small cohorts too.
    for kind, share in MISSING_SHARES.items():
        k = max(1, round(share * n)) if n >= 8 else round(share * n)
        for i in sorted(int(j) for j in crng.choice(n, size=k, replace=False)):
            p = patients[i]
            if kind == "slides":
                patients[i] = replace(p, n_slides=0)
            elif kind == "mri":
                patients[i] = replace(p, has_mri=False, has_t2=False)
            elif kind == "note":
                patients[i] = replace(p, has_note=False)
            else:
                patients[i] = replace(p, has_proteomics=False)
    return patients
