"""Faults: kills, signals, damaged or hostile checkpoints, a full disk, NaNs, bad data."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crnn import checkpoint as checkpoint_module
from crnn import trainer
from crnn.checkpoint import load_checkpoint, previous_path, save_checkpoint
from crnn.config import load_config
from crnn.data import Vocab, build_dataset, build_loader, load_records
from crnn.data.images import decode_image
from crnn.decoding import GreedyDecoder
from crnn.engine import TrainingError, evaluate
from crnn.errors import CheckpointError, ConfigError, DataError
from crnn.models import build_model
from crnn.runlog import RunLogger
from crnn.trainer import fit
from tests.helpers import REPO, TINY, read_metrics, run_python, run_tool, synthetic_folder

# 48 lines / batch 8 = 6 steps per epoch, 3 epochs, a checkpoint every 2 steps
KILL_RUN = ["train.epochs=3", "train.checkpoint_every_steps=2", "train.resume=auto"]


def train_args(run_dir, *overrides):
    """The arguments of a tiny tools/train.py run into `run_dir`."""
    return ["tools/train.py", "--cfg", str(TINY), f"train.output_dir={run_dir}", *overrides]


def start_training(run_dir, *overrides, env=None):
    """tools/train.py in a fresh Python, left running: for the tests that signal it from outside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *train_args(run_dir, *overrides)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train(run_dir, *overrides, env=None):
    """tools/train.py in a fresh Python, run to its end or to its death (CRNN_TEST_KILL_IN_SAVE)."""
    return run_python(*train_args(run_dir, *overrides), env={"OMP_NUM_THREADS": "1", **(env or {})})


def train_here(run_dir, *overrides):
    """tools/train.py called in this Python, with the thread count of `train`'s processes."""
    return run_tool(*train_args(run_dir, *overrides), env={"OMP_NUM_THREADS": "1"})


def checkpoint_step(run_dir):
    try:
        return load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    except CheckpointError:
        return -1


def wait_for_step(process, run_dir, step, timeout=120):
    deadline = time.monotonic() + timeout
    while checkpoint_step(run_dir) < step:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.05)


def final_weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_equals_an_unbroken_run(tmp_path):
    unbroken = train_here(tmp_path / "unbroken", *KILL_RUN)
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    run_dir = tmp_path / "broken"
    # 1: killed inside the third checkpoint write (new file written, not yet renamed)
    assert train(run_dir, *KILL_RUN, env={"CRNN_TEST_KILL_IN_SAVE": "3"}).returncode == -signal.SIGKILL
    assert checkpoint_step(run_dir) == 4  # the checkpoint of step 4 survived, intact
    # 2: killed from outside, at whatever it is doing, once step 8 is saved
    process = start_training(run_dir, *KILL_RUN)
    wait_for_step(process, run_dir, 8)
    process.kill()
    process.wait()
    # 3: killed inside the first write after resuming: the end-of-epoch checkpoint
    assert train(run_dir, *KILL_RUN, env={"CRNN_TEST_KILL_IN_SAVE": "1"}).returncode == -signal.SIGKILL
    # 4: runs to the end
    finished = train_here(run_dir, *KILL_RUN)
    assert finished.returncode == 0, finished.stderr[-2000:]
    expected, resumed = final_weights(tmp_path / "unbroken"), final_weights(run_dir)
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
    unbroken_metrics, resumed_metrics = read_metrics(tmp_path / "unbroken"), read_metrics(run_dir)
    assert [m["epoch"] for m in resumed_metrics] == [1, 2, 3]
    for a, b in zip(unbroken_metrics, resumed_metrics, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["val_cer"] == b["val_cer"]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, "train.epochs=200", "train.checkpoint_every_steps=3")
    wait_for_step(process, run_dir, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-6000:]  # a crash's Python stacks too
    assert "stopped by signal 15" in stderr and "train.resume=auto" in stderr
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert stopped["step"] >= 3
    resumed = train_here(run_dir, f"train.epochs={stopped['epoch'] + 1}", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"step {stopped['step']}" in resumed.stderr  # says what it resumed
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == stopped["epoch"] + 1


@pytest.mark.slow
def test_stop_after_minutes_stops_like_a_signal_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    result = train_here(run_dir, "train.epochs=200", "train.stop_after_minutes=0.0001")  # 6 ms
    stderr = result.stderr
    assert result.returncode == 128 + signal.SIGALRM == 142, stderr[-2000:]
    assert "stopped by train.stop_after_minutes=0.0001 at step 2;" in stderr  # the first logging step
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (stopped["step"], stopped["epoch"]) == (2, 0)
    state = fit(load_config(TINY, ["train.epochs=1", "train.resume=auto", f"train.output_dir={run_dir}"]))
    assert (state.step, state.epoch, state.stopped_by) == (6, 1, None)  # 48 lines, batch 8
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]


@pytest.mark.slow
def test_truncated_checkpoint_is_rejected_and_the_previous_one_used(tmp_path):
    run_dir = tmp_path / "run"
    fit(load_config(TINY, ["train.epochs=2", f"train.output_dir={run_dir}"]))
    last = run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(previous_path(last))["epoch"] == 1
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint"):
        load_checkpoint(last)
    state = fit(load_config(TINY, ["train.epochs=3", "train.resume=auto", f"train.output_dir={run_dir}"]))
    assert state.epoch == 3
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]  # epoch 2 redone from epoch 1


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_code_or_from_elsewhere_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "crnn-checkpoint", "version": 1, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a crnn checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "weights": torch.ones(3)}, path, keep_previous=True)

    def full_disk(obj, stream):
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint.*intact"):
        save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path, keep_previous=True)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


@pytest.mark.slow
def test_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    original, calls = trainer.ctc_line_losses, []

    def poisoned(log_probs, *args):  # the second step's losses (main and shortcut) are NaN
        calls.append(1)
        losses = original(log_probs, *args)
        return losses * float("nan") if len(calls) in (3, 4) else losses

    monkeypatch.setattr(trainer, "ctc_line_losses", poisoned)
    fit(load_config(TINY, [f"train.output_dir={tmp_path / 'run'}"]))
    (record,) = read_metrics(tmp_path / "run")
    assert record["bad_steps"] == 1 and record["step"] == 6 and math.isfinite(record["train_loss"])
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())


@pytest.mark.slow
def test_too_many_non_finite_steps_stop_with_a_clear_message(tmp_path):
    cfg = load_config(TINY, ["train.lr=1e30", "train.grad_clip=0", "train.max_bad_steps=2",
                             "train.epochs=20", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match=r"steps in a row had non-finite gradients.*train.max_bad_steps=2"):
        fit(cfg)


def test_image_faults_give_clear_errors(tmp_path, monkeypatch):
    lines = synthetic_folder(tmp_path / "lines", 3)
    data = (lines / "0.png").read_bytes()
    (lines / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated.png: unreadable image"):
        decode_image(lines / "truncated.png", str(lines / "truncated.png"))
    monkeypatch.setattr("crnn.data.images.MAX_PIXELS", 1000)
    with pytest.raises(DataError, match=r"0.png: image of \d+x32 pixels is over the limit of 1000 pixels"):
        decode_image(lines / "0.png", str(lines / "0.png"))


def test_very_wide_line_is_capped_at_max_width(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 2)
    cfg = load_config(TINY, ["data.source=folder", f"data.train={lines}", "data.max_width=40"])
    records = load_records(cfg.data, "train")
    dataset = build_dataset(cfg.data, records, Vocab.from_texts(records.texts), train=False)
    assert dataset[(0, None)].image.shape[-1] == 40 and dataset.widths.tolist() == [40, 40]


def test_evaluation_reports_unreadable_lines_and_scores_the_rest(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 6)
    (lines / "1.png").write_bytes(b"")
    cfg = load_config(TINY, ["data.source=folder", f"data.validation={lines}"])
    records = load_records(cfg.data, "validation")
    vocab = Vocab.from_texts(records.texts)
    model = build_model(cfg.model, len(vocab))
    loader = build_loader(cfg.data, build_dataset(cfg.data, records, vocab, train=False), train=False)
    result = evaluate(model, loader, torch.device("cpu"), {"greedy": GreedyDecoder(vocab)}, show_progress=False)
    assert result.unreadable == 1 and "1.png: empty file (0 bytes), not an image" in result.problems[0]
    assert result.counts["greedy"].lines == 5


def test_check_data_lists_every_problem_with_file_and_line(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 5)
    (lines / "1.png").write_bytes(b"\x89PNG broken")
    (lines / "extra.png").write_bytes((lines / "0.png").read_bytes())
    rows = (lines / "gt.tsv").read_bytes().splitlines()
    rows[0] = b"0.png\t" + b"w" * 300  # far too long for its width
    rows += [b"2.png\t", b"3.png no tab", b"ghost.png\tboo"]
    (lines / "gt.tsv").write_bytes(b"\n".join(rows) + b"\n")
    result = run_tool("tools/check_data.py", "--cfg", TINY, "--splits", "train", "data.source=folder",
                      f"data.train={lines}")
    assert result.returncode == 1, result.stderr
    gt_path = lines / "gt.tsv"
    for expected in (f"{gt_path} line 6: empty transcription", f"{gt_path} line 7: no TAB",
                     f"{gt_path} line 8: image file",
                     "extra.png: image has no entry in gt.tsv", "1.png: unreadable image",
                     "0.png: 300 characters need"):
        assert expected in result.stdout, (expected, result.stdout)
    assert "train: 5 usable lines" in result.stderr


def test_check_data_checks_the_splits_the_config_provides(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    result = run_tool("tools/check_data.py", "--cfg", TINY, "data.source=folder", f"data.train={lines}",
                      f"data.validation={lines}")
    assert result.returncode == 0, result.stderr
    assert "train: 4 usable lines, 0 problem(s)" in result.stderr
    assert "validation: 4 usable lines, 0 problem(s)" in result.stderr and "test:" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="these options are valid on a machine with CUDA")
@pytest.mark.parametrize("override, message", [
    ("train.sync_bn=true", "'train.sync_bn=true' needs CUDA"),
    ("train.data_parallel=true", "'train.data_parallel=true' needs CUDA"),
    ("train.device=cuda", "no CUDA device is available"),
])
def test_impossible_device_options_are_refused_before_any_work(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        fit(load_config(TINY, [override, f"train.output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_metrics_of_an_interrupted_epoch_are_not_duplicated(tmp_path):
    run_dir = tmp_path / "run"
    fit(load_config(TINY, ["train.epochs=2", f"train.output_dir={run_dir}"]))
    # as if the run had died after logging epoch 2 but before its checkpoint replaced epoch 1's
    last = run_dir / "checkpoints" / "last.pt"
    os.replace(previous_path(last), last)
    fit(load_config(TINY, ["train.epochs=2", "train.resume=auto", f"train.output_dir={run_dir}"]))
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]


def test_only_the_main_rank_rewrites_metrics_and_never_in_place(tmp_path, monkeypatch):
    lines = "".join(json.dumps({"epoch": epoch}) + "\n" for epoch in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(lines)
    RunLogger(tmp_path, enabled=False).truncate_metrics(1)  # another rank: leaves the file alone
    assert (tmp_path / "metrics.jsonl").read_text() == lines
    opened = []
    original_open = open

    def watching_open(path, mode="r", *args, **kwargs):
        opened.append((Path(path).name, mode))
        return original_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)
    monkeypatch.setattr("io.open", watching_open)  # what Path.write_text opens with
    RunLogger(tmp_path, enabled=True).truncate_metrics(2)
    assert (tmp_path / "metrics.jsonl").read_text() == lines.rsplit('{"epoch": 3}', 1)[0]
    assert ("metrics.jsonl", "w") not in opened and any(name.endswith(".tmp") for name, _ in opened)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_out_of_memory_is_one_error_line_naming_the_keys_that_lower_it(capsys):
    from crnn.errors import tool_main

    @tool_main
    def main(argv=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower data.batch_size")
    assert "Traceback" not in err and err.count("\n") == 1
