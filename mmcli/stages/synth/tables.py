"""Tabular modalities of ``mmcli synth``: gene expression, proteomics (RPPA-like) and clinical variables.

Gene and protein parameters (baselines, loadings) are fixed constants of the simulator, not of the
seed: the biology stays the same, only the patients change.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from mmcli.stages.synth.cohort import (
    STREAM_CLINICAL,
    STREAM_GENES,
    STREAM_PROTEOMICS,
    Patient,
    observe,
    patient_rng,
)

# PAM50 genes grouped by the latent axis that drives them.
GENE_GROUPS: dict[str, tuple[str, ...]] = {
    "lum": ("ESR1", "PGR", "FOXA1", "BCL2", "NAT1", "MAPT", "MLPH", "SLC39A6", "BLVRA", "CXXC5",
            "GPR160", "BAG1", "MDM2", "MMP11"),
    "her2": ("ERBB2", "GRB7", "FGFR4", "TMEM45B"),
    "prolif": ("MKI67", "BIRC5", "CCNB1", "CDC20", "CEP55", "KIF2C", "MELK", "MYBL2", "NDC80", "NUF2",
               "PTTG1", "RRM2", "TYMS", "UBE2C", "UBE2T", "ANLN", "CENPF", "EXO1", "CDC6", "CCNE1", "ORC6"),
    "basal": ("KRT5", "KRT14", "KRT17", "FOXC1", "SFRP1", "EGFR", "CDH3", "ACTR3B", "MIA", "PHGDH", "MYC"),
}
GENES: tuple[str, ...] = tuple(g for group in GENE_GROUPS.values() for g in group)

# Noise of the genes' view of each axis (sample-level: does not average out over genes).
GENE_VIEW_SD: dict[str, float] = {"lum": 1.2, "her2": 2.0, "prolif": 1.1, "basal": 1.8}
GENE_NOISE_SD = 0.9  # per gene and sample, log2 units

# Proteins (RPPA antibody names) with (driving axis, loading, detection limit quantile).
PROTEINS: dict[str, tuple[str, float, float]] = {
    "ER-alpha": ("lum", 1.2, 0.10), "PR": ("lum", 1.0, 0.25), "AR": ("lum", 0.6, 0.20),
    "GATA3": ("lum", 0.9, 0.05), "Bcl-2": ("lum", 0.7, 0.10), "INPP4B": ("lum", 0.5, 0.30),
    "Cyclin_D1": ("lum", 0.4, 0.10),
    "HER2": ("her2", 1.3, 0.10), "HER2_pY1248": ("her2", 1.1, 0.35), "GRB7": ("her2", 0.6, 0.30),
    "Cyclin_B1": ("prolif", 0.8, 0.10), "Cyclin_E1": ("prolif", 0.6, 0.20), "FOXM1": ("prolif", 0.7, 0.20),
    "PCNA": ("prolif", 0.5, 0.02), "CDK1": ("prolif", 0.6, 0.15), "Rb_pS807_S811": ("prolif", 0.4, 0.10),
    "EGFR": ("basal", 0.8, 0.30), "Caveolin-1": ("basal", 0.6, 0.15), "Keratin5": ("basal", 0.9, 0.40),
    "p53": ("basal", 0.5, 0.20), "ASNS": ("basal", 0.4, 0.25),
    "Claudin-7": ("lum", 0.3, 0.10), "E-Cadherin": ("lum", 0.2, 0.05), "beta-Catenin": ("lum", 0.1, 0.02),
    "AKT": ("her2", 0.1, 0.02), "AKT_pS473": ("her2", 0.3, 0.15), "mTOR": ("prolif", 0.1, 0.05),
    "S6_pS235_S236": ("prolif", 0.3, 0.10), "PTEN": ("basal", -0.4, 0.10), "STAT3_pY705": ("basal", 0.2, 0.30),
}
PROTEIN_VIEW_SD: dict[str, float] = {"lum": 1.3, "her2": 0.9, "prolif": 1.8, "basal": 1.8}
PROTEIN_NOISE_SD = 0.6
MCAR_RATE = 0.03  # missing at random per value (failed spots)
MNAR_RATE = 0.55  # chance that a value below the detection limit is missing

CLINICAL_COLUMNS: tuple[str, ...] = (
    "age", "tumour_size_mm", "positive_nodes", "er_status", "pr_status", "her2_status",
)
RECEPTOR_MISSING_RATE = 0.08  # share of unrecorded receptor results in the clinical table


def _constants() -> tuple[dict[str, float], dict[str, float]]:
    """Fixed per-gene baselines and loadings (a constant generator: same biology for every seed)."""
    rng = np.random.default_rng(20_240_501)
    base = {g: float(rng.uniform(5.0, 11.0)) for g in GENES}
    load = {g: float(rng.uniform(0.6, 1.2)) for g in GENES}
    return base, load


_GENE_BASE, _GENE_LOAD = _constants()


def _detection_limits() -> dict[str, float]:
    """Per-protein detection limit: the ``detect_q`` quantile of its (approximate) population spread."""
    limits = {}
    for name, (axis, loading, detect_q) in PROTEINS.items():
        sd = np.sqrt(loading**2 * (1.0 + PROTEIN_VIEW_SD[axis] ** 2) + PROTEIN_NOISE_SD**2)
        limits[name] = float(sd * norm.ppf(detect_q))
    return limits


_DETECTION_LIMIT = _detection_limits()


def gene_row(seed: int, patient: Patient) -> list[float]:
    """log2 expression of :data:`GENES` for one patient."""
    rng = patient_rng(seed, patient.index, STREAM_GENES)
    view = observe(rng, patient, GENE_VIEW_SD)
    depth = rng.normal(0.0, 0.25)  # library-size effect shared by all genes of the sample
    row = []
    for axis, genes in GENE_GROUPS.items():
        for g in genes:
            row.append(_GENE_BASE[g] + depth + _GENE_LOAD[g] * view[axis] + rng.normal(0.0, GENE_NOISE_SD))
    return row


def protein_row(seed: int, patient: Patient) -> list[float]:
    """RPPA-like log2 levels of :data:`PROTEINS`, NaN where the spot failed or fell below detection."""
    rng = patient_rng(seed, patient.index, STREAM_PROTEOMICS)
    view = observe(rng, patient, PROTEIN_VIEW_SD)
    row = []
    for name, (axis, loading, _) in PROTEINS.items():
        value = loading * view[axis] + rng.normal(0.0, PROTEIN_NOISE_SD)
        missing = rng.random() < MCAR_RATE or (value < _DETECTION_LIMIT[name] and rng.random() < MNAR_RATE)
        row.append(float("nan") if missing else float(value))
    return row


def clinical_row(seed: int, patient: Patient) -> list[object]:
    """Values of :data:`CLINICAL_COLUMNS`; receptor results as text, ``None`` when not recorded."""
    rng = patient_rng(seed, patient.index, STREAM_CLINICAL)
    receptors: list[object] = []
    for status in (patient.er, patient.pr, patient.her2):
        receptors.append(None if rng.random() < RECEPTOR_MISSING_RATE else status)
    return [patient.age, patient.tumour_size_mm, patient.positive_nodes, *receptors]

