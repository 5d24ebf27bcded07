"""The optimizer (AdamW, or Muon on the hidden weight matrices) and the learning-rate schedule:
linear warmup, then cosine decay, as a pure function of the step and of the step where the decay
ends (`Horizon`), so that resuming at step s gives exactly the LR of step s."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.adamw import adamw

from crnn.config import TrainConfig
from crnn.device import warn_emulated_bf16


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


def muon_dtype(precision: str, amp_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """`train.muon_precision` -> the dtype of Muon's Newton-Schulz products; auto follows the
    training's autocast (`amp_dtype`): bf16 under bf16, float32 otherwise."""
    if precision == "auto":
        return torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32
    if precision == "bf16":
        warn_emulated_bf16("train.muon_precision", device)
    return {"float32": torch.float32, "bf16": torch.bfloat16}[precision]


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device,
                    world_size: int = 1, amp_dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm weights (1-D parameters); with
    `train.optimizer=muon`, `MuonAdamW`, Muon taking `hidden_matrices`. With
    `train.freeze_encoder_steps`, the encoder's parameters get groups of their own (`"encoder":
    True`), which the schedule holds at a learning rate of 0 while the encoder is frozen. `amp_dtype`,
    the training's autocast dtype, decides `train.muon_precision=auto` (`muon_dtype`)."""
    encoder = {id(p) for p in model.encoder.parameters()} if cfg.freeze_encoder_steps else set()
    muon = hidden_matrices(model) if cfg.optimizer == "muon" else {}
    groups = []
    for is_encoder in ([False, True] if encoder else [False]):  # the rest first: its LR is the one logged
        chosen = [p for p in model.parameters() if p.requires_grad and (id(p) in encoder) == is_encoder]
        for blocks in sorted(set(muon.values())):
            groups.append({"params": [p for p in chosen if muon.get(id(p)) == blocks], "weight_decay": cfg.weight_decay,
                           "encoder": is_encoder, "muon": True, "row_blocks": blocks})
        groups += [{"params": [p for p in chosen if p.ndim > 1 and id(p) not in muon], "weight_decay": cfg.weight_decay,
                    "encoder": is_encoder},
                   {"params": [p for p in chosen if p.ndim <= 1], "weight_decay": 0.0, "encoder": is_encoder}]
    if muon:
        return MuonAdamW(groups, lr=scaled_lr(cfg, world_size), ns_dtype=muon_dtype(cfg.muon_precision, amp_dtype, device))
    return torch.optim.AdamW(groups, lr=scaled_lr(cfg, world_size), fused=device.type == "cuda")


def hidden_matrices(model: nn.Module) -> dict[int, int]:
    """What Muon takes in a model, as {id: row blocks}: every weight of 2 or more dimensions but the
    first (the stem's convolution, which reads the pixels) and those whose rows are the classes (the
    model's CLASS_ROWS: the heads' outputs and the attention decoder's character embedding), as Muon
    is meant for hidden layers. An LSTM's weight stacks its four gates' matrices: 4 row blocks, each
    orthogonalised on its own; an attention layer's input projection stacks query, key and value: 3;
    1 for the rest."""
    named = [(name, p) for name, p in model.named_parameters() if p.ndim > 1]
    outputs = set(getattr(model, "CLASS_ROWS", ()))
    blocks = {id(p): 4 for module in model.modules() if isinstance(module, nn.LSTM) for p in module.parameters()}
    blocks.update({id(module.in_proj_weight): 3 for module in model.modules()
                   if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None})
    return {id(p): blocks.get(id(p), 1) for name, p in named[1:] if name not in outputs}


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024: fast to values in about [0.7, 1.2]
GRAM_ASPECT = 4  # a matrix this many times wider than tall is iterated on its Gram matrix


def orthogonalised(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`update` (a matrix, or a batch of them `(..., m, n)`) with its singular values pushed towards
    1 by `steps` quintic Newton-Schulz iterations (Jordan et al. 2024: coefficients that converge
    fast, to values in about [0.7, 1.2]), its products in `dtype` (float32, or bf16 as in Jordan et
    al.'s Muon: 2.5x faster on a CPU with AVX-512 BF16). A matrix at least `GRAM_ASPECT` times wider
    than tall (or taller than wide) takes the same iteration on its small Gram matrix
    (`gram_iterated`), always in float32 (its powers of the Gram matrix would lose bf16's few bits):
    a convolution's out-channels x (in-channels x kernel) matrix, mostly."""
    a, b, c = NEWTON_SCHULZ
    x = update.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    if x.shape[-1] >= GRAM_ASPECT * x.shape[-2]:
        x = gram_iterated(x, steps)
    else:
        shape, x = x.shape, x.to(dtype).reshape(-1, *x.shape[-2:])  # one batch dimension, for baddbmm
        for _ in range(steps):  # x <- a x + (b G + c G^2) x, each sum fused into its product
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.reshape(shape)
    return x if wide else x.mT


def gram_iterated(x: torch.Tensor, steps: int) -> torch.Tensor:
    """`orthogonalised`'s iteration on a wide `x` `(..., m, n)`, m << n, computed in m x m products.
    Each iteration multiplies x by a polynomial p_k of its Gram matrix G_k = x_k x_k^T, so
    x_k = P_k x_0 with P_k = p_{k-1}(G_{k-1}) ... p_0(G_0), and G_{k+1} = p_k(G_k) G_k p_k(G_k)
    (every factor a polynomial in G_0: they commute). Only the first Gram matrix and the last
    product touch the n columns: 2 m^2 n + 17 m^3 multiply-adds instead of 10 m^2 n + 5 m^3,
    2-4x faster for a 4-9x wide matrix, and within 1e-5 of the direct iteration on a convolution's
    gradient. Kept to wide matrices: on a near-square, ill-conditioned one (an LSTM gate's gradient) the
    small singular values, squared in G, are lost to float32 rounding (1e-3 off)."""
    a, b, c = NEWTON_SCHULZ
    gram = x @ x.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    product = None
    for step in range(steps):
        poly = a * eye + (b * gram + c * gram @ gram)
        product = poly if product is None else poly @ product
        if step < steps - 1:
            gram = poly @ (poly @ gram)
    return product @ x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param groups marked `"muon": True`, AdamW on the others, as one optimizer (one
    state dict, one schedule, one GradScaler). Muon (Jordan et al. 2024): a Nesterov momentum of the
    gradient, orthogonalised (`orthogonalised`; a convolution's weight as its out-channels x
    (in-channels x kernel) matrix) and scaled by 0.2 sqrt(max(rows, columns)), which gives it an
    AdamW update's RMS (Liu et al. 2025, "Muon is scalable"): the LR and weight decay tuned for
    AdamW apply as they are. A group's `"row_blocks": k` orthogonalises k blocks of rows apart (an
    LSTM's four gates). Weight decay is decoupled (multiplies the weights by 1 - lr * decay).
    `ns_dtype`: the dtype of the Newton-Schulz products (`train.muon_precision`)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 momentum: float = 0.95, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "momentum": momentum,
                                  "ns_steps": ns_steps, "muon": False})
        # not a group setting: a checkpoint's groups would bring theirs back on resume
        self.ns_dtype = ns_dtype

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
        update = p.grad.lerp(state["momentum_buffer"], momentum).reshape(blocks, len(p) // blocks, -1)  # Nesterov
        scale = 0.2 * math.sqrt(max(update.shape[1:]))
        p.add_(orthogonalised(update, group["ns_steps"], self.ns_dtype).reshape_as(p).to(p.dtype), alpha=-group["lr"] * scale)

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's own AdamW step (`torch.optim.adamw.adamw`, batched over the group on a GPU)."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


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
