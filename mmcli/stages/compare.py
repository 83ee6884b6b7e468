"""``mmcli compare RUN_A RUN_B``: is run A better than run B on the same patients?

The verb reads two run folders; the statistics (the corrected paired t over shared folds, DeLong, the paired
bootstrap) are :mod:`mmcli.heads.evaluation.compare`, which ``ablate`` uses too.
"""
from __future__ import annotations

from mmcli.heads.evaluation.compare import compare, format_comparison

__all__ = ["compare", "format_comparison"]
