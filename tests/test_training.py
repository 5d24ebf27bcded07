"""Training end to end on data the tests make: overfitting, resuming, the run directory, faults."""

import math

import pytest
import torch

from crnn import trainer
from crnn.checkpoint import load_checkpoint
from crnn.config import load_config
from crnn.data import Batch
from crnn.distributed import DistInfo
from crnn.engine import TrainingError
from crnn.errors import ConfigError
from crnn.inference import load_trained_model
from crnn.trainer import fit
from tests.helpers import TINY, overfit_config, read_metrics, run_tool, synthetic_folder

pytestmark = pytest.mark.slow

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def test_tiny_model_overfits_a_few_lines_to_zero_cer(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    run_dir = tmp_path / "run"
    fit(overfit_config(lines, run_dir, "train.epochs=150"))
    metrics = read_metrics(run_dir)
    assert min(m["val_cer"] for m in metrics) == 0.0, metrics[-1]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 20
    trained = load_trained_model(run_dir / "checkpoints" / "best.pt", device="cpu")
    assert trained.model.training is False and len(trained.vocab) > 1


# (epoch, val_loss, train_loss) of a seeded run: a refactor must not change what a run computes.
# One batch per epoch (its lines do not depend on the width grouping), padded to the widest line.
PINNED_CURVE = [(1, 53.74966, 54.56882), (2, 51.79063, 53.19567), (3, 47.97137, 37.60564), (4, 38.40256, 25.27775),
                (5, 24.28121, 20.07287), (6, 19.41181, 19.66017), (7, 18.79683, 20.20428), (8, 18.70391, 20.03993)]


def test_a_seeded_run_reproduces_its_pinned_curve(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    fit(load_config(TINY, ["data.source=folder", f"data.train={lines}", f"data.validation={lines}",
                           "data.batch_size=4", "train.epochs=8", "train.lr=1e-2", "train.min_lr_ratio=1",
                           "train.warmup_steps=2", "data.width_multiple=1", f"train.output_dir={tmp_path / 'run'}"]))
    curve = [(m["epoch"], m["val_loss"], m["train_loss"]) for m in read_metrics(tmp_path / "run")]
    assert [epoch for epoch, _, _ in curve] == [epoch for epoch, _, _ in PINNED_CURVE]
    # channels_last sums BatchNorm's weight gradients in an order oneDNN picks per instruction set
    for (_, val_loss, train_loss), (_, pinned_val, pinned_train) in zip(curve, PINNED_CURVE, strict=True):
        assert val_loss == pytest.approx(pinned_val, rel=2e-3) and train_loss == pytest.approx(pinned_train, rel=2e-3)


@pytest.mark.parametrize("variant", [[], ["train.optimizer=muon", "train.checkpoint_every_steps=4"]],
                         ids=["adamw", "muon"])
def test_resume_continues_exactly_like_an_unbroken_run(tmp_path, variant):
    common = ["train.epochs=2", "data.synthetic.train=24", "data.synthetic.validation=8", *variant]
    fit(load_config(TINY, [*common, f"train.output_dir={tmp_path / 'unbroken'}"]))
    fit(load_config(TINY, [*common, "train.epochs=1", f"train.output_dir={tmp_path / 'broken'}"]))
    fit(load_config(TINY, [*common, "train.resume=auto", f"train.output_dir={tmp_path / 'broken'}"]))
    unbroken, resumed = read_metrics(tmp_path / "unbroken"), read_metrics(tmp_path / "broken")
    assert [m["epoch"] for m in resumed] == [1, 2]
    assert resumed[1]["train_loss"] == pytest.approx(unbroken[1]["train_loss"], rel=1e-6)
    assert resumed[1]["val_cer"] == unbroken[1]["val_cer"]
    weights_a = load_checkpoint(tmp_path / "unbroken" / "checkpoints" / "last.pt")["model"]
    weights_b = load_checkpoint(tmp_path / "broken" / "checkpoints" / "last.pt")["model"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.allclose(weights_a[k].float(), weights_b[k].float(), atol=1e-6) for k in weights_a)


def test_a_run_stopped_by_a_signal_mid_epoch_resumes_like_an_unbroken_run(tmp_path):
    """Stopped at a logging step in the middle of epoch 1 (as by SIGTERM), then resumed."""
    common = ["train.epochs=1", "data.synthetic.train=48", "data.synthetic.validation=8", "train.log_every=2"]
    fit(load_config(TINY, [*common, f"train.output_dir={tmp_path / 'unbroken'}"]))
    cfg = load_config(TINY, [*common, f"train.output_dir={tmp_path / 'broken'}"])
    run = trainer.build_run(cfg, CPU)
    state = trainer.train(run, deadline=0.0)  # the deadline has passed: stop at the first logging step
    assert state.stopped_by is not None and state.step == 2 and state.epoch == 0
    fit(load_config(TINY, [*common, "train.resume=auto", f"train.output_dir={tmp_path / 'broken'}"]))
    (unbroken,), (resumed,) = read_metrics(tmp_path / "unbroken"), read_metrics(tmp_path / "broken")
    assert resumed["step"] == unbroken["step"] == 6
    assert resumed["train_loss"] == pytest.approx(unbroken["train_loss"], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(unbroken["val_loss"], rel=1e-6)


def test_train_tool_writes_every_run_directory_file(tmp_path):
    run_dir = tmp_path / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, f"train.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert load_config(run_dir / "config.yaml").train.output_dir == str(run_dir)
    assert len((run_dir / "train_texts.txt").read_text().splitlines()) == 48  # for the beam-search LM
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run_dir / "checkpoints" / name)
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_cer", "config",
                "vocab", "rng"} <= set(state)
        assert state["epoch"] == 1 and state["config"]["data"]["height"] == 32
    (record,) = read_metrics(run_dir)
    assert {"epoch", "train_loss", "val_loss", "val_cer", "val_wer", "lr", "lines_per_s"} <= set(record)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/shortcut_loss", "train/lr", "train/lines_per_s", "val/loss",
            "val/cer", "val/wer"} <= scalars
    assert {"val_samples/0", "val_samples/1"} <= set(events.Tags()["images"])


def test_unreadable_and_too_long_lines_are_skipped_and_counted(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 6)
    (lines / "2.png").write_bytes(b"not a png")
    gt = (lines / "gt.tsv").read_text().splitlines()
    gt[3] = "3.png\t" + "x" * 200  # far more characters than the image has columns
    (lines / "gt.tsv").write_text("\n".join(gt) + "\n")
    cfg = load_config(TINY, ["data.source=folder", f"data.train={lines}", f"data.validation={lines}",
                             f"train.output_dir={tmp_path / 'run'}"])
    fit(cfg)
    (record,) = read_metrics(tmp_path / "run")
    assert record["skipped_unreadable"] == 1 and record["skipped_too_long"] == 1
    assert math.isfinite(record["train_loss"])


def test_non_finite_steps_leave_the_weights_finite_then_stop_the_run(tmp_path, monkeypatch):
    """A step whose gradients are NaN changes no weight into NaN; more than train.max_bad_steps of
    them in a row stop the run with a TrainingError at the next logging step."""
    original = trainer.ctc_line_losses

    def poisoned(log_probs, *args):
        return original(log_probs, *args) * float("nan")

    cfg = load_config(TINY, ["train.max_bad_steps=2", "train.log_every=3", f"train.output_dir={tmp_path / 'run'}"])
    run = trainer.build_run(cfg, CPU)
    monkeypatch.setattr(trainer, "ctc_line_losses", poisoned)
    with pytest.raises(TrainingError, match="3 training steps in a row had non-finite gradients"):
        trainer.train(run)
    assert run.state.step == 3
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_fp16_on_cpu_and_existing_run_are_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match="'train.amp=fp16' needs a CUDA device"):
        fit(load_config(TINY, ["train.amp=fp16", f"train.output_dir={tmp_path / 'a'}"]))
    assert not (tmp_path / "a").exists()
    fit(load_config(TINY, [f"train.output_dir={tmp_path / 'b'}"]))
    with pytest.raises(ConfigError, match="already holds a run.*train.resume=auto"):
        fit(load_config(TINY, [f"train.output_dir={tmp_path / 'b'}"]))


def test_early_stopping_follows_patience(tmp_path):
    cfg = load_config(TINY, ["train.epochs=6", "train.patience=1", "train.lr=1e-6",
                             f"train.output_dir={tmp_path / 'run'}"])
    state = fit(cfg)
    cers = [m["val_cer"] for m in read_metrics(tmp_path / "run")]
    best, stale, expected = float("inf"), 0, 6
    for epoch, cer in enumerate(cers, start=1):
        stale = 0 if cer < best else stale + 1
        best = min(best, cer)
        if stale >= 1:
            expected = epoch
            break
    assert len(cers) == expected < 6  # stopped, and exactly when the rule says
    assert state.epoch == len(cers) and state.best_cer == min(cers)


def test_max_steps_ends_the_schedule_and_the_run_mid_epoch(tmp_path):
    cfg = load_config(TINY, ["train.epochs=5", "train.max_steps=9", "train.warmup_steps=2",
                             f"train.output_dir={tmp_path / 'run'}"])
    state = fit(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert state.step == 9 and [m["epoch"] for m in metrics] == [1, 2]  # 6 steps an epoch: cut in the second
    assert metrics[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)


def test_max_minutes_is_a_guard_that_stops_with_a_validated_checkpoint(tmp_path):
    state = fit(load_config(TINY, ["train.epochs=1000", "train.max_minutes=0.001", "train.log_every=1",
                                   f"train.output_dir={tmp_path / 'run'}"]))
    assert state.stopped_by is None and state.step < 6 and state.epoch == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"] == 1


def test_a_cpu_run_trains_its_convolutions_in_channels_last(tmp_path):
    run = trainer.build_run(load_config(TINY, [f"train.output_dir={tmp_path / 'run'}"]), CPU)
    convolutions = [p for p in run.model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1)]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    trainer.shut_down(run.train_loader)


def test_a_ddp_placeholder_batch_is_a_valid_ctc_line():
    blank = Batch.blank(32, 32)
    assert len(blank) == 1 and blank.target_lengths.tolist() == [0] and blank.widths.tolist() == [32]
