"""Training end to end on data the tests make: overfitting, resuming, the run directory, faults."""

import pytest
import torch

from crnn.checkpoint import load_checkpoint
from crnn.config import load_config
from crnn.decoding import GreedyDecoder
from crnn.engine import evaluate
from crnn.errors import ConfigError
from crnn.trainer import fit
from tests.helpers import TINY, overfit_tiny, read_metrics, run_tool, synthetic_folder


def test_tiny_model_overfits_a_few_lines_to_zero_cer(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    # one step per epoch: about 100 steps are needed
    cfg, records, vocab, model, loader, (first, stats) = overfit_tiny(lines, 300, 0.2)
    result = evaluate(model, loader, torch.device("cpu"), {"greedy": GreedyDecoder(vocab)},
                      keep_predictions=True, show_progress=False)
    assert result.counts["greedy"].cer == 0.0, result.predictions
    assert sorted(hyp for _, _, hyp in result.predictions["greedy"]) == sorted(records.texts)
    assert stats.loss < first.loss / 100


# (epoch, val_loss, train_loss) of a seeded run, recorded before the run state, the sample contract
# and the config checks were rewritten, and while augmentation still ran per line in the DataLoader
# workers on float images: a refactor must not change what a run computes. The batch augmentation
# on the device, on uint8 images, reproduces it. The run pads batches to the widest line, as then
# (a wider canvas changes the BatchNorm statistics), and has one batch per epoch (grouping lines by
# their augmented width changes which lines share a batch). Over these 8 epochs the figures agree
# to 1e-6 whatever the thread count; later epochs drift apart with the order of float sums.
PINNED_CURVE = [(1, 55.66733, 56.11355), (2, 53.93998, 51.46956), (3, 50.98953, 36.07815), (4, 44.32732, 24.8993),
                (5, 34.77595, 19.85139), (6, 25.08563, 19.85719), (7, 21.27186, 20.27108), (8, 20.21454, 19.74715)]


def test_a_seeded_run_reproduces_its_pinned_curve(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)  # one batch: its lines do not depend on the grouping
    fit(load_config(TINY, ["data.source=folder", f"data.train={lines}", f"data.validation={lines}",
                           "data.batch_size=4", "train.epochs=8", "train.lr=1e-2", "train.schedule=constant",
                           "train.warmup_steps=2", "data.width_multiple=1", f"train.output_dir={tmp_path / 'run'}"]))
    curve = [(m["epoch"], m["val_loss"], m["train_loss"]) for m in read_metrics(tmp_path / "run")]
    assert [epoch for epoch, _, _ in curve] == [epoch for epoch, _, _ in PINNED_CURVE]
    for (_, val_loss, train_loss), (_, pinned_val, pinned_train) in zip(curve, PINNED_CURVE, strict=True):
        assert val_loss == pytest.approx(pinned_val, rel=1e-5) and train_loss == pytest.approx(pinned_train, rel=1e-5)


def test_resume_continues_exactly_like_an_unbroken_run(tmp_path):
    common = ["train.epochs=2", "data.synthetic.train=24", "data.synthetic.validation=8"]
    fit(load_config(TINY, [*common, f"train.output_dir={tmp_path / 'unbroken'}"]))
    fit(load_config(TINY, [*common, "train.epochs=1", f"train.output_dir={tmp_path / 'broken'}"]))
    fit(load_config(TINY, [*common, "train.resume=auto", f"train.output_dir={tmp_path / 'broken'}"]))
    unbroken, resumed = read_metrics(tmp_path / "unbroken"), read_metrics(tmp_path / "broken")
    assert [m["epoch"] for m in resumed] == [1, 2]
    assert resumed[1]["train_loss"] == pytest.approx(unbroken[1]["train_loss"], rel=1e-6)
    assert resumed[1]["val_cer"] == unbroken[1]["val_cer"]
    weights_a = load_checkpoint(tmp_path / "unbroken" / "checkpoints" / "last.pt")["model"]
    weights_b = load_checkpoint(tmp_path / "broken" / "checkpoints" / "last.pt")["model"]
    assert all(torch.allclose(weights_a[k].float(), weights_b[k].float(), atol=1e-6) for k in weights_a)


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
    assert record["train_loss"] == record["train_loss"]  # a number, not NaN


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
