"""`train.amp=auto` on a CPU: decided from what the CPU reports, measured once per machine only
where that is not enough (AVX-512 BF16 without AMX)."""

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crnn import device


@pytest.fixture(autouse=True)
def fresh_decision(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    device.cpu_amp.cache_clear()
    yield
    device.cpu_amp.cache_clear()


def cpu_reports(monkeypatch, bf16: bool, amx: bool, speedup: float | None = None) -> list:
    calls = []
    monkeypatch.setattr(device, "cpu_runs_bf16_natively", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(device, "bf16_speedup", lambda: calls.append(1) or speedup)
    return calls


@pytest.mark.slow
def test_the_probe_times_a_real_training_step_in_both_precisions():
    before = torch.random.get_rng_state()
    with torch.no_grad():  # the probe trains even where the caller does not
        speedup = device.bf16_speedup(repeats=1)
    assert 0.01 < speedup < 100  # a ratio of two measured times, not a flag
    assert torch.equal(torch.random.get_rng_state(), before)  # a run's random stream is not touched


@pytest.mark.parametrize(("bf16", "amx", "expected", "reason"), [(True, True, torch.bfloat16, "this CPU has AMX"),
                                                                 (False, False, None, "no bf16 kernels")])
def test_what_the_cpu_reports_decides_without_a_measurement(monkeypatch, caplog, bf16, amx, expected, reason):
    calls = cpu_reports(monkeypatch, bf16, amx)
    with caplog.at_level(logging.INFO, logger="crnn"):
        assert device.resolve_amp("auto", torch.device("cpu")) is expected
    assert calls == [] and any(reason in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("speedup", "expected"), [(1.9, torch.bfloat16), (1.2, torch.bfloat16), (1.1, None)])
def test_without_amx_bf16_is_measured_once_per_machine(monkeypatch, caplog, speedup, expected):
    calls = cpu_reports(monkeypatch, True, False, speedup)
    with caplog.at_level(logging.INFO, logger="crnn"):
        assert device.resolve_amp("auto", torch.device("cpu")) is expected
        device.cpu_amp.cache_clear()  # a new process on the same machine
        assert device.resolve_amp("auto", torch.device("cpu")) is expected
    assert len(calls) == 1
    messages = [r.getMessage() for r in caplog.records if "train.amp=auto" in r.getMessage()]
    assert f"{speedup:.2f}x float32's speed here, measured now" in messages[0]
    assert "measured earlier on this machine" in messages[1]


def test_explicit_bf16_is_not_second_guessed(monkeypatch):
    cpu_reports(monkeypatch, True, False, 0.5)
    assert device.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert device.resolve_amp("off", torch.device("cpu")) is None


def _vote(rank: int, init_file: str, speedups: list[float], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(speedups))
    os.environ["XDG_CACHE_HOME"] = os.path.join(out, f"cache{rank}")  # each rank as its own machine
    device.bf16_speedup = lambda: speedups[rank]
    device.cpu_runs_bf16_natively = lambda: True
    torch.cpu._is_amx_tile_supported = lambda: False
    dtype = device.resolve_amp("auto", torch.device("cpu"))
    with open(os.path.join(out, f"rank{rank}"), "w") as file:
        file.write(device.AMP_NAMES[dtype])
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("speedups", "expected"), [([1.5, 1.1], "fp32"), ([1.5, 1.6], "bf16")])
def test_ranks_agree_on_the_precision(tmp_path, speedups, expected):
    mp.spawn(_vote, args=(str(tmp_path / "init"), speedups, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == [expected, expected]
