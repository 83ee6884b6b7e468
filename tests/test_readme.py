"""The README's examples run as written (issue 29 items 6 and 13).

The tour's code block is read from ``README.md`` and every command is run, in order, in a scratch folder that
stands for the repository root (a ``git init`` with the repository's ``.gitignore``): each must exit 0. To keep CI
short, the test changes only sizes and speeds, never a command's shape, and only through :data:`FAST` (each
entry says what it adds to which commands): a 16-patient cohort instead of 60, a tiny WSI encoder, 2 folds, few
epochs and bootstrap resamples. Afterwards ``git status`` must list no untracked path (the README says what it
writes is git-ignored). The study file of the README is validated with ``mmcli run --check``.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MMCLI = [sys.executable, "-m", "mmcli.cli"]

# (regex on the command, flags appended to it): sizes and speeds only
FAST = [
    (r"^mmcli synth ", ["--patients", "16"]),  # the last --patients wins: 16 instead of 60
    (r"^mmcli extract --modality wsi ", ["--encoder", "timm:test_resnet", "--patch-size", "32", "--mpp", "4",
                                         "--precision", "fp32"]),
    (r"^mmcli extract --modality (wsi|mri|text) ", ["--no-progress"]),
    (r"^mmcli fit ", ["--folds", "2", "--n-boot", "50"]),
    (r"^mmcli fit --head (attention_mil|fusion_mlp|clam_sb) ", ["--param", "epochs=2"]),
    (r"^mmcli compare ", ["--n-boot", "50"]),
    (r"^mmcli export --format heatmap ", ["--heatmap-mpp", "8"]),
]


def _blocks(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def tour_commands() -> list[str]:
    """The commands of the README's first ``bash`` block after the two-command block (the tour), comments and
    line continuations resolved."""
    block = next(b for b in _blocks("bash") if "mmcli synth" in b)
    lines, pending = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = re.sub(r"\s+#.*$", "", pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_the_tour_is_read_from_the_readme() -> None:
    cmds = tour_commands()
    assert cmds[0].startswith("mmcli synth") and any(c.startswith("mmcli predict") for c in cmds)
    assert any("--subgroups age" in c for c in cmds)  # the example issue 29 found failing
    # every FAST rule applies to some command (a renamed command must not silently skip its speed-up)
    for pattern, _ in FAST:
        assert any(re.search(pattern, c) for c in cmds), pattern


def _argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    extra = [f for pattern, flags in FAST if re.search(pattern, cmd) for f in flags]
    if words[0] == "mmcli":
        return [*MMCLI, *words[1:], *extra]
    return words + extra


@pytest.mark.slow
def test_every_tour_command_runs_and_leaves_nothing_untracked(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    git = shutil.which("git")
    if git:
        subprocess.run([git, "init", "-q"], cwd=root, check=True)
        subprocess.run([git, "add", ".gitignore"], cwd=root, check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for cmd in tour_commands():
        r = subprocess.run(_argv(cmd), cwd=root, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, cmd
    assert (root / "runs" / "fusion" / "report.html").is_file() and (root / "scores.csv").is_file()
    assert list((root / "heatmaps").rglob("*.heatmap.png"))
    assert '"r2"' in (root / "runs" / "size" / "metrics.json").read_text()  # the regression example
    assert (root / "runs" / "clam" / "model").is_dir()
    sub = (root / "runs" / "xgb" / "metrics.json").read_text()
    assert '"subgroups"' in sub and '"age"' in sub  # the subgroups of the clinical table's age were computed
    if git:
        status = subprocess.run([git, "status", "--porcelain", "--untracked-files=all"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        untracked = [line for line in status.splitlines() if line.startswith("??")]
        assert not untracked, "the README's commands leave untracked paths:\n" + "\n".join(untracked)


def test_the_readme_study_file_validates(tmp_path: Path) -> None:
    (doc,) = [b for b in _blocks("yaml") if "fits:" in b]
    study = tmp_path / "study.yaml"
    study.write_text(doc)
    r = subprocess.run([*MMCLI, "run", "--check", str(study)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert [f["name"] for f in resolved["fits"]] == ["abmil", "fusion", "xgb", "cox"]
    assert resolved["fits"][2]["evidence"]["subgroups"] == "age" and resolved["out"] == str(tmp_path / "tour")
    assert not (tmp_path / "tour").exists()


def test_install_cpu_takes_torch_from_the_cpu_index_first(tmp_path: Path) -> None:
    """``make install-cpu`` (item 10) installs torch and torchvision from PyTorch's CPU index before mmcli, so pip
    finds torch satisfied and pulls no CUDA wheel; ``make install`` does not touch that index. Checked with
    ``make -n`` on a copy of the Makefile (the real install needs that index, unreachable from CI machines)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    cpu = subprocess.run([make, "-n", "install-cpu"], cwd=tmp_path, capture_output=True, text=True).stdout
    lines = [line.strip() for line in cpu.splitlines() if "pip install" in line]
    assert lines[1] == ".venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision"
    assert lines[2] == '.venv/bin/pip install -e ".[dev]"'
    plain = subprocess.run([make, "-n", "install"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert "--index-url" not in plain and 'pip install -e ".[dev]"' in plain
