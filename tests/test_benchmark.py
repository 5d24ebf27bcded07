"""tools/benchmark.py on the tiny config: each mode gives its rows with real figures (their values
depend on the machine; the targets are checked by running the tool)."""

import json

import pytest
import torch

from crnn.benchmark import make_lines, speed_row
from tests.helpers import TINY, run_tool, synthetic_folder


@pytest.mark.slow
def test_speed_row_times_training_and_inference_in_float32_and_bf16():
    row = speed_row(str(TINY), make_lines(4, height=32), torch.device("cpu"), batch_size=2, repeats=1, warmup=0,
                    amp="bf16")
    assert row["config"] == "tiny" and 0 < row["params_m"] < 0.1
    for key in ("gflops_per_line", "train_fp32_lines_per_s", "train_bf16_lines_per_s", "train_memory_mb",
                "infer_fp32_greedy_lines_per_s", "infer_bf16_greedy_lines_per_s"):
        assert row[key] > 0, key


@pytest.mark.slow
def test_speed_mode_compares_configs_on_the_same_lines(tmp_path):
    out = tmp_path / "speed.json"
    result = run_tool("tools/benchmark.py", "--cfg", TINY, "--cfg", TINY, "--lines", "4", "--batch-size", "2",
                      "--repeats", "1", "--warmup", "0", "--amp", "off", "--json", out)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(out.read_text())
    assert first["params_m"] == second["params_m"] and first["mean_width"] == second["mean_width"]
    assert first["train_fp32_lines_per_s"] > 0 and not [key for key in first if "bf16" in key]  # --amp off: fp32 alone
    assert "| tiny |" in result.stdout


@pytest.mark.slow
def test_loop_mode_runs_the_real_loop_for_the_steps_asked(tmp_path):
    lines, out = synthetic_folder(tmp_path / "lines", 24), tmp_path / "loop.json"
    # 24 lines in batches of 4: 8 steps run into a second epoch
    result = run_tool("tools/benchmark.py", "--loop", "--cfg", TINY, "--steps", "8", "--warmup", "1", "--json", out,
                      "data.source=folder", f"data.train={lines}", f"data.validation={lines}", "data.batch_size=4",
                      "data.num_workers=1")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())
    assert (row["steps"], row["workers"], row["precision"]) == (8, 1, "fp32")
    assert 0 < row["lines"] <= 32 and row["loop_lines_per_s"] > 0 and row["model_lines_per_s"] > 0
    assert 4 <= row["cached_lines_at_start"] <= 24  # the warm-up step's lines at least (decoded once)


def test_decoding_mode_times_each_decoder_on_a_checkpoint(tmp_path, checkpoint):
    out = tmp_path / "decoding.json"
    result = run_tool("tools/benchmark.py", "--decoding", checkpoint, "--workers", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [row["decoder"] for row in rows] == ["forward + greedy", "greedy", "beam", "beam_lm"]
    assert all(row["lines"] == 16 and row["lines_per_s"] > 0 for row in rows)
    assert all(0.0 <= row["cer"] for row in rows[1:])


@pytest.mark.slow
def test_startup_mode_measures_the_start_and_memory_of_real_runs(tmp_path, parquet_split):
    train, _ = parquet_split("train.parquet", ("abc", "hello", "the cat", "a dog"))
    out = tmp_path / "startup.json"
    result = run_tool("tools/benchmark.py", "--startup", "--cfg", TINY, "--scale", "40", "--steps", "3",
                      "--output", tmp_path / "startup", "--json", out, "data.source=parquet", f"data.train={train}",
                      f"data.validation={train}", "data.num_workers=1", "data.batch_size=2")
    assert result.returncode == 0, result.stderr
    first, again = json.loads(out.read_text())
    # the repeated training split and the validation split are indexed the first time, reused after
    assert [(row["run"], row["index"], row["indexes_built"]) for row in (first, again)] == [
        ("first", "built", 2), ("again", "reused", 0)]
    for row in (first, again):
        assert row["lines"] == 40 and 0 < row["first_step_s"] < 120
        assert 50 < row["rank_private_mb"] < 4000 and 0 < row["worker_private_mb"] < 4000
