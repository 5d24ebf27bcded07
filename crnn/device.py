"""Which device and which precision: the one home of both decisions.

- `resolve_device`: `train.device` (or a tool's `--device`) -> a torch.device.
- `check_device_options`: what a run's config asks of its device (SyncBatchNorm, DataParallel,
  the precision), refused before any work is done.
- `resolve_amp`: the one meaning of `train.amp` (and of the tools' `--amp`) -> the autocast dtype;
  training, validation, evaluation and the benchmark all use it. `autocast` wraps a forward pass
  (and its loss) in it.
- `memory_format`: the layout a training model's convolutions take (channels_last on a CPU).
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from crnn.config import DEVICES, TrainConfig
from crnn.errors import ConfigError
from crnn.outputs import atomic_write_text
from crnn.runlog import log

AMP_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """`name`: auto (CUDA if present), cpu, cuda, or cuda:N; plain `cuda` is the `local_rank`-th
    GPU. ConfigError naming `key` for anything else, or for CUDA where there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"'{key}' must be {DEVICES}, got '{name}'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"'{key}' asks for CUDA, but no CUDA device is available; use {key}=cpu"
                              if key.startswith("train.") else
                              f"{key} {name}: no CUDA device is available here; use {key} cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"'{key}' must be {DEVICES}, got '{name}'")
    return device


def check_device_options(train: TrainConfig, device: torch.device) -> None:
    """Reject what the config asks of a device it does not have (the values themselves were
    checked when the config was loaded)."""
    if train.amp != "auto":
        resolve_amp(train.amp, device)
    if train.sync_bn and device.type != "cuda":
        raise ConfigError("'train.sync_bn=true' needs CUDA (SyncBatchNorm does not run on CPU); "
                          "set train.sync_bn=false")
    if train.data_parallel and device.type != "cuda":
        raise ConfigError("'train.data_parallel=true' needs CUDA devices; set train.data_parallel=false")


def resolve_amp(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """`train.amp` -> the autocast dtype (None: full float32), the same everywhere.

    auto: on CUDA, bf16 where the GPU supports it, else fp16. On a CPU, from what it reports
    (`cpu_amp`): bf16 with AMX, float32 without bf16 kernels (PyTorch would emulate bf16, many
    times slower); with AVX-512 BF16 but no AMX, bf16 pays on some CPUs and not on others, so it is
    measured once per machine and the answer kept. fp16 needs CUDA (its GradScaler); bf16 runs
    anywhere, emulated (with a warning) on a CPU without bf16 kernels.
    """
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return cpu_amp()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"'{key}=fp16' needs a CUDA device (GradScaler); on CPU use {key}=off or bf16")
    if amp == "bf16" and device.type == "cpu" and cpu_runs_bf16_natively() is False:
        warn_once(f"{key}=bf16 on a CPU without bf16 kernels (no AVX-512 BF16 or AMX): PyTorch emulates bf16 "
                  f"here, many times slower than float32; {key}=off runs in float32")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of a training model's 4-D weights, which its convolutions' activations follow:
    channels_last on a CPU (oneDNN's own layout: a faster training step), contiguous on CUDA."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def cpu_runs_bf16_natively() -> bool | None:
    """oneDNN's own test: bf16 kernels on x86 need AVX-512 BF16 (or AMX), on ARM the bf16 extension.
    None when PyTorch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


BF16_MIN_SPEEDUP = 1.2  # below it float32 keeps its precision for little or no time lost


@cache
def cpu_amp() -> torch.dtype | None:
    """`train.amp=auto` on this CPU, with the reason logged. Without AMX but with bf16 kernels the
    answer is a measurement (`bf16_speedup`), taken once per machine and kept in
    `amp_cache_path()`; under torch.distributed the ranks agree (bf16 only if all say so)."""
    if cpu_runs_bf16_natively() is not True:
        log.info("train.amp=auto: float32 (this CPU has no bf16 kernels)")
        return None
    if torch.cpu._is_amx_tile_supported():
        log.info("train.amp=auto: bf16 (this CPU has AMX)")
        return torch.bfloat16
    path, key = amp_cache_path(), f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    known = read_json(path)
    if key in known:
        speedup, how = float(known[key]), f"measured earlier on this machine, kept in {path}"
    else:
        speedup, how = bf16_speedup(), "measured now, once for this machine"
        write_json(path, {**read_json(path), key: round(speedup, 3)})
    pays = speedup >= BF16_MIN_SPEEDUP
    if dist.is_available() and dist.is_initialized():
        vote = torch.tensor([int(pays)])
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        pays = bool(vote.item())
    log.info("train.amp=auto: %s (AVX-512 BF16 without AMX: a bf16 training step runs at %.2fx float32's speed "
             "here, %s; bf16 needs %.1fx)", "bf16" if pays else "float32", speedup, how, BF16_MIN_SPEEDUP)
    return torch.bfloat16 if pays else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def amp_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "crnn" / "cpu_bf16_speedup.json"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    """Best effort: a cache that cannot be written is measured again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as err:
        log.warning("cannot keep the bf16 measurement in %s: %s", path, err)


def bf16_speedup(repeats: int = 2) -> float:
    """Float32's time over bf16's for a training step of a probe shaped like the CRNN (strided
    convolutions, batch norm, a BiLSTM; 16 lines 1,024 px wide in channels_last), best of `repeats`
    after a warm-up, the two precisions interleaved (about two seconds in all)."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(0)
        convs = nn.Sequential(nn.Conv2d(1, 32, 7, (4, 2), 3), nn.BatchNorm2d(32), nn.ReLU(),
                              nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                              nn.Conv2d(64, 128, 3, (2, 1), 1), nn.BatchNorm2d(128), nn.ReLU())
        convs = convs.to(memory_format=torch.channels_last)
        lstm = nn.LSTM(128 * 4, 128, bidirectional=True)
        images = torch.randn(16, 1, 64, 1024)

    def step(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad(), autocast(torch.device("cpu"), dtype):
            columns = convs(images).flatten(1, 2).permute(2, 0, 1)  # (T, N, C)
            output, _ = lstm(columns)
            output.float().square().mean().backward()
        return time.perf_counter() - start

    best = {None: float("inf"), torch.bfloat16: float("inf")}
    for dtype in (None, torch.bfloat16) * 2:
        step(dtype)
        best[dtype] = min(best[dtype], *(step(dtype) for _ in range(repeats)))
    return best[None] / best[torch.bfloat16]


@cache
def warn_once(message: str) -> None:
    log.warning("%s", message)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to `amp_dtype` on `device`'s type; a no-op context for float32 (None)."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
