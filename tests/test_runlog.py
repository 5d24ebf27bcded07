"""Logs a person can read: progress as a line every few seconds in a log file, a live bar on a
terminal, and no carriage-return flood in a training log."""

import logging
import sys

import pytest
from tqdm import tqdm

from crnn.runlog import LogProgress, progress
from tests.helpers import TINY, run_tool


def test_progress_in_a_log_file_is_a_line_every_interval(caplog):
    bar = LogProgress(range(4), "epoch 3", interval=0.0)
    with caplog.at_level(logging.INFO, logger="crnn"):
        for done, _ in enumerate(bar, start=1):
            bar.set_postfix(loss="1.500")
            assert bar.done == done - 1  # counted once the item has been handled
    assert [record.getMessage() for record in caplog.records] == [
        f"epoch 3: {done}/4 ({done / 4:.0%}) in 0s loss=1.500" for done in range(1, 5)]
    quiet = LogProgress(iter(range(100)), "validate", interval=3600.0)
    with caplog.at_level(logging.INFO, logger="crnn"):
        caplog.clear()
        assert sum(quiet) == sum(range(100))
    assert caplog.records == [] and quiet.line(12.0) == "validate: 100 in 12s"  # no total: no percent


def test_progress_is_a_live_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert isinstance(progress(range(3), "epoch 1"), LogProgress)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert isinstance(progress(range(3), "epoch 1"), tqdm)
    hidden = progress(range(3), "epoch 1", enabled=False)  # other ranks: nothing at all
    assert isinstance(hidden, tqdm) and hidden.disable and list(hidden) == [0, 1, 2]


@pytest.mark.slow
def test_a_training_log_written_to_a_file_has_no_carriage_returns(tmp_path):
    result = run_tool("tools/train.py", "--cfg", TINY, "train.epochs=2", f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    epochs = [line for line in result.stderr.splitlines() if " INFO epoch " in line and "train_loss" in line]
    assert len(epochs) == 2 and len(result.stderr.splitlines()) < 30, result.stderr
