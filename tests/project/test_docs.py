"""The README and docs/ say what the code does: the README stays short and keeps the two set-up commands, every
relative link (file and #anchor) resolves, and every `e5v VERB ...` command in a shell block parses."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from e5v.cli import build_parser

from support import ROOT
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_the_readme_is_short_and_keeps_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    assert "bash scripts/setup.sh && .venv/bin/e5v demo" in readme
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest tests -p no:cacheprovider" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(link)
    assert not broken, f"{page.name}: broken links {broken}"


def commands(page: Path):
    """The `e5v ...` command lines of a page's shell blocks (continuation lines joined, comments cut)."""
    for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            m = re.search(r"(?:^|[\s/])e5v(?:\.cli)?\s+(\S.*)$", line.strip())
            if m and not line.lstrip().startswith("#"):
                yield m.group(1)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_in_a_shell_block_parses(page):
    parser = build_parser()
    failures = []
    for command in commands(page):
        argv = shlex.split(command, comments=True)
        for stop in ("|", "&&", ">", "<"):
            argv = argv[:argv.index(stop)] if stop in argv else argv
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                failures.append(f"e5v {command}: {err.getvalue().strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)
