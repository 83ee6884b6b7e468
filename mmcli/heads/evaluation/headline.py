"""Which of a metric's two intervals is its headline, and how the CLI, report and model card label them.

Every metric of metrics.json carries two intervals (:func:`mmcli.heads.evaluation.metrics.summarise`):
``ci_low/ci_high`` (percentile bootstrap over test patients, models held fixed) and ``ci_t_low/ci_t_high``
(corrected resampled t-interval over the per-fold values, Nadeau & Bengio 2003). ``headline`` names the one
to show first:

* ``"ci_t"`` for a cross-validation (2 or more folds). The question a CV answers is how well the *procedure*
  does on new patients, and the bootstrap, which ignores training variability, under-covers it: 0.82-0.90
  where the t-interval covers 0.95-0.97 (``benchmarks/bench_coverage.py``, docs/statistics.md).
* ``"ci"`` for one evaluation set (``mmcli evaluate``, a federated test split): the model is fixed and the
  question is how well *this* model does; the bootstrap over its test patients covers exactly that, and a
  t-interval over one value does not exist.

Runs written before ``headline`` existed get the same rule from their ``per_fold`` length.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CI_T, CI_BOOT = "ci_t", "ci"
LABELS = {
    CI_T: "corrected resampled t over folds (Nadeau-Bengio): covers training and test variability",
    CI_BOOT: "percentile bootstrap over test patients, model(s) held fixed: test variability only",
}
SHORT = {CI_T: "corrected t over folds", CI_BOOT: "bootstrap, models fixed"}
ONE_SET = ("bootstrap over patients", "percentile bootstrap over the evaluated patients, the model held fixed: "
           "covers this model's performance on patients like these")  # short label, legend: one evaluation set


def headline_for(n_folds: int) -> str:
    """``"ci_t"`` for 2 or more folds, else ``"ci"`` (module docstring)."""
    return CI_T if n_folds >= 2 else CI_BOOT


def headline_key(entry: Mapping[str, Any]) -> str:
    """The headline interval's key prefix of a metrics.json metric entry (``"ci_t"`` or ``"ci"``)."""
    key = entry.get("headline")
    if key in LABELS:
        return str(key)
    return CI_T if "ci_t_low" in entry and len(entry.get("per_fold") or []) >= 2 else CI_BOOT


def interval(entry: Mapping[str, Any], key: str) -> tuple[float | None, float | None]:
    """``(low, high)`` of interval ``key`` (``"ci"`` or ``"ci_t"``); None where absent or null."""
    return entry.get(f"{key}_low"), entry.get(f"{key}_high")


def headline_interval(entry: Mapping[str, Any]) -> tuple[float | None, float | None, str]:
    """``(low, high, key)`` of the headline interval of a metric entry."""
    key = headline_key(entry)
    return (*interval(entry, key), key)


def scope(entry: Mapping[str, Any]) -> str:
    """What the entry's ``mean`` is: ``"mean of K folds"`` or ``"value"`` (one evaluation set)."""
    k = len(entry.get("per_fold") or [])
    return f"mean of {k} folds" if k >= 2 else "value"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pair(lo: float | None, hi: float | None) -> str:
    return f"[{_num(lo)}, {_num(hi)}]"


def metric_lines(metrics: Mapping[str, Any], indent: str = "  ") -> list[str]:
    """Console lines of a metrics.json ``metrics`` block: a header naming what the number is and what each
    interval covers, one line per metric (headline interval first, the other one after it where it exists),
    and a legend line."""
    entries = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
    if not entries:
        return []
    first = next(iter(entries.values()))
    key = headline_key(first)
    other = CI_BOOT if key == CI_T else None
    w = max(18, *(len(k) for k in entries))
    what = scope(first)
    short = short_label(key, what)
    head = f"{indent}{'metric':<{w}} {what:>16}  95% CI: {short:<24}"
    if other:
        head += f"  95% CI: {SHORT[other]}"
    lines = [head.rstrip()]
    for name, m in entries.items():
        row = f"{indent}{name:<{w}} {_num(m.get('mean')):>16}  {_pair(*interval(m, headline_key(m))):<32}"
        if other:
            row += f"  {_pair(*interval(m, other))}"
        lines.append(row.rstrip())
    return lines + legend(key, what, indent)


def short_label(key: str, what: str) -> str:
    """The column label of interval ``key`` for entries whose value is ``what`` (:func:`scope`)."""
    return ONE_SET[0] if key == CI_BOOT and what == "value" else SHORT[key]


def legend(key: str, what: str, indent: str = "") -> list[str]:
    """What each shown interval covers, headline first: one line per interval."""
    if key == CI_BOOT and what == "value":
        return [f"{indent}{ONE_SET[0]}: {ONE_SET[1].split(': ', 1)[1]}"]
    out = [f"{indent}{SHORT[key]}: {LABELS[key].split(': ', 1)[1]}"]
    if key == CI_T:
        out.append(f"{indent}{SHORT[CI_BOOT]}: {LABELS[CI_BOOT].split(': ', 1)[1]} (narrower; it under-covers "
                   "the procedure's performance)")
    return out
