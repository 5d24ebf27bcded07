"""`train.amp=auto` on a CPU: bf16 only where a measured training step says it pays."""

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crnn import device


@pytest.fixture(autouse=True)
def fresh_probe():
    device.cpu_bf16_pays.cache_clear()
    yield
    device.cpu_bf16_pays.cache_clear()


def test_the_probe_times_a_real_training_step_in_both_precisions():
    before = torch.random.get_rng_state()
    with torch.no_grad():  # the probe trains even where the caller does not
        speedup = device.bf16_speedup(repeats=1)
    assert 0.01 < speedup < 100  # a ratio of two measured times, not a flag
    assert torch.equal(torch.random.get_rng_state(), before)  # a run's random stream is not touched


@pytest.mark.parametrize(("speedup", "pays"), [(1.9, True), (1.2, True), (1.1, False), (0.76, False)])
def test_bf16_must_beat_float32_by_a_margin(monkeypatch, caplog, speedup, pays):
    calls = []
    monkeypatch.setattr(device, "bf16_speedup", lambda: calls.append(1) or speedup)
    monkeypatch.setattr(device, "cpu_runs_bf16_natively", lambda: True)
    with caplog.at_level(logging.INFO, logger="crnn"):
        assert device.resolve_amp("auto", torch.device("cpu")) is (torch.bfloat16 if pays else None)
        assert device.resolve_amp("auto", torch.device("cpu")) is (torch.bfloat16 if pays else None)
    assert len(calls) == 1  # measured once per process
    (message,) = [r.getMessage() for r in caplog.records if "probe" in r.getMessage()]
    assert f"runs at {speedup:.2f}x float32's speed" in message
    assert message.endswith("bf16 here" if pays else "float32 here (bf16 needs 1.2x)")


def test_explicit_bf16_is_not_second_guessed(monkeypatch):
    monkeypatch.setattr(device, "bf16_speedup", lambda: 0.5)
    monkeypatch.setattr(device, "cpu_runs_bf16_natively", lambda: True)
    assert device.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert device.resolve_amp("off", torch.device("cpu")) is None


def _vote(rank: int, init_file: str, speedups: list[float], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(speedups))
    device.bf16_speedup = lambda: speedups[rank]
    device.cpu_runs_bf16_natively = lambda: True
    dtype = device.resolve_amp("auto", torch.device("cpu"))
    with open(os.path.join(out, f"rank{rank}"), "w") as file:
        file.write(device.AMP_NAMES[dtype])
    dist.destroy_process_group()


@pytest.mark.parametrize(("speedups", "expected"), [([1.5, 1.1], "fp32"), ([1.5, 1.6], "bf16")])
def test_ranks_agree_on_the_precision(tmp_path, speedups, expected):
    mp.spawn(_vote, args=(str(tmp_path / "init"), speedups, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == [expected, expected]
