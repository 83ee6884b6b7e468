"""Clinical / pathology notes of ``mmcli synth``: template sentences with varied wording.

A note states histology, size, grade, nodes and the receptor panel (ER, PR, HER2) in one of several
styles; some results are still pending or equivocal, some notes mention Ki-67. The receptor calls
are the patient's IHC calls, which disagree with the molecular subtype now and then, so notes are
informative but imperfect.
"""
from __future__ import annotations

import numpy as np

from mmcli.stages.synth.cohort import STREAM_NOTE, Patient, patient_rng

PENDING_RATE = 0.2  # per receptor: result not yet available when the note was written
KI67_RATE = 0.3  # share of notes that mention Ki-67

_INTENSITY = ("weak", "moderate", "strong")


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _er_text(rng: np.random.Generator, p: Patient, pending: bool) -> str:
    if pending:
        return _pick(rng, ("ER: pending", "estrogen receptor studies are pending",
                           "ER to follow in an addendum", "oestrogen receptor result awaited"))
    if p.er == "positive":
        inten = _INTENSITY[min(2, p.er_pct // 34)]
        return _pick(rng, (f"ER: positive ({p.er_pct}%, {inten} intensity)",
                           f"estrogen receptor positive in {p.er_pct}% of tumour nuclei",
                           "ER+", f"ER POSITIVE ({p.er_pct}%)",
                           f"oestrogen receptor expressed ({inten}, {p.er_pct}%)"))
    return _pick(rng, ("ER: negative (<1%)", "estrogen receptor not detected", "ER-",
                       "ER negative (0%)", "no oestrogen receptor expression"))


def _pr_text(rng: np.random.Generator, p: Patient, pending: bool) -> str:
    if pending:
        return _pick(rng, ("PR: pending", "progesterone receptor pending", "PR to follow"))
    if p.pr == "positive":
        word = "weakly positive" if p.pr_pct < 10 else "positive"
        return _pick(rng, (f"PR: {word} ({p.pr_pct}%)", f"progesterone receptor {word} in {p.pr_pct}%",
                           "PR+", f"PgR {word}"))
    return _pick(rng, ("PR: negative", "progesterone receptor not detected", "PR-", "PgR negative (0%)"))


def _her2_text(rng: np.random.Generator, p: Patient, pending: bool) -> str:
    if pending:
        return _pick(rng, ("HER2: pending", "HER2 testing sent out, result to follow",
                           "HER2/neu status pending"))
    if p.her2_ihc == 3:
        return _pick(rng, ("HER2: positive (3+)", "HER2/neu overexpressed (IHC 3+)", "HER2+ (IHC 3+)",
                           "HER2 positive by immunohistochemistry (score 3+)"))
    if p.her2_ihc == 2:
        if rng.random() < 0.4:  # reflex ISH not back yet
            return _pick(rng, ("HER2: equivocal (2+), reflex ISH pending",
                               "HER2 IHC 2+ (equivocal); FISH to follow"))
        if p.her2 == "positive":
            return _pick(rng, (f"HER2 IHC 2+, amplified by FISH (ratio {p.her2_fish_ratio:.1f})",
                               f"HER2 equivocal by IHC (2+) but FISH amplified, HER2/CEP17 {p.her2_fish_ratio:.1f}"))
        return _pick(rng, (f"HER2 IHC 2+, not amplified by FISH (ratio {p.her2_fish_ratio:.1f})",
                           "HER2 equivocal (2+) with negative ISH"))
    score = "0" if p.her2_ihc == 0 else "1+"
    return _pick(rng, (f"HER2: negative ({score})", f"HER2/neu {score}, negative", "HER2-",
                       f"HER2 not overexpressed (IHC {score})"))


def render_note(seed: int, p: Patient) -> str:
    """One note for patient ``p`` (a few sentences, newline-terminated)."""
    rng = patient_rng(seed, p.index, STREAM_NOTE)
    header = _pick(rng, ("SURGICAL PATHOLOGY REPORT", "Pathology report - final diagnosis",
                         "Breast multidisciplinary clinic note", "Histopathology summary"))
    procedure = _pick(rng, ("core needle biopsy", "lumpectomy", "wide local excision", "mastectomy"))
    size_cm = p.tumour_size_mm / 10.0
    lines = [header, ""]
    lines.append(_pick(rng, (
        f"Specimen: {p.laterality} breast, {procedure}.",
        f"{p.laterality.capitalize()} breast {procedure} received in formalin.",
        f"Patient aged {p.age}, {p.laterality} breast mass, {procedure} performed.",
    )))
    lines.append(_pick(rng, (
        f"Diagnosis: {p.histology}, Nottingham grade {p.grade}.",
        f"Sections show {p.histology} (grade {p.grade} of 3).",
        f"Final diagnosis: {p.histology}; histological grade {p.grade}.",
    )))
    lines.append(_pick(rng, (
        f"Tumour size {size_cm:.1f} cm in greatest dimension.",
        f"The invasive tumour measures {p.tumour_size_mm:.0f} mm.",
        f"Size: {p.tumour_size_mm:.0f} mm.",
    )))
    if p.positive_nodes == 0:
        lines.append(_pick(rng, (
            f"Lymph nodes negative for metastasis (0/{p.nodes_examined}).",
            f"No nodal metastases identified in {p.nodes_examined} nodes examined.",
            "Sentinel node negative.",
        )))
    else:
        lines.append(_pick(rng, (
            f"Metastatic carcinoma in {p.positive_nodes} of {p.nodes_examined} lymph nodes.",
            f"Lymph nodes: {p.positive_nodes}/{p.nodes_examined} positive.",
            f"Nodal status positive ({p.positive_nodes} nodes involved).",
        )))
    pend = rng.random(3) < PENDING_RATE
    er, pr, her2 = _er_text(rng, p, pend[0]), _pr_text(rng, p, pend[1]), _her2_text(rng, p, pend[2])
    style = int(rng.integers(3))
    if style == 0:
        lines.append(f"Receptors: {er}; {pr}; {her2}.")
    elif style == 1:
        lines.extend(["Biomarkers:", f"  - {er}", f"  - {pr}", f"  - {her2}"])
    else:
        lines.append(f"Immunohistochemistry shows {er}, {pr} and {her2}.")
    if not pend.any() and p.er == "negative" and p.pr == "negative" and p.her2 == "negative" \
            and p.her2_ihc < 2 and rng.random() < 0.5:
        lines.append("Triple-negative phenotype.")
    if rng.random() < KI67_RATE:
        lines.append(_pick(rng, (f"Ki-67 proliferation index approximately {p.ki67:.0f}%.",
                                 f"Ki67: {p.ki67:.0f}%.", f"MIB-1 labelling index {p.ki67:.0f}%.")))
    if rng.random() < 0.3:
        lines.append(_pick(rng, ("Case discussed at the breast MDT.", "Margins clear.",
                                 "Lymphovascular invasion present." if p.positive_nodes else
                                 "No lymphovascular invasion seen.")))
    return "\n".join(lines) + "\n"
