"""Report sections from integrated gradients: per-modality shares, top features per class, and note windows
whose text is read from the note file only when it is reachable and unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmcli.pipeline.fingerprint import source_fingerprint
from mmcli.pipeline.rundir import SCHEMA_VERSION
from mmcli.pipeline.store import open_store
from mmcli.stages.report.html import report

NOTE_A = "History unremarkable. Tumour is ER positive and HER2 negative. Follow up in six months."
NOTE_B = "Triple negative carcinoma with high grade nuclei. Node positive."


def _run(tmp_path: Path) -> Path:
    notes = {"P1": tmp_path / "a.txt", "P2": tmp_path / "b.txt"}
    notes["P1"].write_text(NOTE_A)
    notes["P2"].write_text(NOTE_B)
    st = open_store(tmp_path / "s.zarr")
    for pid, path in notes.items():
        st.write_item("text", "enc-1", pid, "note", np.zeros((2, 4), np.float32),
                      attrs={"row_weights": [10, 8], "source_fingerprint": source_fingerprint(path)})
    notes["P2"].write_text(NOTE_B + " Edited afterwards.")  # changed since extraction: offsets only
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "head": "fusion_mlp", "task": "classification", "classes": ["neg", "pos"],
        "store": str(tmp_path / "s.zarr"), "encoder_ids": {"text": "enc-1", "prot": "tabular"},
        "modalities": ["text", "prot"]}))
    pd.DataFrame({"patient_id": ["P1", "P2", "P3"], "fold": [0, 1, 2], "y_true": ["pos", "neg", "neg"],
                  "y_pred": ["pos", "pos", "neg"], "prob_neg": [0.1, 0.3, 0.8],
                  "prob_pos": [0.9, 0.7, 0.2]}).to_csv(run / "predictions.csv", index=False)
    rows = []
    for pid, text, gene in (("P1", 1.2, 0.5), ("P2", 0.4, -0.2), ("P3", 0.0, -0.9)):
        rows += [(pid, 0, "text", "(sum)", text, 1.0, 0.0), (pid, 0, "prot", "ESR1", gene, 1.0, 0.0),
                 (pid, 0, "prot", "ERBB2__missing", -0.05, 1.0, 0.0)]
    pd.DataFrame(rows, columns=["patient_id", "fold", "modality", "feature", "attribution", "output",
                                "baseline_output"]).to_csv(run / "attributions.csv", index=False)
    er = NOTE_A.index("ER positive")
    pd.DataFrame({"patient_id": ["P1", "P1", "P2", "P2"], "fold": 0, "modality": "text", "item_id": "note",
                  "window": [0, 1, 0, 1], "char_start": [0, er, 0, 30], "char_end": [er - 1, len(NOTE_A), 29, 60],
                  "tokens": [10, 8, 10, 8], "attribution": [0.1, 1.1, 0.3, 0.1]}
                 ).to_csv(run / "attributions_windows.csv", index=False)
    return run


def test_report_shows_shares_top_features_and_note_windows(tmp_path: Path) -> None:
    html = report(_run(tmp_path)).read_text()
    assert "<th>share</th>" in html and "attribution shares" in html and "Top features per class" in html
    assert "toward class pos" in html and "toward class neg" in html
    assert "text (embedding, summed)" in html and "ESR1" in html and "ERBB2__missing" in html
    # P1's strongest window is shown with its text, read from the unchanged note file
    assert NOTE_A[NOTE_A.index("ER positive"):] in html
    # P2's note changed after extraction: offsets only, no text
    assert "offsets only: note file changed since extraction" in html and "Triple negative" not in html
    assert "misclassified: true neg, predicted pos" in html
    assert "could not be drawn" not in html


def test_report_without_reachable_store_shows_offsets(tmp_path: Path) -> None:
    run = _run(tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["store"] = str(tmp_path / "gone.zarr")
    (run / "config.json").write_text(json.dumps(cfg))
    html = report(run).read_text()
    assert "offsets only: the run&#x27;s store is not reachable" in html and "ER positive" not in html
