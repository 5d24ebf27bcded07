"""AdamW and the learning-rate schedule: linear warmup, then cosine decay, as a pure function of
the step (LambdaLR), so that resuming at step s gives exactly the LR of step s."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from crnn.config import TrainConfig


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float,
                  cosine: bool = True) -> float:
    """LR multiplier at `step`: linear warmup to 1, then cosine to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """`train.lr` scaled for `world_size` processes as `train.lr_scaling` says."""
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[cfg.lr_scaling]
    return cfg.lr * factor


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device,
                    world_size: int = 1) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=scaled_lr(cfg, world_size), fused=device.type == "cuda")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule is rebuilt from the config on resume (a checkpoint carries only the step), so
    a resumed run may change `train.epochs` or the number of processes and get a matching schedule."""

    def schedule(step: int) -> float:  # a plain function: LambdaLR does not save it
        return lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule == "cosine")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
