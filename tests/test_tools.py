"""The tools' --help: the example commands in each tool's docstring print as they are written."""

import ast
import re

import pytest
import torch

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


def test_gpu_check_runs_every_gpu_step_or_says_why_not(tmp_path):
    listed = run_tool("tools/gpu_check.py", "--out", tmp_path / "out", "--data", "train.parquet,val.parquet",
                      "--dry-run", timeout=120)
    assert listed.returncode == 0, listed.stderr
    steps = dict(line.split("\t", 1) for line in listed.stdout.strip().splitlines())
    assert list(steps) == ["tests", "loop", "loop_muon", "loop_channels_last", "referee"]
    assert "tests/test_cuda.py" in steps["tests"]
    assert "--loop" in steps["loop"] and "--cfg experiments/candidates/strided.yaml" in steps["loop"]
    assert steps["loop_muon"].endswith("/out/loop_muon.json data.height=128 data.num_workers=12 train.optimizer=muon")
    assert "--cfg experiments/base.yaml --device cuda --loop" in steps["loop_muon"]
    assert steps["loop_channels_last"].endswith("/out/loop_channels_last.json data.height=128 data.num_workers=12 "
                                                "train.memory_format=channels_last")
    assert "--budget-minutes 1 " in steps["referee"] and "--data train.parquet,val.parquet" in steps["referee"]
    skipped = run_tool("tools/gpu_check.py", "--out", tmp_path / "out", "--data", "t,v", "--skip", "tests,loop_muon,loop_channels_last,referee",
                       "--dry-run", timeout=120)
    assert [line.split("\t")[0] for line in skipped.stdout.splitlines()] == ["loop"]
    if not torch.cuda.is_available():
        refused = run_tool("tools/gpu_check.py", "--out", tmp_path / "out", "--data", "t,v", timeout=120)
        assert refused.returncode == 2 and refused.stderr.startswith("error: no CUDA device here")
        assert not (tmp_path / "out").exists()


def test_a_native_crash_in_a_tool_prints_where_python_was():
    # A tool that dies below Python (here an abort, as glibc does on a damaged heap) must leave
    # the Python stack of the moment on stderr, not just the C library's one line.
    code = ("import os\nfrom crnn.errors import tool_main\n"
            "def crash_here(argv):\n    os.abort()\n"
            "tool_main(crash_here)()\n")
    out = run_tool("-c", code, timeout=120)
    assert out.returncode == -6, out.stderr
    assert "Fatal Python error: Aborted" in out.stderr
    assert "in crash_here" in out.stderr, out.stderr
