"""The README and ``docs/`` stay true: links resolve, the README is short and begins with the two commands, and
every command, flag, head parameter, benchmark option, make target and file they name exists.

What is checked, per Markdown file (``README.md`` and ``docs/*.md``):

* every relative link ``[text](path#anchor)`` points to an existing file, and its ``#anchor`` to a heading of the
  target page (GitHub's anchor rules: lower case, punctuation dropped, spaces to ``-``, ``-1`` for repeats);
* every ``mmcli VERB [SUB] --flag`` in a code block or an inline code span names a verb of the CLI and flags that
  verb takes (read from the click command behind ``mmcli VERB --help``);
* every other ``--flag`` in the text exists in some verb, in the benchmark script on the same command line, or in
  :data:`EXTERNAL_FLAGS` (flags of other programs: dask, pytest);
* every ``--param KEY=`` names a parameter of some head's ``Params`` model;
* every ``benchmarks/*.py`` / ``tests/**.py`` / ``mmcli/**.py`` path exists, and every ``make TARGET`` is a
  Makefile target.

:data:`PENDING_FLAGS` lists flags that the docs describe ahead of the code (a feature on another branch): each
entry says which branch adds it. An entry whose flag now exists fails, so the list cannot go stale.
"""
from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = ("index", "extract", "heads", "fit-and-evaluate", "statistics", "serving", "privacy", "operations", "formats",
         "benchmarks", "development")
MAX_README_LINES = 300

# (verb, flag) -> why the docs may name it before the CLI has it: which branch adds it. Keep this short.
PENDING_FLAGS: dict[tuple[str, str], str] = {}

# flags of programs other than mmcli and the benchmark scripts, named in the docs
EXTERNAL_FLAGS = {
    "--scheduler-file", "--no-dashboard", "--nthreads", "--nworkers", "--protocol",  # dask scheduler / worker
    "--gres",  # SLURM, in the dask-jobqueue example
    "--index-url",  # pip, in the CPU-only install
}

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!\!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?[^)]*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
MMCLI = re.compile(r"(?:^|(?<=[\s/(]))mmcli\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?")
BENCH = re.compile(r"benchmarks/([\w-]+\.py)")
PARAM = re.compile(r"--param\s+([a-z][a-z0-9_]*)=")
PATH_REF = re.compile(r"(?<![\w/.-])((?:benchmarks|tests|mmcli)/[\w/.-]*\.py)\b")
MAKE = re.compile(r"(?<![\w-])make\s+([a-z][a-z0-9-]*)")
SEPARATORS = re.compile(r"\s\|\s|;|&&|\$\(")


def md_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def parse(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(prose lines, code lines)`` as ``(line number, text)``; fenced blocks are code, with backslash
    continuations joined so that one shell command is one line."""
    prose: list[tuple[int, str]] = []
    code: list[tuple[int, str]] = []
    in_fence, pending, start = False, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            prose.append((n, line))
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        code.append((start, pending + line))
        pending = ""
    return prose, code


def code_segments(path: Path) -> list[tuple[int, str, str]]:
    """Every piece of code in a file as ``(line number, code, comment)``: fenced lines (a shell or Python
    comment split off) and the inline code spans of the prose (no comment)."""
    prose, code = parse(path)
    out = []
    for n, line in code:
        m = re.search(r"(^|\s)#", line)
        out.append((n, line[:m.start()] if m else line, line[m.end():] if m else ""))
    for n, line in prose:
        out += [(n, m.group(2), "") for m in INLINE_CODE.finditer(line)]
    return out


def prose_without_code(path: Path) -> list[tuple[int, str]]:
    prose, _ = parse(path)
    return [(n, INLINE_CODE.sub(" ", line)) for n, line in prose]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): rendered text, lower case, every character that is not a
    letter, mark, number, connector (``_``), space or ``-`` dropped, spaces to ``-``."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("*", "").strip().lower()
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN"
                   or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    prose, _ = parse(path)
    for _, line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return frozenset(out)


@cache
def cli_commands() -> dict[tuple[str, ...], frozenset[str]]:
    """``{("fit",): {"--head", ...}, ("store", "info"): {...}, ("store",): {...}}``: every command path of the
    ``mmcli`` CLI and the options its ``--help`` lists."""
    import click
    import typer.main

    from mmcli.cli import app

    out: dict[tuple[str, ...], frozenset[str]] = {}

    def walk(cmd, path: tuple[str, ...]) -> None:
        flags = {"--help"}
        for p in cmd.params:
            flags.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
        out[path] = frozenset(flags)
        if hasattr(cmd, "list_commands"):  # a group: its commands, the lazily built ones (extract) included
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), (*path, name))

    walk(typer.main.get_command(app), ())
    return out


@cache
def all_cli_flags() -> frozenset[str]:
    return frozenset().union(*cli_commands().values())


@cache
def script_flags(name: str) -> frozenset[str]:
    src = (ROOT / "benchmarks" / name).read_text(encoding="utf-8")
    return frozenset(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", src))


@cache
def all_script_flags() -> frozenset[str]:
    return frozenset().union(*(script_flags(p.name) for p in (ROOT / "benchmarks").glob("*.py")))


@cache
def head_params() -> frozenset[str]:
    from mmcli.heads import head_class, list_heads

    return frozenset().union(*(set(head_class(h).Params.model_fields) for h in list_heads()))


def mmcli_calls(text: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """Each ``mmcli VERB [SUB] ...`` in one code segment: the command path as written and the flags after it."""
    calls = []
    for part in SEPARATORS.split(text):
        for m in MMCLI.finditer(part):
            words = tuple(w for w in m.groups() if w)
            calls.append((words, FLAG.findall(part[m.end():])))
    return calls


def resolve_command(words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The CLI command a doc's ``mmcli w1 [w2]`` means, or None when there is none: under a group (``store``,
    ``audit``) the second word must be one of its subcommands; under a verb it is an argument."""
    cmds = cli_commands()
    if (words[0],) not in cmds:
        return None
    is_group = any(len(p) == 2 and p[0] == words[0] for p in cmds)
    if is_group and len(words) > 1:
        return words[:2] if words[:2] in cmds else None
    return words[:1]


def flag_known(command: tuple[str, ...], flag: str) -> bool:
    return flag in cli_commands()[command] or (" ".join(command), flag) in PENDING_FLAGS


# ---- the README -----------------------------------------------------------------------------------------------
def test_readme_is_short_and_begins_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    start = next(i for i, line in enumerate(lines) if FENCE.match(line))
    assert start <= 3, "README.md must open with the code block of the two commands"
    end = next(i for i in range(start + 1, len(lines)) if FENCE.match(lines[i]))
    commands = [re.sub(r"\s*#.*$", "", line).strip() for line in lines[start + 1:end]]
    assert [c for c in commands if c] == ["make demo", "make test"], commands


def _recipe(makefile: str, target: str) -> tuple[str, str]:
    m = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n?)*)", makefile, re.M)
    assert m, f"Makefile has no target {target!r}"
    return m.group(1), m.group(2)


def test_the_two_commands_do_what_the_readme_says() -> None:
    """``make demo`` installs and runs ``mmcli demo`` into demo_out/; ``make test`` installs, checks the layer
    contracts and runs pytest; CI runs ``make test``."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    deps, recipe = _recipe(makefile, "demo")
    assert "$(STAMP)" in deps and "mmcli demo --out demo_out" in recipe
    assert re.search(r"make demo\s+#.*install.*demo_out", readme)
    deps, recipe = _recipe(makefile, "test")
    assert "$(STAMP)" in deps and "lint-imports" in deps and "pytest" in recipe
    assert re.search(r"make test\s+#.*install.*layer contracts.*test suite", readme)
    _, install = _recipe(makefile, "$(STAMP)")
    assert "-m venv" in install and '.[dev]"' in install
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(encoding="utf-8"), re.M)


def test_every_docs_page_exists_and_is_linked_from_the_index() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in PAGES:
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"
        if page != "index":
            assert f"]({page}.md)" in index, f"docs/index.md does not link {page}.md"
    assert "](docs/index.md)" in README.read_text(encoding="utf-8")


# ---- links ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", md_files(), ids=rel)
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    bad = []
    for n, line in prose_without_code(path):
        for target in [m.group(1) for m in LINK.finditer(line)] + IMAGE.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{rel(path)}:{n}: {target} (no such file)")
            elif anchor and dest.suffix != ".md":
                bad.append(f"{rel(path)}:{n}: {target} (an anchor into a file that is not Markdown)")
            elif anchor and anchor not in anchors(dest):
                bad.append(f"{rel(path)}:{n}: {target} (no heading with that anchor in {dest.name})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_slug_rules() -> None:
    """The anchors GitHub gives these headings (github-slugger's rules: ``_`` and non-ASCII letters kept, every
    space becomes a ``-``)."""
    assert slug("Import and export (CLAM, TRIDENT, STAMP)") == "import-and-export-clam-trident-stamp"
    assert slug("`mmcli doctor`") == "mmcli-doctor"
    assert slug("Stage 2: fit, predict, report") == "stage-2-fit-predict-report"
    assert slug("What the synthetic cohort proves, and what it does not") == \
        "what-the-synthetic-cohort-proves-and-what-it-does-not"
    assert slug("Batch correction (ComBat)") == "batch-correction-combat"
    assert slug("DP-SGD utility against ε") == "dp-sgd-utility-against-ε"
    assert slug("attention_mil × 2") == "attention_mil--2"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The link check fails on a missing file and a missing anchor (it is not vacuous)."""
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere) `[code](x.md)`\n", encoding="utf-8")
    found = [m.group(1) for _, line in prose_without_code(page) for m in LINK.finditer(line)]
    assert found == ["#title", "missing.md", "#nowhere"]
    assert anchors(page) == {"title"}


# ---- commands, flags, parameters, paths -----------------------------------------------------------------------
@pytest.mark.parametrize("path", md_files(), ids=rel)
def test_named_commands_and_flags_exist(path: Path) -> None:
    bad = []
    for n, seg, comment in code_segments(path):
        bad += [f"{rel(path)}:{n}: {f} (in a comment) is not a flag of any mmcli verb or benchmark"
                for f in FLAG.findall(comment) if not _free_flag_known(f)]
        calls = mmcli_calls(seg)
        for words, flags in calls:
            cmd = resolve_command(words)
            if cmd is None:
                bad.append(f"{rel(path)}:{n}: `mmcli {' '.join(words)}`: no such verb")
                continue
            bad += [f"{rel(path)}:{n}: `mmcli {' '.join(cmd)}` has no {f}" for f in flags if not flag_known(cmd, f)]
        if calls:
            continue
        script = BENCH.search(seg)
        for f in FLAG.findall(seg[script.end():] if script else seg):
            if script and (ROOT / "benchmarks" / script.group(1)).is_file():
                if f not in script_flags(script.group(1)):
                    bad.append(f"{rel(path)}:{n}: benchmarks/{script.group(1)} has no {f}")
            elif not _free_flag_known(f):
                bad.append(f"{rel(path)}:{n}: {f} is not a flag of any mmcli verb or benchmark")
    for n, line in prose_without_code(path):
        bad += [f"{rel(path)}:{n}: {f} is not a flag of any mmcli verb" for f in FLAG.findall(line)
                if not _free_flag_known(f)]
    assert not bad, "stale commands or flags in the docs:\n" + "\n".join(bad)


def _free_flag_known(flag: str) -> bool:
    return (flag in all_cli_flags() or flag in all_script_flags() or flag in EXTERNAL_FLAGS
            or any(f == flag for _, f in PENDING_FLAGS))


@pytest.mark.parametrize("path", md_files(), ids=rel)
def test_named_head_parameters_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    unknown = sorted(set(PARAM.findall(text)) - head_params())
    assert not unknown, f"{rel(path)} names --param keys no head has: {unknown}"


@pytest.mark.parametrize("path", md_files(), ids=rel)
def test_named_files_and_make_targets_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    missing = sorted({p for p in PATH_REF.findall(text) if not (ROOT / p).is_file()})
    assert not missing, f"{rel(path)} names files that do not exist: {missing}"
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    named = {t for _, seg, _ in code_segments(path) for t in MAKE.findall(seg)}
    unknown = sorted(named - targets)
    assert not unknown, f"{rel(path)} names make targets the Makefile lacks: {unknown}"


def test_the_flag_check_catches_a_stale_flag() -> None:
    """A made-up flag, verb or parameter is reported (the check is not vacuous)."""
    calls = mmcli_calls("mmcli fit --head xgboost --no-such-flag 1 | tee log ; mmcli store verify s --repair")
    assert calls == [(("fit",), ["--head", "--no-such-flag"]), (("store", "verify"), ["--repair"])]
    assert not flag_known(("fit",), "--no-such-flag") and flag_known(("store", "verify"), "--repair")
    assert resolve_command(("frobnicate",)) is None and resolve_command(("store", "frobnicate")) is None
    assert resolve_command(("compare", "runs")) == ("compare",)
    assert not _free_flag_known("--no-such-flag") and _free_flag_known("--patch-size")
    assert "epochs" in head_params() and "no_such_param" not in head_params()


def test_pending_flags_are_still_pending() -> None:
    """An exception for a flag that has since landed must be removed from PENDING_FLAGS."""
    landed = [f"{verb} {flag}" for verb, flag in PENDING_FLAGS
              if tuple(verb.split()) in cli_commands() and flag in cli_commands()[tuple(verb.split())]]
    assert not landed, f"these flags exist now; remove them from PENDING_FLAGS: {landed}"
