"""docs/heads.md is ``mmcli heads --markdown``: every head with its reference and its parameters from its Params
model, regenerated (never edited) so that it cannot go stale."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.heads import head_class, list_heads

PAGE = Path(__file__).resolve().parents[1] / "docs" / "heads.md"


def test_docs_heads_md_is_the_generated_page():
    out = CliRunner().invoke(app, ["heads", "--markdown"])
    assert out.exit_code == 0, out.output
    assert PAGE.read_text(encoding="utf-8") == out.stdout, \
        "docs/heads.md is stale: regenerate it with `mmcli heads --markdown > docs/heads.md`"


def test_the_page_lists_every_head_with_every_parameter_and_its_description():
    text = PAGE.read_text(encoding="utf-8")
    for name in list_heads():
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        params = head_class(name).Params
        for field in params.fields():
            if field in ("task", "n_classes", "seed"):  # set by the run, not --param
                assert f"| `{field}` |" not in section
                continue
            row = next(line for line in section.splitlines() if line.startswith(f"| `{field}` |"))
            assert (params.model_fields[field].description or "").split("|")[0].strip() in row.replace("\\|", "|")
        assert " et al. 20" in section or name in ("cox", "fusion_mlp", "xgboost")  # the MIL heads cite a paper
