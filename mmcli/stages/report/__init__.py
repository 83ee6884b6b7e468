"""``mmcli report``: a self-contained HTML report of a run (figures in :mod:`.plots`, attention in
:mod:`.attention`, the ablation chart in :mod:`.ablation`)."""
from mmcli.stages.report.html import REPORT_NAME, report

__all__ = ["REPORT_NAME", "report"]
