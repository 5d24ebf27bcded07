"""Which device and which precision: the one home of both decisions. `train.device` (or a tool's
`--device`) -> `resolve_device`; `train.amp` (or a tool's `--amp`) -> `resolve_amp`, the one meaning
of both for training, validation, evaluation and the benchmark."""

from __future__ import annotations

import json
import os
import platform
import re
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
BF16_MIN_SPEEDUP = 1.2  # below it float32 keeps its precision for little or no time lost (auto, CPU)


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """`name`: auto (CUDA if present), cpu, cuda, or cuda:N; plain `cuda` is the `local_rank`-th
    GPU. ConfigError naming `key` for anything else, or for CUDA where there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"'{key}' must be {DEVICES}, got '{name}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'{key}' asks for CUDA, but no CUDA device is available; use {key}=cpu"
                          if key.startswith("train.") else
                          f"{key} {name}: no CUDA device is available here; use {key} cpu")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def check_device_options(train: TrainConfig, device: torch.device) -> None:
    """Reject what the config asks of a device it does not have."""
    if train.amp != "auto":
        resolve_amp(train.amp, device)
    if train.sync_bn and device.type != "cuda":
        raise ConfigError("'train.sync_bn=true' needs CUDA (SyncBatchNorm does not run on CPU); "
                          "set train.sync_bn=false")
    if train.data_parallel and device.type != "cuda":
        raise ConfigError("'train.data_parallel=true' needs CUDA devices; set train.data_parallel=false")


def resolve_amp(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """`train.amp` -> the autocast dtype (None: full float32), as docs/training.md says: auto on a CPU
    is `cpu_amp`; fp16 needs CUDA (its GradScaler); bf16 on a CPU without bf16 kernels warns."""
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


@cache
def cpu_amp() -> torch.dtype | None:
    """`train.amp=auto` on this CPU, the reason logged (docs/training.md); with AVX-512 BF16 but no
    AMX, `kept_bf16_speedup` decides. Under torch.distributed the ranks agree."""
    if cpu_runs_bf16_natively() is not True:
        log.info("train.amp=auto: float32 (this CPU has no bf16 kernels)")
        return None
    if torch.cpu._is_amx_tile_supported():
        log.info("train.amp=auto: bf16 (this CPU has AMX)")
        return torch.bfloat16
    speedup, how = kept_bf16_speedup()
    pays = speedup >= BF16_MIN_SPEEDUP
    if dist.is_available() and dist.is_initialized():
        vote = torch.tensor([int(pays)])
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        pays = bool(vote.item())
    log.info("train.amp=auto: %s (AVX-512 BF16 without AMX: a bf16 training step runs at %.2fx float32's speed "
             "here, %s; bf16 needs %.1fx)", "bf16" if pays else "float32", speedup, how, BF16_MIN_SPEEDUP)
    return torch.bfloat16 if pays else None


def kept_bf16_speedup() -> tuple[float, str]:
    """`bf16_speedup()` and how it was had: measured once per machine (CPU, torch version, threads)
    and kept in the user's cache folder; a cache that cannot be written is measured again next time."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crnn/cpu_bf16_speedup.json"
    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"

    def known() -> dict:  # read again before writing: another process may have kept its own meanwhile
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    if key in (kept := known()):
        return float(kept[key]), f"measured earlier on this machine, kept in {path}"
    speedup = bf16_speedup()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**known(), key: round(speedup, 3)}, indent=1, sort_keys=True))
    except OSError as err:
        log.warning("cannot keep the bf16 measurement in %s: %s", path, err)
    return speedup, "measured now, once for this machine"


def cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        return re.search(r"^model name[ \t]*:[ \t]*(.*\S)", cpuinfo, re.MULTILINE)[1]
    except (OSError, TypeError):  # no /proc (not Linux), or no model name in it (ARM)
        return platform.processor() or platform.machine()


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
    return nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)
