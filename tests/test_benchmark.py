"""tools/benchmark.py end to end on the tiny config (numbers are machine-dependent; their presence,
sign and consistency are what is checked here -- the targets are checked by running the tool)."""

import json
import logging
import time

import pyarrow.parquet as pq
import pytest
import torch

from crnn import benchmark, device
from crnn.benchmark import batches_for, budget_row, make_lines, speed_row
from crnn.checkpoint import load_checkpoint
from crnn.config import load_config
from crnn.data import Vocab
from crnn.device import resolve_amp
from crnn.engine import TrainSetup
from crnn.errors import ConfigError, CrnnError
from tests.helpers import TINY, read_metrics, run_tool, synthetic_folder


def test_lines_have_realistic_widths_and_each_config_its_own_preprocessing():
    lines = make_lines(6, height=64)
    assert all(image.height == 64 and 400 < image.width < 2500 for image in lines.images)
    vocab = Vocab.from_texts(lines.texts)
    kept = batches_for(load_config(TINY), lines, vocab, batch_size=4)
    squashed = batches_for(load_config(TINY, ["data.resize=squash", "data.width=300"]), lines, vocab, 4)
    assert sorted(w for b in kept for w in b.widths.tolist()) == sorted(round(i.width / 2) for i in lines.images)
    assert all(b.images.shape[-2:] == (32, 320) and b.widths.tolist() == [300] * len(b) for b in squashed)  # 5 x 64
    assert sum(len(b) for b in kept) == 6


def test_speed_mode_reports_every_figure(tmp_path):
    out = tmp_path / "speed.json"
    result = run_tool("tools/benchmark.py", "--cfg", TINY, "--cfg", TINY, "--lines", "4", "--batch-size", "2",
                      "--repeats", "1", "--warmup", "0", "--amp", "bf16", "--json", out)
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
    result = run_tool("tools/benchmark.py", "--cfg", TINY, "--budget-minutes", "0.05", "--data", f"{lines},{lines}",
                      "--output", tmp_path / "runs", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "INFO done: best validation CER" in result.stderr  # the training process logs like train.py
    (row,) = json.loads(out.read_text())
    assert row["steps"] >= 1 and row["epochs"] >= 1
    assert 0.0 <= row["best_val_cer"] <= row["final_val_cer"]
    assert row["train_seconds"] <= 0.05 * 60 + 10  # stops at the budget (one step may overrun it)
    metrics = read_metrics(tmp_path / "runs" / "tiny")
    assert min(m["val_cer"] for m in metrics) == row["best_val_cer"]


def test_startup_mode_measures_the_start_and_the_memory_of_real_runs(tmp_path, parquet_split):
    train, _ = parquet_split("train.parquet", ("abc", "hello", "the cat", "a dog"))
    out = tmp_path / "startup.json"
    result = run_tool("tools/benchmark.py", "--startup", "--cfg", TINY, "--scale", "40", "--steps", "20",
                      "--data", f"{train},{train}", "--output", tmp_path / "startup", "--json", out,
                      "data.num_workers=1", "data.batch_size=2")
    assert result.returncode == 0, result.stderr
    first, again = json.loads(out.read_text())
    assert [row["run"] for row in (first, again)] == ["40 lines, first", "40 lines, again"]
    # the repeated training file and the validation file are indexed the first time, reused after
    assert (first["index"], first["indexes_built"], again["index"], again["indexes_built"]) == ("built", 2, "reused", 0)
    assert pq.ParquetFile(tmp_path / "startup" / "train-40.parquet").metadata.num_rows == 40
    for row in (first, again):
        assert 0 < row["first_step_s"] < 120
        assert 50 < row["rank_private_mb"] < 4000 and 0 < row["worker_private_mb"] < 4000  # a rank and its worker
    assert "| 40 lines, again | 1 | reused |" in result.stdout


class Outbox:
    """Stands in for the pipe of a budget child run in this process."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def close(self):
        pass


def in_this_process(target, what, args):
    outbox = Outbox()
    target(*args, outbox, logging.INFO)
    (outcome,) = outbox.sent
    if outcome[0] == "error":
        raise CrnnError(f"{what}: {outcome[1]}")
    return outcome


def test_budget_run_paused_by_the_deadline_continues_where_it_stopped(tmp_path, monkeypatch):
    lines = synthetic_folder(tmp_path / "lines", 16)  # batch 8: 2 steps an epoch
    data = ["data.source=folder", f"data.train={lines}", f"data.validation={lines}"]
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "tiny"
    monkeypatch.setattr(benchmark, "_in_fresh_process", in_this_process)  # so that the patches below reach it
    # 2 minutes -> 12 steps: the minutes do not bind on a loaded machine, the planned steps do
    monkeypatch.setattr(benchmark, "calibrate_steps_per_second", lambda cfg: 0.1)
    monkeypatch.setattr(benchmark, "minutes_left", lambda deadline: 1e-6)  # the deadline falls in step 1
    paused = budget_row(str(TINY), data, 2.0, runs, deadline=time.time() + 3600)
    assert (paused["status"], paused["steps"], paused["planned_steps"]) == ("paused", 1, 12)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 1
    assert json.loads((run_dir / "budget.json").read_text())["steps"] == 12
    monkeypatch.undo()
    monkeypatch.setattr(benchmark, "_in_fresh_process", in_this_process)
    monkeypatch.setattr(benchmark, "calibrate_steps_per_second", lambda cfg: pytest.fail("calibrated again"))
    done = budget_row(str(TINY), data, 2.0, runs)  # no deadline: runs to the planned steps
    assert (done["status"], done["steps"], done["planned_steps"], done["epochs"]) == ("done", 12, 12, 6)
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert min(m["val_cer"] for m in read_metrics(run_dir)) == done["best_val_cer"]
    monkeypatch.setattr(benchmark, "fit", lambda cfg: pytest.fail("trained again"))
    assert budget_row(str(TINY), data, 2.0, runs) == done  # a finished config is read back
    with pytest.raises(CrnnError, match=r"holds a budget run of 2 minutes .* not 0.5 minutes"):
        budget_row(str(TINY), data, 0.5, runs)
    late = budget_row(str(TINY), data, 0.5, tmp_path / "other", deadline=time.time() - 1)
    assert late == {"config": "tiny", "minutes": 0.5, "status": "not started"}


def test_budget_mode_reports_a_config_error_from_its_training_process(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    result = run_tool("tools/benchmark.py", "--cfg", TINY, "--budget-minutes", "0.05", "--data", f"{lines},{lines}",
                      "--output", tmp_path / "runs", "train.bogus=1")
    assert result.returncode == 2
    assert "tiny.yaml" in result.stderr and "train.bogus" in result.stderr


@pytest.mark.parametrize(("native", "pays"), [(True, True), (True, False), (False, True), (None, True)],
                         ids=["bf16 kernels, faster", "bf16 kernels, slower", "emulated", "unknown"])
def test_amp_auto_on_a_cpu_is_bf16_only_where_its_bf16_kernels_train_faster(monkeypatch, native, pays):
    monkeypatch.setattr(device, "cpu_runs_bf16_natively", lambda: native)
    monkeypatch.setattr(device, "cpu_bf16_pays", lambda: pays)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native and pays else None
    assert resolve_amp("auto", cpu) is expected
    setup = TrainSetup.from_config(load_config(TINY, ["train.amp=auto"]), model=torch.nn.Linear(2, 2), device=cpu,
                                   total_steps=1)
    assert setup.amp_dtype is expected


def test_amp_auto_means_the_same_in_training_and_in_the_benchmark(monkeypatch):
    monkeypatch.setattr(device, "cpu_runs_bf16_natively", lambda: False)
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None  # training's meaning on a CPU without bf16 kernels: float32
    row = speed_row(str(TINY), make_lines(2, height=32), cpu, batch_size=2, repeats=1, warmup=0, amp="auto")
    assert "train_fp32_lines_per_s" in row and not [key for key in row if "bf16" in key or "fp16" in key]
    row = speed_row(str(TINY), make_lines(2, height=32), cpu, batch_size=2, repeats=1, warmup=0, amp="bf16")
    assert row["train_bf16_lines_per_s"] > 0 and row["infer_bf16_greedy_lines_per_s"] > 0
    with pytest.raises(ConfigError, match="'--amp=fp16' needs a CUDA device"):
        resolve_amp("fp16", cpu, key="--amp")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_kept_with_a_warning(monkeypatch, caplog, native):
    monkeypatch.setattr(device, "cpu_runs_bf16_natively", lambda: native)
    monkeypatch.setattr(device, "_bf16_warning_given", False)
    with caplog.at_level(logging.WARNING, logger="crnn"):
        assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16  # the user's choice holds
        assert resolve_amp("bf16", torch.device("cpu"), key="--amp") is torch.bfloat16
    warnings = [record.getMessage() for record in caplog.records if "emulates bf16" in record.getMessage()]
    assert len(warnings) == (0 if native else 1)  # once per process, not once per call
    if not native:
        assert warnings[0].startswith("train.amp=bf16 on a CPU without bf16 kernels")
        assert "train.amp=auto runs in float32 on such a CPU" in warnings[0]


def test_train_setup_takes_every_setting_from_the_config():
    cfg = load_config(TINY, ["train.grad_clip=2.5", "train.max_bad_steps=7", "train.oom_retry=false",
                             "model.shortcut_weight=0.3", "train.lr=0.02", "train.warmup_steps=0"])
    setup = TrainSetup.from_config(cfg, model=torch.nn.Linear(2, 2), device=torch.device("cpu"), total_steps=10)
    assert (setup.grad_clip, setup.max_bad_steps, setup.oom_retry, setup.shortcut_weight) == (2.5, 7, False, 0.3)
    assert setup.scheduler.get_last_lr()[0] == pytest.approx(0.02)
    no_shortcut = load_config(TINY, ["model.shortcut=false"])
    assert TrainSetup.from_config(no_shortcut, model=torch.nn.Linear(2, 2), device=torch.device("cpu"),
                                  total_steps=10).shortcut_weight == 0.0


def test_loop_mode_times_the_real_loop_against_the_model_alone(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 24)
    out = tmp_path / "loop.json"
    # --amp is every config's train.amp here (tiny.yaml's own is off)
    result = run_tool("tools/benchmark.py", "--cfg", TINY, "--loop", "--steps", "4", "--warmup", "2", "--warm-epoch",
                      "--data", f"{lines},{lines}", "--device", "cpu", "--amp", "bf16", "--json", out,
                      "data.num_workers=1", "data.batch_size=4")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())
    assert row["steps"] == 4 and row["lines"] == 16 and row["workers"] == 1 and row["augment"]
    assert row["precision"] == "bf16"
    assert row["loop_lines_per_s"] > 0 and row["model_lines_per_s"] > 0
    assert 0.0 <= row["data_wait_fraction"] < 1.0 and 0.0 <= row["padding_fraction"] < 1.0
    assert 1 <= row["distinct_shapes"] <= 4
    assert row["cached_lines_at_start"] == 24  # a whole epoch first: every line decoded once
    assert "| tiny | bf16 | 4 |" in result.stdout
