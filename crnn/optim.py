"""The optimizer (AdamW, or Muon on the hidden weight matrices) and the learning-rate schedule:
linear warmup, then cosine decay, a pure function of the step, so that resuming at step s gives
exactly the LR of step s."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.adamw import adamw

from crnn.config import TrainConfig


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier at `step`: linear warmup to 1, then cosine to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """`train.lr` scaled for `world_size` processes as `train.lr_scaling` says."""
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[cfg.lr_scaling]
    return cfg.lr * factor


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device,
                    world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW without weight decay on 1-D parameters (biases, norm weights); with `train.optimizer=muon`,
    `MuonAdamW`, Muon taking `hidden_matrices`. With `train.freeze_encoder_steps`, the encoder gets
    groups of its own (`"encoder": True`), which the schedule holds at LR 0 while it is frozen."""
    encoder = {id(p) for p in model.encoder.parameters()} if cfg.freeze_encoder_steps else set()
    muon = hidden_matrices(model) if cfg.optimizer == "muon" else {}
    groups = []
    for is_encoder in ([False, True] if encoder else [False]):  # the rest first: its LR is the one logged
        chosen = [p for p in model.parameters() if p.requires_grad and (id(p) in encoder) == is_encoder]
        shared = {"weight_decay": cfg.weight_decay, "encoder": is_encoder}
        for blocks in sorted(set(muon.values())):
            groups.append({"params": [p for p in chosen if muon.get(id(p)) == blocks], **shared,
                           "muon": True, "row_blocks": blocks})
        groups += [{"params": [p for p in chosen if p.ndim > 1 and id(p) not in muon], **shared},
                   {"params": [p for p in chosen if p.ndim <= 1], "weight_decay": 0.0, "encoder": is_encoder}]
    if muon:
        return MuonAdamW(groups, lr=scaled_lr(cfg, world_size))
    return torch.optim.AdamW(groups, lr=scaled_lr(cfg, world_size), fused=device.type == "cuda")


def hidden_matrices(model: nn.Module) -> dict[int, int]:
    """What Muon takes in a model, as {id: row blocks}: every weight of 2 or more dimensions but the
    first (the stem's convolution, which reads the pixels) and those whose rows are the classes (the
    model's CLASS_ROWS: the heads' outputs), as Muon is meant for hidden layers. An LSTM's weight
    stacks its four gates' matrices: 4 row blocks, each orthogonalised on its own; 1 for the rest."""
    matrices = [(name, p) for name, p in model.named_parameters() if p.ndim > 1][1:]  # not the stem's
    lstms = {id(p) for module in model.modules() if isinstance(module, nn.LSTM) for p in module.parameters()}
    return {id(p): 4 if id(p) in lstms else 1 for name, p in matrices if name not in model.CLASS_ROWS}


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024: fast to values in about [0.7, 1.2]


def orthogonalised(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """`update` (a matrix, or a batch of them `(..., m, n)`) with its singular values pushed towards
    1 by `steps` quintic Newton-Schulz iterations (Jordan et al. 2024), in float32."""
    a, b, c = NEWTON_SCHULZ
    x = update.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    shape, x = x.shape, x.reshape(-1, *x.shape[-2:])  # one batch dimension, for baddbmm
    for _ in range(steps):  # x <- a x + (b G + c G^2) x, each sum fused into its product
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(shape)
    return x if wide else x.mT


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param groups marked `"muon": True`, AdamW on the others, as one optimizer (one
    state dict, one schedule, one GradScaler); docs/training.md describes Muon. Its orthogonalised
    update is scaled by 0.2 sqrt(max(rows, columns)) to an AdamW update's RMS (Liu et al. 2025), so the
    LR and weight decay tuned for AdamW apply; `"row_blocks": k` orthogonalises k blocks of rows apart."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                  "momentum": 0.95, "ns_steps": 5, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                for p in params:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    self._muon(p, group)
            elif params:
                self._adamw(params, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        momentum, blocks = group["momentum"], group.get("row_blocks", 1)
        state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
        nesterov = p.grad.lerp(state["momentum_buffer"], momentum)
        update = orthogonalised(nesterov.reshape(blocks, len(p) // blocks, -1), group["ns_steps"])
        scale = 0.2 * math.sqrt(max(update.shape[1:]))
        p.add_(update.reshape_as(p).to(p.dtype), alpha=-group["lr"] * scale)

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's own AdamW step (`torch.optim.adamw.adamw`, batched over the group on a GPU)."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
              beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then the cosine to its floor at `total_steps`; rebuilt from the config on resume (a
    checkpoint carries only the step), so a resumed run may change `train.epochs` or the process count.
    The encoder's groups stay at LR 0 (no weight decay either) for `train.freeze_encoder_steps` steps."""

    def schedule(step: int) -> float:  # a plain function: LambdaLR does not save it
        return lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)

    def frozen_schedule(step: int) -> float:
        return 0.0 if step < cfg.freeze_encoder_steps else schedule(step)

    schedules = [frozen_schedule if group.get("encoder") else schedule for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
