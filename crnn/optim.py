"""AdamW and the learning-rate schedule: linear warmup, then cosine decay, as a pure function of
the step (LambdaLR), so that resuming at step s gives exactly the LR of step s."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from crnn.config import TrainConfig


class WarmupCosine:
    """LR multiplier at `step`: linear warmup to 1, then cosine to `min_ratio` at `total_steps`.

    A callable object with plain attributes, so LambdaLR saves it in its state dict."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, cosine: bool = True):
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.min_ratio, self.cosine = min_ratio, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
