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
    """AdamW without weight decay on biases and norm weights (1-D parameters). With
    `train.freeze_encoder_steps`, the encoder's parameters get groups of their own (`"encoder":
    True`), which the schedule holds at a learning rate of 0 while the encoder is frozen."""
    encoder = {id(p) for p in model.encoder.parameters()} if cfg.freeze_encoder_steps else set()
    groups = []
    for is_encoder in ([False, True] if encoder else [False]):  # the rest first: its LR is the one logged
        chosen = [p for p in model.parameters() if p.requires_grad and (id(p) in encoder) == is_encoder]
        groups += [{"params": [p for p in chosen if p.ndim > 1], "weight_decay": cfg.weight_decay, "encoder": is_encoder},
                   {"params": [p for p in chosen if p.ndim <= 1], "weight_decay": 0.0, "encoder": is_encoder}]
    return torch.optim.AdamW(groups, lr=scaled_lr(cfg, world_size), fused=device.type == "cuda")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule is rebuilt from the config on resume (a checkpoint carries only the step), so
    a resumed run may change `train.epochs` or the number of processes and get a matching schedule.
    The encoder's groups learn nothing (LR 0: its weights do not move, weight decay included) for
    the first `train.freeze_encoder_steps` steps."""

    def schedule(step: int) -> float:  # a plain function: LambdaLR does not save it
        return lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule == "cosine")

    def frozen_schedule(step: int) -> float:
        return 0.0 if step < cfg.freeze_encoder_steps else schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [frozen_schedule if group.get("encoder") else schedule for group in optimizer.param_groups])
