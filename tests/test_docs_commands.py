"""Every command the docs show runs as written: the fenced code blocks of README.md and every
docs/*.md page (found at run time, so new pages are covered without touching this file).

The convention, for whoever writes a page:

- ```` ```bash ````, ```` ```sh ```` and ```` ```shell ```` blocks run with ``bash -e`` in a fresh
  working folder (one per page, shared by the page's blocks in order, so a later block can use the
  run folder an earlier one made) and must exit 0. Keep them cheap: a debug run
  (``debug=fdr``, ``debug=limit``) or a few epochs rather than a full recipe.
- ```` ```python ```` blocks run, each on its own, in a fresh interpreter in the same folder, so each
  must be complete (imports, inputs).
- ```` ```console ```` blocks are shown, not run: a GPU, a real data set, the network, hours of
  training or a command that never ends (``mkdocs serve``). Their first line is a comment that says
  so, ``# needs <what>``; the test checks that every such block has it.
- ```` ```text ```` (what a tool prints) and ```` ```yaml ```` (files) are not commands.

README commands (1) and (2) are run by CI (.ci/run) exactly as written, so they are skipped here by
exact match.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ("bash", "sh", "shell")
NOT_COMMANDS = ("text", "yaml", "yml", "toml", "json", "csv", "")
# README (1) and (2): .ci/run runs them in a fresh environment (with the accuracy target of (1)).
RUN_BY_CI = {"pip install -e . && spikeformers-train", 'pip install -e ".[test]" && python -P -m pytest -q'}
# Blocks that fail today on pages whose authors were told: (page, first line of the block) -> why.
# They still run; one that fails is skipped and reported, one that passes fails the test (drop its
# entry), and an entry that names no block fails test_known_failing_entries_name_blocks.
KNOWN_FAILING: dict[tuple[str, str], str] = {}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
ENV = dict(os.environ, SPIKEFORMERS_LIF_COMPILE="0", WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in page order, de-indented (list items indent them)."""
    found = []
    for match in FENCE.finditer(page.read_text()):
        indent = len(match["indent"])
        code = "".join(line[indent:] if line[:indent].isspace() else line for line in match["body"].splitlines(True))
        found.append((match["info"].strip().split(" ")[0].lower(), code))
    return found


def commands(code: str) -> list[str]:
    """The shell commands of a block, continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def runnable(page: Path) -> list[tuple[str, str]]:
    """The blocks of ``page`` this test runs: (language, code), README's CI commands left out."""
    kept = []
    for lang, code in blocks(page):
        if lang in RUN:
            if {c for c in commands(code)} <= RUN_BY_CI:
                continue
            kept.append(("bash", code))
        elif lang == "python":
            kept.append(("python", code))
    return kept


PAGES = [p for p in pages() if runnable(p)]


def test_every_fenced_block_has_a_known_kind():
    unknown = [(page_id(p), lang) for p in pages() for lang, _ in blocks(p)
               if lang not in (*RUN, "python", "console", *NOT_COMMANDS)]
    assert not unknown, f"fenced blocks this test does not know how to treat: {unknown}"


def test_console_blocks_say_what_they_need():
    """A block that is shown but not run says why on its first line (``# needs a GPU``)."""
    silent = [(page_id(p), code.splitlines()[0] if code.strip() else "") for p in pages() for lang, code in blocks(p)
              if lang == "console" and not code.lstrip().startswith("# needs ")]
    assert not silent, f"console blocks without a '# needs ...' first line: {silent}"


def test_the_ci_commands_are_still_in_the_readme():
    readme = [c for lang, code in blocks(ROOT / "README.md") if lang in RUN for c in commands(code)]
    assert RUN_BY_CI <= set(readme), "README commands (1)/(2) changed: update RUN_BY_CI and .ci/run together"


def test_known_failing_entries_name_blocks():
    """A KNOWN_FAILING entry whose block was fixed away or reworded must go, not stay unnoticed."""
    present = {(page_id(p), code.strip().splitlines()[0]) for p in PAGES for _, code in runnable(p) if code.strip()}
    stale = sorted(set(KNOWN_FAILING) - present)
    assert not stale, f"KNOWN_FAILING entries that name no runnable block: {stale}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_commands_run_as_written(page, tmp_path):
    """The page's bash and python blocks, in order, in one fresh folder; each exits 0."""
    failures, skipped = [], []
    for index, (kind, code) in enumerate(runnable(page)):
        first = code.strip().splitlines()[0]
        known = KNOWN_FAILING.get((page_id(page), first))
        if kind == "bash":
            argv = ["bash", "-e", "-o", "pipefail", "-c", code]
        else:
            argv = [sys.executable, "-P", "-c", code]
        try:
            out = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            failure = "timed out"
        else:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            failure = f"exit {out.returncode}: {' | '.join(tail)}" if out.returncode else None
        if known and failure:
            skipped.append(f"`{first}`: {known}")
        elif known:
            failures.append(f"block {index + 1} ({kind}) `{first}` passes now: drop it from KNOWN_FAILING")
        elif failure:
            failures.append(f"block {index + 1} ({kind}) `{first}`: {failure}")
    assert not failures, "\n".join(failures)
    if skipped:
        pytest.skip("known to fail: " + "; ".join(skipped))


# --- docs and code cite the paper, a docs page, or say it in place ----------------------------------

# Numbered sections ("<notes file> §8") refer to research notes that are not in the repository.
SECTION_CITATION = re.compile(r"§ ?\d")
# Files that still cite them today (owned elsewhere; reported): no other file may start to.
CITES_SECTIONS_TODAY = {"kernels/convert.cu", "kernels/lif.cu",
                        "tests/reference/keys_more/README.md"}
SOURCES = ("*.py", "*.md", "*.yaml", "*.cu", "*.cpp", "*.h", "*.toml")


def test_nothing_cites_sections_of_notes_that_are_not_in_the_repository():
    files = {p for pattern in SOURCES for p in ROOT.rglob(pattern)
             if not any(part.startswith(".") or part.endswith(".egg-info") or part == "site" for part in p.relative_to(ROOT).parts)}
    citing = {str(p.relative_to(ROOT)) for p in files if SECTION_CITATION.search(p.read_text(errors="replace"))}
    citing.discard("tests/test_docs_commands.py")  # this file names the pattern
    assert citing <= CITES_SECTIONS_TODAY, f"new '§N' citations: {sorted(citing - CITES_SECTIONS_TODAY)}"


def test_the_fault_table_points_at_tests_that_exist():
    """docs/errors.md's table of faults: every `tests file::name` it cites is a test of that file
    (`::name` alone continues the file before it)."""
    text = (ROOT / "docs" / "errors.md").read_text().split("## Faults and bad inputs tried", 1)[1]
    cited, current = [], None
    for ref in re.findall(r"`((?:test_\w+\.py)?(?:::\w+)?)(?:\[[\w-]+\])?`", text):
        file, _, name = ref.partition("::")
        current = file or current
        cited.append((current, name))
    assert len(cited) > 30
    missing = [f"{file}::{name}" for file, name in cited
               if not (ROOT / "tests" / file).is_file()
               or (name and not re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.M))]
    assert not missing, missing
