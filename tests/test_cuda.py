"""Every CUDA path, on a machine with a GPU; skipped where CUDA is absent (so, in CI).

    python -m pytest -q tests/test_cuda.py      # on the GPU machine
"""

import json

import pytest
import torch

from crnn.config import config_from_dict, load_config, merge_overrides
from crnn.data import BatchAugmenter, Vocab, build_dataset, build_loader, load_records
from crnn.data.collate import collate
from crnn.engine import TrainingError, TrainSetup, ctc_line_losses, train_step
from crnn.models import build_model
from tests.helpers import (
    STRONG,
    TINY,
    ink_lines,
    pad_batch,
    read_metrics,
    run_epoch,
    run_tool,
    synthetic_folder,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """tools/train.py for a tiny epoch on the GPU: the run directory."""
    run_dir = tmp_path_factory.mktemp("gpu") / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, "train.device=cuda", "train.epochs=2",
                      "data.num_workers=2", f"train.output_dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("upsample", [1, 2])
def test_forward_and_backward_with_widths_left_on_the_cpu(upsample):
    torch.manual_seed(0)
    model = build_model(load_config(TINY, [f"model.upsample={upsample}"]).model, 12)
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
    ctc_line_losses(output.log_probs, output.lengths, targets, target_lengths).sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_span_masking_on_the_gpu_masks_inside_each_line():
    from crnn.models.crnn import mask_spans

    torch.manual_seed(0)
    columns, lengths = torch.ones(50, 3, 8, device=CUDA), torch.tensor([50, 30, 9], device=CUDA)
    masked = mask_spans(columns, lengths, 0.3, 4)
    zeroed = (masked == 0).all(-1)  # (T, N)
    assert masked.is_cuda and zeroed.any()
    assert not zeroed[30:, 1].any() and not zeroed[9:, 2].any()
    model = build_model(load_config(TINY, ["model.span_mask=0.2"]).model, 12).to(CUDA).train()
    output = model(torch.rand(2, 1, 32, 96, device=CUDA), torch.tensor([96, 50]))  # widths on the CPU
    output.log_probs.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_twenty_steps_on_varying_widths(amp, optimizer, sam_rho, tmp_path):
    """With the attention decoder: it is taught the text on the GPU, under both AMP modes; and with
    sharpness-aware steps (fp16's loss scale included)."""
    lines = synthetic_folder(tmp_path / "lines", 40)
    cfg = load_config(TINY, ["data.source=folder", f"data.train={lines}", "data.batch_size=4", f"train.amp={amp}",
                             "train.device=cuda", f"train.optimizer={optimizer}", "model.attention_layers=1",
                             f"train.sam_rho={sam_rho}", "train.muon_precision=auto"])
    records = load_records(cfg.data, "train")
    vocab = Vocab.from_texts(records.texts)
    model = build_model(cfg.model, len(vocab)).to(CUDA)
    setup = TrainSetup.from_config(cfg, model=model, device=CUDA, total_steps=20)
    assert setup.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if optimizer == "muon":  # Newton-Schulz in bf16 on the GPU under bf16 autocast, float32 under fp16
        assert setup.optimizer.ns_dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)
    loader = build_loader(cfg.data, build_dataset(cfg.data, records, vocab, True), True, pin_memory=True)
    loader.batch_sampler.set_epoch(1)
    assert len({batch.images.shape[-1] for batch in loader}) > 1  # the widths vary
    step, bad_steps = 0, 0
    for epoch in (1, 2):
        loader.batch_sampler.set_epoch(epoch)
        stats, step = run_epoch(model, loader, setup, epoch, step, stop_at=20)
        bad_steps += stats.bad_steps
    assert step == 20 and bad_steps <= (3 if amp == "fp16" else 0)  # fp16: the scaler finds its scale
    assert 0 < stats.attention_loss < 1e4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_on_the_gpu_trains_like_contiguous():
    """train.memory_format=channels_last on CUDA (auto keeps contiguous there): the same losses and
    gradients, on lines of varying widths, through the strided 1x1 shortcut convolutions too."""
    from crnn.distributed import DistInfo
    from crnn.trainer import build_training

    gpu = DistInfo(0, 0, 1, CUDA)
    vocab = Vocab.from_texts(["abcdef"])
    images, widths = torch.rand(3, 1, 32, 388, device=CUDA), torch.tensor([388, 201, 97])
    targets, target_lengths = torch.tensor([1, 2, 3, 4, 5, 6], device=CUDA), torch.tensor([3, 2, 1])
    gradients = {}
    for layout in ("contiguous", "channels_last"):
        cfg = load_config(TINY, ["train.device=cuda", "train.amp=off", f"train.memory_format={layout}"])
        model, _ = build_training(cfg, gpu, vocab, 1)
        output = model(images, widths)
        ctc_line_losses(output.log_probs, output.lengths, targets, target_lengths).sum().backward()
        gradients[layout] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    conv = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1))
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for name, grad in gradients["contiguous"].items():
        assert torch.allclose(gradients["channels_last"][name], grad, rtol=1e-3, atol=1e-4), name


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
                          "--device", device, "--json", tmp_path / f"{device}.json", timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[device] = json.loads((tmp_path / f"{device}.json").read_text())
    for name in ("greedy", "beam", "beam_lm"):
        assert rows["cuda"][name]["lines"] == rows["cpu"][name]["lines"] == 16
        assert rows["cuda"][name]["cer"] == pytest.approx(rows["cpu"][name]["cer"], abs=0.02)
    lines = synthetic_folder(tmp_path / "lines", 3)
    for device in ("cuda", "auto"):
        result = run_tool("tools/predict.py", "--ckpt", checkpoint, "--device", device, lines, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(result.stdout.strip().splitlines()) == 3


def test_compile_is_refused_before_any_work_on_the_gpu_too(tmp_path):
    result = run_tool("tools/train.py", "--cfg", TINY, "train.device=cuda", "train.compile=true",
                      f"train.output_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2 and "'train.compile=true' is not supported" in result.stderr
    assert not (tmp_path / "run").exists()


def test_torchrun_one_process_with_nccl(tmp_path):
    run_dir = tmp_path / "run"
    result = run_tool("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "tools/train.py",
                      "--cfg", TINY, "train.device=cuda", f"train.output_dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nccl" in result.stderr and [m["epoch"] for m in read_metrics(run_dir)] == [1]


def test_data_parallel_on_the_gpu(tmp_path):
    run_dir = tmp_path / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, "train.device=cuda", "train.data_parallel=true",
                      "model.attention_layers=1", f"train.output_dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1] and read_metrics(run_dir)[0]["train_attention_loss"] > 0


def test_benchmark_speed_and_loop_modes_on_the_gpu(tmp_path):
    result = run_tool("tools/benchmark.py", "--cfg", TINY, "--device", "cuda", "--lines", "8", "--batch-size", "4",
                      "--repeats", "1", "--json", tmp_path / "speed.json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "speed.json").read_text())
    assert row["train_fp32_lines_per_s"] > 0 and row["train_bf16_lines_per_s"] > 0
    lines = synthetic_folder(tmp_path / "lines", 16)
    result = run_tool("tools/benchmark.py", "--cfg", TINY, "--device", "cuda", "--loop", "--steps", "4",
                      "--data", f"{lines},{lines}", "--json", tmp_path / "loop.json", "data.num_workers=2",
                      timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "loop.json").read_text())
    assert row["loop_lines_per_s"] > 0 and row["model_lines_per_s"] > 0


def test_out_of_memory_is_retried_in_halves_or_named(tmp_path):
    """A memory cap that the whole batch exceeds and half of it does not: the retry in halves
    succeeds; without the retry the error names the batch and the keys to lower."""
    cfg = load_config(TINY, ["data.resize=squash", "data.width=3000", "train.device=cuda", "train.amp=off"])
    records = load_records(cfg.data, "train")
    vocab = Vocab.from_texts(records.texts)
    dataset = build_dataset(cfg.data, records, vocab, train=False)
    batch = collate([dataset[(i, None)] for i in range(48)], cfg.data.width_multiple)
    half = collate([dataset[(i, None)] for i in range(24)], cfg.data.width_multiple)
    model = build_model(cfg.model, len(vocab)).to(CUDA).train()
    setup = TrainSetup.from_config(cfg, model=model, device=CUDA, total_steps=10)
    peaks = {}
    for name, lines in (("half", half), ("whole", batch)):
        train_step(model, lines, setup)  # optimizer state allocated, warm
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, lines, setup)
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["whole"] > 1.5 * peaks["half"], peaks
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    cap = torch.cuda.memory_allocated() + (peaks["half"] + peaks["whole"]) / 2
    torch.cuda.set_per_process_memory_fraction(cap / total, CUDA)
    try:
        finite, _ = train_step(model, batch, setup, 1.0, 1, 0)
        assert finite
        no_retry = TrainSetup.from_config(config_from_dict(merge_overrides(cfg.to_dict(), ["train.oom_retry=false"])),
                                          model=model, device=CUDA, total_steps=10)
        torch.cuda.empty_cache()
        with pytest.raises(TrainingError, match=r"out of memory on a batch of 48 lines.*lower data.batch_size"):
            train_step(model, batch, no_retry, 1.0, 2, 7)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.empty_cache()


def test_calibration_fitted_on_the_gpu_and_used_by_predict_and_evaluate(tmp_path):
    """The end-of-run calibration (a forward pass on the GPU), predict's calibrated fields and
    evaluate's calibration report with the model on the GPU."""
    run_dir = tmp_path / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, "train.device=cuda", "data.synthetic.validation=64",
                      f"train.output_dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = run_dir / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["calibration"]["lines"] == 64
    assert "the calibration on lines it was not fitted on (5 folds" in result.stderr
    lines = synthetic_folder(tmp_path / "lines", 3)
    read = run_tool("tools/predict.py", "--ckpt", best, lines, "--device", "cuda", "--json", "--summary")
    assert read.returncode == 0, read.stderr
    rows = [json.loads(line) for line in read.stdout.strip().splitlines()]
    assert all(row["p_exact"] is not None for row in rows[:3]) and rows[3]["summary"]["lines"] == 3
    report = run_tool("tools/evaluate.py", "--ckpt", best, "--device", "cuda", "--split", "test", "--json",
                      tmp_path / "r.json")
    assert report.returncode == 0, report.stderr
    assert json.loads((tmp_path / "r.json").read_text())["calibration"]["lines"] == 16
