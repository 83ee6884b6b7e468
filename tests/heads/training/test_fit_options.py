"""FitOptions: what ``to_json`` writes (config.json, study files) validates again with ``from_json``."""
from __future__ import annotations

import pytest

from mmcli.heads.registry import list_heads
from mmcli.heads.training.options import FitOptions
from mmcli.pipeline.errors import InputError


@pytest.mark.parametrize("head", list_heads())
def test_to_json_round_trips(head: str) -> None:
    opts = FitOptions.build({"head": head, "store": "s.zarr", "labels": "l.csv", "out": "o", "target": "y"})
    doc = opts.to_json()
    assert "flag_prefix" not in str(doc)
    assert FitOptions.from_json(doc).to_json() == doc


def test_run_set_params_still_refused_as_user_params() -> None:
    with pytest.raises(InputError, match="set by the run"):
        FitOptions.build({"head": "xgboost", "store": "s", "labels": "l", "out": "o", "target": "y",
                          "params": {"seed": 3}})
