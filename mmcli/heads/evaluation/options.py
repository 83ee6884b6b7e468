"""``EvidenceOptions``: the options of the evidence blocks (``fit`` and ``evaluate`` flags), validated once.

Light on purpose (pydantic only): the CLI builds its help from these field descriptions at start-up. The text
options are parsed (:meth:`EvidenceOptions.check`) by the evaluation modules, imported only then.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from mmcli.pipeline.options import Options

if TYPE_CHECKING:
    from mmcli.heads.evaluation.operating_point import OperatingPoint
    from mmcli.heads.evaluation.subgroups import SubgroupSpec

DEFAULT_THRESHOLDS = "0.01:0.99:0.01"


class EvidenceOptions(Options):
    """Options of the evidence blocks (``fit`` and ``evaluate`` flags)."""

    calibrate: Literal["none", "platt", "isotonic"] = Field(
        "none", description="recalibrate probabilities: none | platt | isotonic, fitted inside each training fold "
        "on its inner cross-validated probabilities; saved with the model and applied by predict")
    operating_point: str | None = Field(None, description="binary: sens=RATE or spec=RATE with RATE in (0, 1); the "
                                        "threshold is chosen on the training folds only (nested), stored in the "
                                        "model; predict adds a decision column")
    dca_thresholds: str = Field(DEFAULT_THRESHOLDS, description="decision-curve threshold probabilities: "
                                "START:STOP:STEP or a comma list, in (0, 1)")
    horizon: float | None = Field(None, gt=0, description="survival decision curve: the event probability by time "
                                  "T, > 0, in the labels' time unit")
    subgroups: str | None = Field(None, description="columns of the labels or a store table, e.g. site,age or "
                                  "age:edges=40,60 (numeric: quartiles by default)")
    min_subgroup: int = Field(10, ge=1, description="groups smaller than this are reported as too small, without "
                              "metrics; an integer >= 1")
    inner_folds: int = Field(5, ge=2, description="inner folds (per training fold) for --calibrate and "
                             "--operating-point, an integer >= 2")

    def op(self) -> OperatingPoint | None:
        from mmcli.heads.evaluation.operating_point import parse_operating_point

        return parse_operating_point(self.operating_point)

    def thresholds(self) -> Any:
        """The decision-curve thresholds, a numpy array."""
        from mmcli.heads.evaluation.decision_curve import parse_thresholds

        return parse_thresholds(self.dca_thresholds)

    def subgroup_specs(self) -> list[SubgroupSpec]:
        from mmcli.heads.evaluation.subgroups import parse_subgroups

        return parse_subgroups(self.subgroups)

    def check(self) -> EvidenceOptions:
        """Parse every text option now (InputError naming the flag), before any work."""
        self.op()
        self.thresholds()
        self.subgroup_specs()
        return self
