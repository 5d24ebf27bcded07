"""torchrun environment -> process group, device and rank helpers (also fine without torchrun).

    torchrun --standalone --nproc_per_node=2 tools/train.py --cfg experiments/tiny.yaml

NCCL on CUDA, gloo on CPU. Without torchrun's variables everything runs as rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from crnn.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device`: auto (CUDA if present), cpu, cuda, or cuda:N."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"'train.device' must be auto, cpu, cuda or cuda:N, got '{name}'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("'train.device' asks for CUDA, but no CUDA device is available; use train.device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"'train.device' must be auto, cpu, cuda or cuda:N, got '{name}'")
    return device


def setup(device_name: str = "auto") -> DistInfo:
    """Read RANK/LOCAL_RANK/WORLD_SIZE (set by torchrun), join the process group, pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        options = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **options)
    return DistInfo(rank, local_rank, world_size, device)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in one process) and return the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and not tensor.is_cuda:  # NCCL reduces GPU tensors only
            on_device = tensor.cuda()
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            tensor.copy_(on_device.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
