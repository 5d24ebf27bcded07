"""Which device and which precision: the one home of both decisions.

- `resolve_device`: `train.device` (or a tool's `--device`) -> a torch.device.
- `check_device_options`: what a run's config asks of its device (SyncBatchNorm, DataParallel,
  the precision), refused before any work is done.
- `resolve_amp`: the one meaning of `train.amp` (and of the tools' `--amp`) -> the autocast dtype;
  training, validation, evaluation and the benchmark all use it. `autocast` wraps a forward pass
  (and its loss) in it.
- `resolve_memory_format`: `train.memory_format` -> the layout a training model's convolutions
  take (the trainer and the benchmark).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import cache

import torch
import torch.distributed as dist
from torch import nn

from crnn.config import DEVICES, TrainConfig
from crnn.errors import ConfigError
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
    checked when the config was loaded). `auto` fits every device: it is resolved (on a CPU, a timed
    probe) where the training is set up, after the data has loaded."""
    if train.amp != "auto":
        resolve_amp(train.amp, device)
    if train.sync_bn and device.type != "cuda":
        raise ConfigError("'train.sync_bn=true' needs CUDA (SyncBatchNorm does not run on CPU); "
                          "set train.sync_bn=false")
    if train.data_parallel and device.type != "cuda":
        raise ConfigError("'train.data_parallel=true' needs CUDA devices; set train.data_parallel=false")


def resolve_amp(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """`train.amp` -> the autocast dtype (None: full float32), the same everywhere.

    auto: bf16 on a CUDA GPU that supports it, else fp16 there; on a CPU, bf16 where it has bf16
    kernels and trains measurably faster with them (`cpu_bf16_pays`: about twice float32's speed on
    an AMD EPYC with AVX-512 BF16, at the same CER per minute or better, docs/ablations.md), else
    float32: where PyTorch would emulate bf16 (many times slower), and where the kernels exist but
    lose to float32 (an Intel Xeon with AVX-512 BF16 and no AMX: 0.7-0.9x).
    fp16 needs CUDA (its GradScaler); bf16 runs anywhere.
    """
    if amp == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_runs_bf16_natively() is True and cpu_bf16_pays() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"'{key}=fp16' needs a CUDA device (GradScaler); on CPU use {key}=off or bf16")
    if amp == "bf16":
        warn_emulated_bf16(key, device)
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def resolve_memory_format(name: str, device: torch.device) -> torch.memory_format:
    """`train.memory_format` -> the layout of a training model's 4-D weights, which its
    convolutions' activations then follow. auto: channels_last on a CPU, where it is oneDNN's own
    layout and a copiste.yaml training step ran 9-11% faster with it on a 2-core Intel Xeon
    (float32, 1 or 2 threads; docs/performance.md), contiguous on CUDA, where it is not measured
    yet (tools/gpu_check.py measures it). Either trains the same model, up to float rounding."""
    if name == "auto":
        name = "channels_last" if device.type == "cpu" else "contiguous"
    return {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[name]


def cpu_runs_bf16_natively() -> bool | None:
    """oneDNN's own test: bf16 kernels on x86 need AVX-512 (or AMX), on ARM the bf16 extension.
    Without them PyTorch emulates bf16. None when PyTorch cannot say (then `auto` keeps float32 and
    an explicit bf16 gets no warning)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


BF16_MIN_SPEEDUP = 1.2  # below it float32 keeps its precision for little or no time lost


@cache
def cpu_bf16_pays() -> bool:
    """Whether a training step under bf16 autocast beats float32 by `BF16_MIN_SPEEDUP` on this CPU,
    measured once per process (about two seconds) on a probe shaped like the CRNN: strided
    convolutions, batch norm, a BiLSTM, forward and backward. Having bf16 kernels is not enough:
    oneDNN's AVX-512 BF16 convolutions train slower than float32 on some Xeons without AMX. Under
    torch.distributed every rank probes and bf16 is chosen only if all agree, so that the ranks
    train alike."""
    speedup = bf16_speedup()
    pays = speedup >= BF16_MIN_SPEEDUP
    if dist.is_available() and dist.is_initialized():
        vote = torch.tensor([int(pays)])
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        pays = bool(vote.item())
    log.info("amp auto: a bf16 training step runs at %.2fx float32's speed on this CPU (a probe), so auto means %s",
             speedup, "bf16 here" if pays else f"float32 here (bf16 needs {BF16_MIN_SPEEDUP}x)")
    return pays


def bf16_speedup(repeats: int = 2) -> float:
    """Float32's time over bf16's for the probe's training step (best of `repeats` after a warm-up,
    the two precisions interleaved twice so that a burst of load elsewhere hits both alike). The
    probe is a batch of 16 lines 1,024 px wide in channels_last, the layout a CPU trains in (about
    two seconds in all): on a 2-core Xeon with AMX it gave 1.51-1.62x where copiste.yaml's real loop
    ran 1.62x, while the earlier probe (8 lines 512 px wide, contiguous) gave 1.17-1.43x, either side
    of the threshold (docs/performance.md)."""
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


_bf16_warning_given = False


def warn_emulated_bf16(key: str, device: torch.device) -> None:
    """Warns that `key=bf16` is emulated, if `device` is a CPU without bf16 kernels; once per process
    (the benchmark resolves `--amp`, then each config's `train.amp` and `train.muon_precision`)."""
    global _bf16_warning_given
    if _bf16_warning_given or device.type != "cpu" or cpu_runs_bf16_natively() is not False:
        return
    _bf16_warning_given = True
    log.warning(
        "%s=bf16 on a CPU without bf16 kernels (no AVX-512 or AMX): PyTorch emulates bf16 here, which is "
        "many times slower than float32 (training 14-18x slower on a 2-core AMD EPYC without AVX-512); "
        "%s=auto runs in float32 on such a CPU", key, key)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to `amp_dtype` on `device`'s type; a no-op context for float32 (None)."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
