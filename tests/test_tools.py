"""The tools' --help: the example commands in each tool's docstring print as they are written."""

import ast
import re

import pytest

from tests.helpers import REPO, run_tool

TOOLS = sorted((REPO / "tools").glob("*.py"))


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.stem)
def test_docstring_keeps_its_line_continuations(tool):
    # A backslash at the end of a line in a plain docstring joins the lines; the help then shows
    # one command smeared over a run of spaces. Every such line must survive as written.
    doc = ast.get_docstring(ast.parse(tool.read_text(encoding="utf-8")), clean=False)
    assert doc, f"{tool.name} has no module docstring"
    smeared = [line for line in doc.splitlines() if re.search(r"\S {5,}[^\s#]", line.strip())]
    assert not smeared, f"{tool.name}: {smeared}"
    source_continuations = tool.read_text(encoding="utf-8").split('"""')[1].count("\\\n")
    assert doc.count("\\\n") == source_continuations


def test_help_prints_the_examples():
    out = run_tool(TOOLS[0].parent / "train.py", "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train.init_from=runs/base/checkpoints/best.pt \\\n" in out.stdout
