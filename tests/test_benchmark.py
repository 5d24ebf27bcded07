"""tools/benchmark.py end to end on the tiny config (numbers are machine-dependent; their presence,
sign and consistency are what is checked here -- the targets are checked by running the tool)."""

import json
import subprocess
import sys

from crnn.benchmark import batches_for, make_lines
from crnn.config import load_config
from crnn.data import Vocab
from tests.conftest import REPO, TINY
from tests.test_training import synthetic_folder


def test_lines_have_realistic_widths_and_each_config_its_own_preprocessing():
    lines = make_lines(6, height=64)
    assert all(image.height == 64 and 400 < image.width < 2500 for image in lines.images)
    vocab = Vocab.from_texts(lines.texts)
    kept = batches_for(load_config(TINY), lines, vocab, batch_size=4)
    squashed = batches_for(load_config(TINY, ["data.resize=squash", "data.width=300"]), lines, vocab, 4)
    assert sorted(w for b in kept for w in b.widths.tolist()) == sorted(round(i.width / 2) for i in lines.images)
    assert all(b.images.shape[-2:] == (32, 300) for b in squashed)
    assert sum(len(b) for b in kept) == 6


def test_speed_mode_reports_every_figure(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--cfg", str(TINY), "--cfg", str(TINY),
                             "--lines", "4", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                             "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [row["config"] for row in rows] == ["tiny", "tiny"]
    for key in ("train_fp32_lines_per_s", "train_bf16_lines_per_s", "infer_fp32_greedy_lines_per_s",
                "infer_fp32_beam_lines_per_s", "infer_bf16_greedy_lines_per_s", "train_memory_mb",
                "gflops_per_line"):
        assert rows[0][key] > 0, key
    assert rows[0]["params_m"] == rows[1]["params_m"] < 0.1
    assert "| tiny |" in result.stdout  # the table


def test_budget_mode_trains_each_config_for_the_budget(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 8)
    out = tmp_path / "budget.json"
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--cfg", str(TINY), "--budget-minutes", "0.05",
                             "--data", f"{lines},{lines}", "--output", str(tmp_path / "runs"), "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "INFO done: best validation CER" in result.stderr  # the training process logs like train.py
    (row,) = json.loads(out.read_text())
    assert row["steps"] >= 1 and row["epochs"] >= 1
    assert 0.0 <= row["best_val_cer"] <= row["final_val_cer"]
    assert row["train_seconds"] <= 0.05 * 60 + 10  # stops at the budget (one step may overrun it)
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert min(m["val_cer"] for m in metrics) == row["best_val_cer"]


def test_budget_mode_reports_a_config_error_from_its_training_process(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--cfg", str(TINY), "--budget-minutes", "0.05",
                             "--data", f"{lines},{lines}", "--output", str(tmp_path / "runs"), "train.bogus=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "tiny.yaml" in result.stderr and "train.bogus" in result.stderr
