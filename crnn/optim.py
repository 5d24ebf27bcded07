"""AdamW and the learning-rate schedule: linear warmup, then cosine decay, as a pure function of
the step and of the step where the decay ends (`Horizon`), so that resuming at step s gives
exactly the LR of step s."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class Horizon:
    """The step where the cosine decay ends: the run's planned steps. Set once more after the first
    steps of a run with a time budget (`train.max_minutes`), when its speed is known; a checkpoint
    carries it (RunState.planned_steps)."""

    steps: int


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    horizon: Horizon) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule is rebuilt from the config on resume (a checkpoint carries only the step and
    the horizon), so a resumed run may change `train.epochs` or the number of processes and get a
    matching schedule. The encoder's groups learn nothing (LR 0: its weights do not move, weight
    decay included) for the first `train.freeze_encoder_steps` steps."""

    def schedule(step: int) -> float:  # a plain function: LambdaLR does not save it
        return lr_multiplier(step, cfg.warmup_steps, horizon.steps, cfg.min_lr_ratio, cfg.schedule == "cosine")

    def frozen_schedule(step: int) -> float:
        return 0.0 if step < cfg.freeze_encoder_steps else schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [frozen_schedule if group.get("encoder") else schedule for group in optimizer.param_groups])


class WeightEma:
    """An exponential moving average of a model's weights (`train.ema`, the decay; HTR-VT, timm's
    ModelEma): after each optimizer step every floating-point entry of the state dict (parameters
    and BatchNorm statistics) moves towards the model's by 1 - decay, the decay warming up as
    min(decay, (1 + updates) / (10 + updates)) so that the first steps are not averaged with the
    random start. The run validates and saves these weights as its model; integer entries (BatchNorm's
    counters) are copied."""

    def __init__(self, model: nn.Module, decay: float, updates: int = 0):
        self.decay, self.updates = decay, updates
        self.state = {name: tensor.detach().clone().float() if tensor.is_floating_point() else tensor.detach().clone()
                      for name, tensor in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        floating = [name for name, tensor in self.state.items() if tensor.is_floating_point()]
        torch._foreach_lerp_([self.state[name] for name in floating],
                             [current[name].detach().float() for name in floating], 1.0 - decay)
        for name, tensor in self.state.items():
            if not tensor.is_floating_point():
                tensor.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, as a model state dict."""
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for name, tensor in self.state.items():
            tensor.copy_(state[name])
        self.updates = updates
