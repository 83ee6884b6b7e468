"""Refusing per-patient covariates that carry the outcome (``--batch-keep``, ``--batch-column``).

Batch correction reads its covariates for the **test** patients too: ComBat's protected columns enter each
patient's correction as ``design @ beta`` and the batch column picks its location/scale
(:mod:`mmcli.heads.preprocess.combat`). A protected column that is the label, or a recoding of it, corrects
every test patient with its own label: in an audit, changing only the test patients' copy of the label moved
their probabilities by up to 0.19. Protecting the diagnosis is common neuroCombat practice, so it is refused,
by name (:func:`outcome_named`) and by content (:func:`outcome_copies`), before the run folder is touched.

What the content check detects, over the labelled patients that have a value (:func:`leak_reason`):

* classification: a column that takes one value per class (a recoding of the target, or of a grouping of its
  classes); a column each of whose values holds patients of one class only (the target is a function of it,
  e.g. a finer diagnosis); a numeric column that separates a binary target perfectly (a threshold of it);
* survival: a numeric column that is a monotone function of the time (Spearman ``|rho| = 1``), and the three
  checks above against the event indicator.

Each pattern is refused only when it would arise by chance, for a column unrelated to the outcome with the
same value and class frequencies, with probability below :data:`CHANCE` (so a 2-valued covariate in a
10-patient cohort that happens to line up with the label is not refused; one in 40 patients is). A column that
only correlates with the outcome is not detected, and not refused.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from mmcli.heads.targets import Target
from mmcli.pipeline.errors import InputError

CHANCE = 1e-3  # refuse a pattern only when a column unrelated to the outcome shows it less often than this
FIX = {"--batch-keep": "Fix: protect only covariates fixed before the outcome (age, sex, ...), never the outcome "
                       "or a column derived from it: ComBat reads them for the test patients too, so it would "
                       "correct each test patient with its own label.",
       "--batch-column": "Fix: name the site / scanner / run column: a batch that stands for the outcome gives "
                         "each test patient the correction of its own label (and removes the signal)."}


def outcome_named(columns: Iterable[tuple[str, str]], outcome: Iterable[str | None]) -> None:
    """InputError when a covariate column (``(flag, column)`` pairs) is one of the outcome columns by name."""
    names = {c for c in outcome if c}
    for flag, col in columns:
        if col in names:
            raise InputError(f"{flag} {col}: {col!r} is an outcome column of this fit (--target / --time / "
                             f"--event). {FIX.get(flag, FIX['--batch-keep'])}")


def outcome_copies(covariates: pd.DataFrame | None, target: Target, flags: dict[str, str] | None = None) -> None:
    """InputError naming the first covariate column that :func:`leak_reason` finds derived from the outcome.

    Args:
        covariates: per-patient covariates indexed by patient id (``None``: nothing to check).
        target: the fit's outcome; only its (labelled) patients are compared.
        flags: column -> the flag that named it (for the message; default ``--batch-keep``).
    """
    if covariates is None:
        return
    what = (f"--target {target.target!r}" if target.task != "survival"
            else f"--time {target.time!r} / --event {target.event!r}")
    for col in covariates.columns:
        reason = leak_reason(covariates[col].reindex(target.patients), target)
        if reason:
            flag = (flags or {}).get(col, "--batch-keep")
            raise InputError(f"{flag} {col}: over the {len(target.patients)} labelled patients of {target.source}, "
                             f"column {col!r} {reason} of {what}. {FIX.get(flag, FIX['--batch-keep'])}")


def leak_reason(values: pd.Series, target: Target) -> str | None:
    """Why ``values`` (one per ``target.patients``, NaN = unknown) is derived from the outcome, or None."""
    known = values.notna().to_numpy()
    if known.sum() < 2:
        return None
    v = values[known].reset_index(drop=True)
    if target.task == "survival":
        time = np.asarray(target.y["time"], dtype=float)[known]
        num = _numeric(v)
        if num is not None and np.unique(num).size == len(num) and 2 / math.factorial(min(len(num), 20)) < CHANCE:
            from scipy.stats import spearmanr

            rho = spearmanr(num, time).statistic
            if np.isfinite(rho) and abs(rho) > 1 - 1e-12:
                return "is a monotone function of the survival time"
        reason = _class_reason(v, np.asarray(target.y["event"], dtype=int)[known])
        return None if reason is None else reason.replace("class", "event status")
    return _class_reason(v, np.asarray(target.y, dtype=int)[known])


def _class_reason(v: pd.Series, y: np.ndarray) -> str | None:
    """A recoding of the codes ``y``, a column that determines them, or a numeric one separating two classes."""
    classes = np.unique(y)
    if classes.size < 2:
        return None
    key = v.astype(str).to_numpy()
    values = np.unique(key)
    if values.size >= 2:
        # y -> value: every class's patients share one value; chance: prod over classes of sum_v f_v^n_c
        if all(np.unique(key[y == c]).size == 1 for c in classes) and \
                _log_chance(key, y) < math.log(CHANCE):
            return "takes one value per class (a recoding)"
        # value -> y: every value's patients share one class; chance: prod over values of sum_c f_c^n_v
        if all(np.unique(y[key == k]).size == 1 for k in values) and \
                _log_chance(y.astype(str), key) < math.log(CHANCE):
            return "determines the class: each of its values holds patients of one class only"
    num = _numeric(v)
    if num is not None and classes.size == 2:
        lo, hi = num[y == classes[0]], num[y == classes[1]]
        if (lo.max() < hi.min() or hi.max() < lo.min()) and 2 / math.comb(len(y), len(lo)) < CHANCE:
            return "separates the two classes perfectly (the class is a threshold of it)"
    return None


def _log_chance(outcome: np.ndarray, groups: np.ndarray) -> float:
    """log P(every group is constant in ``outcome``) when the outcome is drawn independently of the groups
    with its observed frequencies (a close bound of the permutation probability for all but tiny groups)."""
    _, counts = np.unique(outcome, return_counts=True)
    f = counts / counts.sum()
    return float(sum(math.log(float(np.sum(f ** n))) for n in pd.Series(groups).value_counts().to_numpy()))


def _numeric(v: pd.Series) -> np.ndarray | None:
    num = pd.to_numeric(v, errors="coerce")
    return None if num.isna().any() else num.to_numpy(dtype=float)


def check_covariates(covariates: pd.DataFrame | None, target: Target, batch_column: str | None,
                     keep: Sequence[str]) -> None:
    """Both checks for the covariates of batch correction (``--batch-column`` and ``--batch-keep``)."""
    named = [("--batch-column", batch_column)] if batch_column else []
    named += [("--batch-keep", c) for c in keep]
    outcome_named(named, (target.target, target.time, target.event))
    outcome_copies(covariates, target, {c: f for f, c in named})
