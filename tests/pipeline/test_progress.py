"""Plain progress lines for logs (issue 29 item 5): ``n/N``, elapsed and ETA every 30 s where progress does not
reach a terminal, and the cohort progress of extract / import printing them instead of blank bars."""
from __future__ import annotations

import re
from types import SimpleNamespace

from mmcli.pipeline.progress import CohortProgress, ProgressLines, duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_lines_every_30_s_with_eta() -> None:
    clock, out = Clock(), []
    p = ProgressLines(10, "extract wsi", "item", write=out.append, clock=clock)
    for i in range(1, 11):
        clock.t += 12.0  # 12 s per item
        p.update(i)
    p.finish()
    # a line at 36 s (3 done), 72 s (6), 108 s (9), then the final one at 120 s
    assert out == [
        "extract wsi: 3/10 items (30%), 36s elapsed, ETA 1m24s",
        "extract wsi: 6/10 items (60%), 1m12s elapsed, ETA 48s",
        "extract wsi: 9/10 items (90%), 1m48s elapsed, ETA 12s",
        "extract wsi: 10/10 items (100%), 2m00s elapsed",
    ]


def test_no_eta_before_the_first_item_and_notes() -> None:
    clock, out = Clock(), []
    p = ProgressLines(4, "fit attention_mil", "fold", write=out.append, clock=clock)
    clock.t += 31
    p.update(0, "fold 1/4, epoch 3/30")
    assert out == ["fit attention_mil: 0/4 folds (0%), 31s elapsed; fold 1/4, epoch 3/30"]
    assert duration(7322) == "2h02m" and duration(59.6) == "1m00s"


def test_cohort_progress_prints_lines_off_a_terminal() -> None:
    """What extract prints into a log: periodic lines naming the item in flight and its tiles, a last line with
    the outcome counts; no rich bar."""
    clock, out = Clock(), []
    with CohortProgress(3, "wsi [enc]", "tile", lines=True, write=out.append, clock=clock) as bar:
        for k in range(3):
            with bar.item(f"P{k}/a") as cb:
                for t in range(1, 5):
                    clock.t += 5
                    cb(t, 4)
            bar.advance(SimpleNamespace(status="done" if k else "cached", patient_id=f"P{k}", item_id="a",
                                        reason=""))
    assert bar.plain
    assert out[0] == "wsi [enc]: 1/3 items (33%), 30s elapsed, ETA 1m00s; P1/a: 2/4 tiles"
    assert re.fullmatch(r"wsi \[enc\]: 3/3 items \(100%\), 1m00s elapsed; done 2, cached 1", out[-1])
    assert len(out) == 3  # 30 s, 60 s and the end


def test_a_terminal_gets_bars_not_lines() -> None:
    out: list[str] = []
    with CohortProgress(2, "wsi", lines=False, write=out.append) as bar:
        bar.advance(SimpleNamespace(status="done", patient_id="P", item_id="a", reason=""))
    assert not bar.plain and out == []
