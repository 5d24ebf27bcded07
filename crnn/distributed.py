"""torchrun environment -> process group, device and rank helpers (docs/multi_gpu.md). NCCL on
CUDA, gloo on CPU; without torchrun's variables everything runs as rank 0 of 1."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel.scatter_gather import gather

from crnn.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str = ""  # the process group's (nccl, gloo), "" without torchrun

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> DistInfo:
    """Read RANK/LOCAL_RANK/WORLD_SIZE (set by torchrun), pick the device and, under torchrun
    (whatever the number of processes, one included), join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=device if cuda else None)
    return DistInfo(rank, local_rank, world_size, device, dist.get_backend() if dist.is_initialized() else "")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel or DataParallel wrapper."""
    return getattr(model, "module", model)


class DataParallelCRNN(torch.nn.DataParallel):
    """`nn.DataParallel` for the CRNN, whose log-probs `(T, N, C)` are gathered along N, not dim 0 (all
    replicas see the same padded width, so their T agree)."""

    def gather(self, outputs, output_device):
        log_probs, lengths, shortcut_log_probs = zip(*outputs, strict=True)  # one CRNNOutput per replica
        return outputs[0]._make([gather(log_probs, output_device, dim=1), gather(lengths, output_device),
                                 gather(shortcut_log_probs, output_device, dim=1)])  # None stays None


class StopRequest:
    """SIGTERM or SIGINT ask the run to stop after the current step (and write a checkpoint); a
    second SIGINT interrupts at once. A context manager around training (main thread). A passed
    `deadline` (time.monotonic()) asks the same as SIGALRM, though none is sent: a real one could
    arrive before the handlers are in place and kill the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, deadline: float | None = None):
        self.signal_number: int | None = None
        self.deadline = deadline
        self._previous: dict[int, object] = {}

    def requested(self) -> int | None:
        """The signal number that asked for a stop (SIGALRM for the deadline), or None."""
        if self.signal_number is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.signal_number = signal.SIGALRM
        return self.signal_number

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number


def max_over_ranks(values: list[float]) -> list[float]:
    """Elementwise max of `values` over ranks: decisions (stop, early stop) that every rank must
    take together. All ranks must call it at the same point."""
    return _all_reduce(torch.tensor(values, dtype=torch.float64), dist.ReduceOp.MAX).tolist()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in one process) and return the tensor."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        nccl_needs_gpu = dist.get_backend() == "nccl" and not tensor.is_cuda  # NCCL reduces GPU tensors only
        reduced = tensor.cuda() if nccl_needs_gpu else tensor
        dist.all_reduce(reduced, op=op)
        tensor.copy_(reduced)  # a no-op where `reduced` is `tensor`
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank: DDP broadcasts them at
    the start of each forward, but the last training forward updates them locally, and every rank
    must validate with the statistics rank 0 saves in the checkpoint."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup(wait_for_all: bool = True) -> None:
    """Leave the process group. After a normal end, first wait for every rank: a rank that tears
    gloo down while a peer is still finishing its last checkpoint can abort the peer. After an
    error, leave at once (torchrun stops the other ranks)."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()
