"""What every tool shares: its --help, the GPU check's plan, a crash below Python, and the in-process
runner the other tests call the tools through (tests.helpers.run_tool)."""

import logging
from pathlib import Path

import torch

from tests.helpers import run_python, run_tool


def test_help_prints_the_examples_as_written():
    out = run_tool("tools/train.py", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: train.py [-h]")
    # a backslash that ends a line of the docstring shows in the help as it is typed in a shell
    assert "train.init_from=runs/base/checkpoints/best.pt \\\n" in out.stdout


def test_a_usage_error_is_status_2_with_the_usage():
    out = run_tool("tools/evaluate.py", "--ckpt", "model.pt", "--no-such-option")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("usage: evaluate.py")
    assert out.stderr.endswith("evaluate.py: error: unrecognized arguments: --no-such-option\n")


def test_gpu_check_plans_every_step_or_says_why_not(tmp_path):
    listed = run_tool("tools/gpu_check.py", "--out", tmp_path / "out", "--data", "t.parquet,v.parquet", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    steps = dict(line.split("\t", 1) for line in listed.stdout.strip().splitlines())
    assert "tests" in steps and len(steps) >= 2
    assert all(str(tmp_path / "out") in command for command in steps.values())  # every figure in --out
    first, *others = steps
    skipped = run_tool("tools/gpu_check.py", "--out", tmp_path / "out", "--data", "t,v", "--skip", ",".join(others),
                       "--dry-run")
    assert [line.split("\t")[0] for line in skipped.stdout.splitlines()] == [first]
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        refused = run_tool("tools/gpu_check.py", "--out", tmp_path / "out", "--data", "t,v")
        assert refused.returncode == 2 and refused.stderr.startswith("error: no CUDA device here")
        assert not (tmp_path / "out").exists()


def test_a_tool_called_in_this_python_leaves_its_logging_and_surroundings_behind(tmp_path):
    # (that its log lines reach its own stderr: test_runlog's training log)
    root, cwd = logging.getLogger(), Path.cwd()
    before = root.handlers[:], root.level
    for _ in range(2):  # the same one error line each time: no handler of the first call piles up
        out = run_tool("tools/train.py", "--cfg", tmp_path / "missing.yaml")
        assert out.returncode == 2 and out.stderr.count("error: ") == 1, out.stderr
    assert (root.handlers, root.level) == before and Path.cwd() == cwd


def test_a_native_crash_in_a_tool_prints_where_python_was():
    # A tool that dies below Python (here an abort, as glibc does on a damaged heap) must leave
    # the Python stack of the moment on stderr, not just the C library's one line: a real process.
    code = ("import os\nfrom crnn.errors import tool_main\n"
            "def crash_here(argv):\n    os.abort()\n"
            "tool_main(crash_here)()\n")
    out = run_python("-c", code, timeout=120)
    assert out.returncode == -6, out.stderr
    assert "Fatal Python error: Aborted" in out.stderr
    assert "in crash_here" in out.stderr, out.stderr
