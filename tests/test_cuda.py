"""Every CUDA path, on a machine with a GPU; skipped where CUDA is absent (so, in CI). Written
alongside the CPU tests; not yet run on a GPU (none has been lent to this project's sessions).

    python -m pytest -q tests/test_cuda.py      # on the GPU machine
"""

import json
import warnings

import pytest
import torch

from crnn import trainer
from crnn.config import load_config
from crnn.data import BatchAugmenter
from crnn.distributed import DistInfo
from crnn.engine import ctc_line_losses
from crnn.models import build_model
from tests.helpers import (
    STRONG,
    TINY,
    ink_lines,
    pad_batch,
    read_metrics,
    run_python,
    run_tool,
    synthetic_folder,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """tools/train.py for two tiny epochs on the GPU: the run directory."""
    run_dir = tmp_path_factory.mktemp("gpu") / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, "train.device=cuda", "train.epochs=2",
                      "data.num_workers=2", f"train.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_forward_and_backward_with_widths_left_on_the_cpu():
    torch.manual_seed(0)
    model = build_model(load_config(TINY).model, 12)
    images, widths = torch.rand(3, 1, 32, 128), torch.tensor([128, 90, 40])  # widths stay on the CPU
    expected = model.eval()(images, widths)
    model = model.to(CUDA)
    output = model(images.to(CUDA), widths)
    assert output.log_probs.is_cuda and output.lengths.is_cuda
    assert torch.equal(output.lengths.cpu(), expected.lengths)
    assert torch.allclose(output.log_probs.cpu(), expected.log_probs, atol=1e-4)
    model.train()
    output = model(images.to(CUDA), widths)
    targets, target_lengths = torch.tensor([1, 2, 3, 4, 5, 6], device=CUDA), torch.tensor([3, 2, 1])
    ctc_line_losses(output.log_probs, model.output_lengths(widths), targets, target_lengths).sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_run_trains_under_each_precision_and_optimizer(amp, optimizer, tmp_path):
    run_dir = tmp_path / "run"
    trainer.fit(load_config(TINY, ["train.device=cuda", f"train.amp={amp}", f"train.optimizer={optimizer}",
                                   "train.epochs=3", f"train.output_dir={run_dir}"]))
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and all(m["bad_steps"] == 0 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


def synchronizations(tmp_path, name: str, steps: int) -> int:
    """Host-device synchronizations of a run of `steps` steps (one epoch, no logging step)."""
    cfg = load_config(TINY, ["train.device=cuda", "train.amp=bf16", "train.log_every=1000", "data.batch_size=2",
                             "data.synthetic.train=60", f"train.max_steps={steps}", "train.epochs=1",
                             f"train.output_dir={tmp_path / name}"])
    run = trainer.build_run(cfg, DistInfo(0, 0, 1, CUDA))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_a_training_step_waits_for_the_device_only_at_the_logging_interval(tmp_path):
    """A run of 20 steps synchronizes exactly as often as a run of 5 (the epoch's end, validation):
    none of its steps waits for the GPU."""
    assert synchronizations(tmp_path, "short", 5) == synchronizations(tmp_path, "long", 20)


def test_batch_augmentation_on_the_gpu_equals_the_cpu():
    lines, seeds = ink_lines(5), [21, 22, 23, None, 25]
    images, widths = pad_batch(lines)
    augmenter = BatchAugmenter(STRONG, width_multiple=64)
    on_cpu, cpu_widths = augmenter(images, widths, seeds)
    on_gpu, gpu_widths = augmenter(images.to(CUDA), widths, seeds)
    assert torch.equal(cpu_widths, gpu_widths) and on_gpu.is_cuda
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-3)


def test_train_tool_runs_on_the_gpu(gpu_run):
    assert [m["epoch"] for m in read_metrics(gpu_run)] == [1, 2]
    assert (gpu_run / "checkpoints" / "best.pt").is_file()


def test_evaluate_with_every_decoder_and_predict_on_the_gpu(gpu_run, tmp_path):
    checkpoint = gpu_run / "checkpoints" / "best.pt"
    rows = {}
    for device in ("cuda", "cpu"):
        result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--decoders", "greedy,beam,beam_lm",
                          "--device", device, "--json", tmp_path / f"{device}.json")
        assert result.returncode == 0, result.stderr[-3000:]
        rows[device] = json.loads((tmp_path / f"{device}.json").read_text())
    for name in ("greedy", "beam", "beam_lm"):
        assert rows["cuda"][name]["lines"] == rows["cpu"][name]["lines"] == 16
        assert rows["cuda"][name]["cer"] == pytest.approx(rows["cpu"][name]["cer"], abs=0.02)
    lines = synthetic_folder(tmp_path / "lines", 3)
    for device in ("cuda", "auto"):
        result = run_tool("tools/predict.py", "--ckpt", checkpoint, "--device", device, lines)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(result.stdout.strip().splitlines()) == 3


def test_torchrun_one_process_with_nccl(tmp_path):
    run_dir = tmp_path / "run"
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "tools/train.py",
                        "--cfg", TINY, "train.device=cuda", f"train.output_dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nccl" in result.stderr and [m["epoch"] for m in read_metrics(run_dir)] == [1]


def test_data_parallel_on_the_gpu(tmp_path):
    run_dir = tmp_path / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, "train.device=cuda", "train.data_parallel=true",
                      f"train.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]


def test_calibration_fitted_on_the_gpu_and_used_by_predict_and_evaluate(tmp_path):
    """The end-of-run calibration (a forward pass on the GPU), predict's calibrated fields and
    evaluate's calibration report with the model on the GPU."""
    run_dir = tmp_path / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, "train.device=cuda", "data.synthetic.validation=64",
                      f"train.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = run_dir / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["calibration"]["lines"] == 64
    lines = synthetic_folder(tmp_path / "lines", 3)
    read = run_tool("tools/predict.py", "--ckpt", best, lines, "--device", "cuda", "--json", "--summary")
    assert read.returncode == 0, read.stderr
    rows = [json.loads(line) for line in read.stdout.strip().splitlines()]
    assert all(row["p_exact"] is not None for row in rows[:3]) and rows[3]["summary"]["lines"] == 3
    report = run_tool("tools/evaluate.py", "--ckpt", best, "--device", "cuda", "--split", "test", "--json",
                      tmp_path / "r.json")
    assert report.returncode == 0, report.stderr
    assert json.loads((tmp_path / "r.json").read_text())["calibration"]["lines"] == 16
