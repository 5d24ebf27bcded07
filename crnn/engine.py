"""One training epoch and one evaluation pass, in the shape of torchvision's reference scripts.

`train_epoch` is the epoch as a generator of optimizer steps: the run (crnn.trainer) iterates it,
logging and checkpointing between steps, and stops it by leaving the loop; nothing here calls back
up. `train_step` is one step: forward + CTC, backward, clip, optimizer and scheduler.

Mixed precision (the dtype comes from `crnn.device.resolve_amp`): autocast wraps the forward pass
and the loss only; the model returns float32 log-probs, so CTC always runs in float32. With fp16 a
GradScaler scales the loss and its gradients are unscaled before clipping.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from crnn.config import Config
from crnn.data import BatchAugmenter, build_augmenter
from crnn.data.collate import Batch
from crnn.data.vocab import BLANK
from crnn.device import autocast, resolve_amp
from crnn.distributed import all_reduce_sum, unwrap
from crnn.errors import CrnnError
from crnn.metrics import ErrorCounts
from crnn.models.heads import AttentionDecoder
from crnn.optim import Horizon, WeightEma, build_optimizer, build_scheduler
from crnn.runlog import progress


class TrainingError(CrnnError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class StepLosses(NamedTuple):
    """A step's detached loss sums over its lines: the main CTC head's, the shortcut head's and the
    attention decoder's (0 for a head the model does not have)."""

    main: torch.Tensor
    shortcut: torch.Tensor
    attention: torch.Tensor


def ctc_line_losses(log_probs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                    target_lengths: torch.Tensor) -> torch.Tensor:
    """Per-line CTC negative log-likelihood `(N,)`, computed in float32."""
    return F.ctc_loss(log_probs.float(), targets, lengths, target_lengths, blank=BLANK,
                      reduction="none", zero_infinity=False)


def prepare_batch(batch: Batch, setup: TrainSetup) -> Batch:
    """A loader's batch on the training device, augmented (each line by its own seed) if configured
    and the sampler gave seeds (none before `data.augment.start_epoch`)."""
    batch = batch.to(setup.device)
    if setup.augmenter is not None and any(seed is not None for seed in batch.seeds):
        images, widths = setup.augmenter(batch.images, batch.widths, batch.seeds)
        batch = dataclasses.replace(batch, images=images, widths=widths)
    return batch


def drop_infeasible(model: nn.Module, batch: Batch) -> tuple[Batch, int]:
    """Drop lines whose text needs more CTC frames than their width gives (they would be inf)."""
    frames = unwrap(model).output_lengths(batch.widths)
    keep = frames >= batch.min_frames
    if bool(keep.all()):
        return batch, 0
    return batch.select(keep), int((~keep).sum())


@dataclass
class EpochStats:
    loss_sum: float = 0.0  # sum over lines of the main CTC loss
    shortcut_loss_sum: float = 0.0
    attention_loss_sum: float = 0.0
    lines: int = 0
    batches: int = 0  # batches taken from the loader, skipped ones included (the resume position)
    steps: int = 0
    bad_steps: int = 0  # skipped: non-finite loss or gradients
    unreadable: int = 0  # samples skipped because their image could not be decoded
    too_long: int = 0  # samples skipped because their text did not fit the CTC frames
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # first few data problems, for the log

    def add(self, losses: StepLosses, lines: int) -> None:
        self.loss_sum += float(losses.main)
        self.shortcut_loss_sum += float(losses.shortcut)
        self.attention_loss_sum += float(losses.attention)
        self.lines += lines

    def count_skipped(self, errors: list[str], too_long: int) -> None:
        """Count a batch's skipped lines; keep the first few unreadable ones' reasons for the log (the
        too-long lines are only counted: the epoch's warning says how many)."""
        self.unreadable += len(errors)
        self.too_long += too_long
        self.problems.extend(errors[: max(0, 5 - len(self.problems))])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.lines, 1)

    @property
    def shortcut_loss(self) -> float:
        return self.shortcut_loss_sum / max(self.lines, 1)

    @property
    def attention_loss(self) -> float:
        return self.attention_loss_sum / max(self.lines, 1)

    @property
    def lines_per_s(self) -> float:
        return self.lines / max(self.seconds, 1e-9)

    def reduce(self, device: torch.device) -> None:
        """Sum the counters over ranks (a no-op in one process); `seconds` stays this rank's own."""
        sums = all_reduce_sum(torch.tensor(
            [self.loss_sum, self.shortcut_loss_sum, self.attention_loss_sum, self.lines, self.unreadable,
             self.too_long], dtype=torch.float64, device=device)).tolist()
        self.loss_sum, self.shortcut_loss_sum, self.attention_loss_sum = sums[:3]
        self.lines, self.unreadable, self.too_long = (int(v) for v in sums[3:])


@dataclass
class TrainSetup:
    """What a training step needs besides the model and the batch. Build it with `from_config`:
    every setting comes from the Config, so the trainer and the benchmark cannot drift apart."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float  # 0: no clipping
    shortcut_weight: float  # 0 without a shortcut head
    attention_weight: float  # 0 without an attention decoder
    max_bad_steps: int
    oom_retry: bool  # on out-of-memory, retry the batch in two halves (single process)
    augmenter: BatchAugmenter | None  # training batches' augmentation, on the device
    freeze_encoder_steps: int  # the encoder's BatchNorm statistics are held so long (its LR: crnn.optim)
    horizon: Horizon  # where the LR schedule ends: the scheduler reads it, a time budget sets it
    ema: WeightEma | None = None  # the weights' moving average (train.ema), updated after every step
    sam_rho: float = 0.0  # sharpness-aware steps (train.sam_rho): how far the second gradient is taken
    world_size: int = 1  # processes stepping together (DDP)
    # under DDP, where every rank must join every gradient all-reduce, a rank whose batch is left
    # empty (all its lines unreadable or too long) steps this blank line with a loss weight of 0
    placeholder: Batch | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_config(cls, cfg: Config, *, model: nn.Module, device: torch.device, total_steps: int,
                    world_size: int = 1) -> TrainSetup:
        """AdamW and the LR schedule over `total_steps` for `model` (bare, on `device`), the AMP
        mode (`resolve_amp`), clipping, the shortcut loss weight, the fault settings, the batch
        augmentation of `cfg`, and what `world_size` processes stepping together need."""
        amp_dtype = resolve_amp(cfg.train.amp, device)
        optimizer = build_optimizer(cfg.train, model, device, world_size, amp_dtype)
        horizon = Horizon(total_steps)
        ema = WeightEma(model, cfg.train.ema) if cfg.train.ema else None
        return cls(optimizer=optimizer, scheduler=build_scheduler(cfg.train, optimizer, horizon), horizon=horizon, ema=ema,
                   sam_rho=cfg.train.sam_rho,
                   scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                   device=device, amp_dtype=amp_dtype, grad_clip=cfg.train.grad_clip,
                   shortcut_weight=cfg.model.shortcut_weight if cfg.model.shortcut else 0.0,
                   attention_weight=cfg.model.attention_weight if cfg.model.attention_layers else 0.0,
                   max_bad_steps=cfg.train.max_bad_steps, oom_retry=cfg.train.oom_retry,
                   augmenter=build_augmenter(cfg.data), freeze_encoder_steps=cfg.train.freeze_encoder_steps,
                   world_size=world_size,
                   placeholder=Batch.blank(cfg.data.height, cfg.data.height) if world_size > 1 else None)


def attention_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The attention decoder's cross-entropy `logits` `(L + 1, N, classes)` against `targets`
    `(N, L)` (`Batch.padded_targets`), summed over every line's characters and end token, in float32."""
    return F.cross_entropy(logits.float().permute(1, 2, 0), AttentionDecoder.labels(targets),
                           ignore_index=AttentionDecoder.IGNORE, reduction="sum")


def forward_backward(model: nn.Module, batch: Batch, setup: TrainSetup, weight: float = 1.0,
                     normalizer: int = 0) -> StepLosses:
    """Forward + losses under autocast, then backward of the (scaled) loss, accumulating gradients.

    The loss is the per-line mean over `normalizer` lines (default: this batch), so the halves of
    a split batch add up to the gradient of the whole. Returns the detached sums of each loss.
    """
    batch = batch.to(setup.device)  # a no-op for a batch prepare_batch has moved
    # a model with an attention decoder is always given the text (even at weight 0), so that every
    # parameter takes part in every step, as DDP requires
    targets = batch.padded_targets() if getattr(unwrap(model), "attention", None) is not None else None
    with autocast(setup.device, setup.amp_dtype):
        output = model(batch.images, batch.widths, targets=targets)
        main = ctc_line_losses(output.log_probs, output.lengths, batch.targets, batch.target_lengths).sum()
        shortcut = attention = torch.zeros((), device=setup.device)
        if output.shortcut_log_probs is not None:
            shortcut = ctc_line_losses(output.shortcut_log_probs, output.lengths, batch.targets,
                                       batch.target_lengths).sum()
        if output.attention_logits is not None:
            attention = attention_loss(output.attention_logits, targets)
        loss = weight * (main + setup.shortcut_weight * shortcut + setup.attention_weight * attention)
        loss = loss / (normalizer or len(batch))
    setup.scaler.scale(loss).backward()
    return StepLosses(main.detach(), shortcut.detach(), attention.detach())


def out_of_memory_error(batch: Batch, epoch: int, step: int) -> TrainingError:
    height, width = batch.images.shape[-2:]
    return TrainingError(
        f"out of memory on a batch of {len(batch)} lines of {height}x{width} px (widest line; epoch "
        f"{epoch}, step {step + 1}): lower data.batch_size or data.max_width, or use train.amp"
    )


def backward_in_halves(model: nn.Module, batch: Batch, setup: TrainSetup, weight: float,
                       epoch: int, step: int) -> StepLosses:
    """After an out-of-memory error: the same gradient, computed half a batch at a time."""
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    keep = torch.arange(len(batch)) < len(batch) // 2
    sums = []
    try:
        for half in (batch.select(keep), batch.select(~keep)):
            sums.append(forward_backward(model, half, setup, weight, normalizer=len(batch)))
    except torch.OutOfMemoryError:
        raise out_of_memory_error(batch, epoch, step) from None
    return StepLosses(*(first + second for first, second in zip(*sums, strict=True)))


def clip_and_step(model: nn.Module, setup: TrainSetup) -> bool:
    """Unscale, clip, step. Returns False if the step was skipped (non-finite gradients)."""
    setup.scaler.unscale_(setup.optimizer)
    max_norm = setup.grad_clip if setup.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # the norm of the gradients, which DDP has already averaged: every rank takes the same decision
    finite = bool(torch.isfinite(grad_norm))
    if setup.scaler.is_enabled():
        setup.scaler.step(setup.optimizer)  # skips the update itself on inf/NaN gradients
        setup.scaler.update()
    elif finite:
        setup.optimizer.step()
    setup.scheduler.step()
    return finite


def gradient(model: nn.Module, batch: Batch, setup: TrainSetup, weight: float, epoch: int,
             step: int) -> StepLosses:
    """`forward_backward` on `batch` from zeroed gradients, or, after an out-of-memory error, the
    same gradient half a batch at a time (`train.oom_retry`)."""
    setup.optimizer.zero_grad(set_to_none=True)
    try:
        return forward_backward(model, batch, setup, weight)
    except torch.OutOfMemoryError:
        # under DDP the other ranks are already waiting in the gradient all-reduce: no retry
        if not setup.oom_retry or setup.distributed or len(batch) < 2:
            raise out_of_memory_error(batch, epoch, step) from None
        return backward_in_halves(model, batch, setup, weight, epoch, step)


@contextmanager
def batchnorm_statistics_kept(module: nn.Module):
    """BatchNorm layers normalise by the batch's statistics inside the block, as in training, but
    their running statistics come out as they went in."""
    buffers = [buffer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
               for buffer in layer.buffers()]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def sharpness_aware_gradient(model: nn.Module, batch: Batch, setup: TrainSetup, weight: float, epoch: int,
                             step: int) -> None:
    """SAM (Foret et al. 2021), after the batch's gradient g is in the parameters' .grad: replace it
    with the gradient at w + rho g / |g|, the worst point of a small ball around the weights w, then
    put the weights back as they were (bit for bit). The second pass leaves BatchNorm's running
    statistics alone. The direction does not depend on fp16's loss scale, and under DDP g is
    already averaged, so every rank moves alike. A non-finite g is left for `clip_and_step` to
    skip."""
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        if not torch.isfinite(norm):
            return
        original = [p.detach().clone() for p in params]
        torch._foreach_add_(params, [p.grad * (setup.sam_rho / (norm + 1e-12)) for p in params])
    with batchnorm_statistics_kept(model):
        gradient(model, batch, setup, weight, epoch, step)
    with torch.no_grad():
        torch._foreach_copy_(params, original)


def train_step(model: nn.Module, batch: Batch, setup: TrainSetup, weight: float = 1.0, epoch: int = 0,
               step: int = 0) -> tuple[bool, StepLosses]:
    """One optimizer step on `batch` (`epoch` and `step` only name it in errors), with the
    sharpness-aware gradient under `train.sam_rho`. Returns (finite, the step's loss sums: at the
    weights as they are)."""
    losses = gradient(model, batch, setup, weight, epoch, step)
    if setup.sam_rho:
        sharpness_aware_gradient(model, batch, setup, weight, epoch, step)
    return clip_and_step(model, setup), losses


def check_bad_steps(bad_in_a_row: int, setup: TrainSetup, epoch: int, step: int) -> None:
    # with fp16 the GradScaler skips overflowing steps while it finds its scale: only steps that
    # are non-finite even at a scale below 1 count against train.max_bad_steps
    if setup.scaler.is_enabled() and setup.scaler.get_scale() >= 1.0:
        return
    if bad_in_a_row > setup.max_bad_steps:
        raise TrainingError(
            f"{bad_in_a_row} training steps in a row had non-finite gradients (epoch {epoch}, step "
            f"{step}; train.max_bad_steps={setup.max_bad_steps}): lower train.lr, set "
            f"train.grad_clip, or try train.amp=off"
        )


def hold_batchnorm(module: nn.Module, hold: bool) -> None:
    """BatchNorm layers of `module` use (and keep) their running statistics while `hold`."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.train(not hold)


def train_epoch(model: nn.Module, loader, setup: TrainSetup, epoch: int, step: int,
                stats: EpochStats | None = None, show_progress: bool = True) -> Iterator[tuple[int, EpochStats]]:
    """One pass over `loader` (or what is left of it, continuing `stats`), as a generator: after
    each optimizer step it yields (the new step number, the epoch's stats so far). The caller
    logs, checkpoints or stops between steps; leaving its loop ends the epoch there.

    A batch left empty (all its lines unreadable or too long) is skipped; under DDP its rank steps
    `setup.placeholder` instead, so that every rank joins every gradient all-reduce.
    """
    model.train()
    stats = stats or EpochStats()
    bad_in_a_row, start = 0, time.perf_counter() - stats.seconds
    bar = progress(loader, f"epoch {epoch}", show_progress)
    try:
        for batch in bar:
            stats.batches += 1
            batch, too_long = drop_infeasible(model, prepare_batch(batch, setup))
            stats.count_skipped(batch.errors, too_long)
            weight = 1.0
            if len(batch) == 0:
                if setup.placeholder is None:
                    continue
                batch, weight = setup.placeholder, 0.0
            if setup.freeze_encoder_steps:
                hold_batchnorm(unwrap(model).encoder, step < setup.freeze_encoder_steps)
            finite, losses = train_step(model, batch, setup, weight, epoch, step)
            if finite and setup.ema is not None:
                setup.ema.update(unwrap(model))
            step += 1
            stats.steps += 1
            stats.bad_steps += not finite
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            check_bad_steps(bad_in_a_row, setup, epoch, step)
            if finite and weight:
                stats.add(losses, len(batch))
            stats.seconds = time.perf_counter() - start
            if stats.steps % 10 == 0:
                bar.set_postfix(loss=f"{stats.loss:.3f}", lines_per_s=f"{stats.lines_per_s:.1f}")
            yield step, stats
        stats.seconds = time.perf_counter() - start  # the loader's last (skipped) batches too
    finally:
        bar.close()


@dataclass
class EvalResult:
    loss: float
    counts: dict[str, ErrorCounts]  # per decoder name
    decode_seconds: dict[str, float]
    seconds: float  # the whole pass: loading, forward, loss and every decoder
    unreadable: int = 0
    too_long: int = 0
    problems: list[str] = field(default_factory=list)
    samples: list[tuple[torch.Tensor, str, str]] = field(default_factory=list)  # image, ref, hyp
    predictions: dict[str, list[tuple[int, str, str]]] = field(default_factory=dict)  # index, ref, hyp


def _reduce_eval(result: EvalResult, loss_sum: float, loss_lines: int, device: torch.device) -> EvalResult:
    """Sum everything across ranks, then divide: equal to one process evaluating all lines."""
    names = sorted(result.counts)
    local = torch.cat([torch.tensor([loss_sum, loss_lines, result.unreadable, result.too_long],
                                    dtype=torch.float64)]
                      + [result.counts[name].to_tensor() for name in names]).to(device)
    total = all_reduce_sum(local).cpu()
    result.loss = float(total[0]) / max(float(total[1]), 1.0)
    result.unreadable, result.too_long = int(total[2]), int(total[3])
    for i, name in enumerate(names):
        result.counts[name] = ErrorCounts.from_tensor(total[4 + 5 * i: 9 + 5 * i])
    return result


def submit_decoding(decoder, log_probs: torch.Tensor, lengths: torch.Tensor) -> Callable[[], list[str]]:
    """Start decoding; the returned function gives the texts. Decoders that run in other processes
    (`submit`) work meanwhile; the others decode here and now."""
    if hasattr(decoder, "submit"):
        return decoder.submit(log_probs, lengths)
    texts = decoder(log_probs, lengths)
    return lambda: texts


def _score(result: EvalResult, batch: Batch, pending: dict, keep_samples: int, keep_predictions: bool) -> None:
    """Collect a batch's decodings (`pending`: name -> (result function, seconds so far))."""
    for position, (name, (texts_of, seconds)) in enumerate(pending.items()):
        wait_start = time.perf_counter()
        hypotheses = texts_of()
        result.decode_seconds[name] += seconds + time.perf_counter() - wait_start
        result.counts[name].update(batch.texts, hypotheses)
        if keep_predictions:
            result.predictions[name].extend(zip(batch.indices, batch.texts, hypotheses, strict=True))
        if position == 0 and len(result.samples) < keep_samples:
            take = keep_samples - len(result.samples)
            result.samples.extend((batch.images[i, :, :, : int(batch.widths[i])].cpu(), batch.texts[i], hypotheses[i])
                                  for i in range(min(take, len(batch))))


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device,
             decoders: Mapping[str, Callable[[torch.Tensor, torch.Tensor], list[str]]],
             amp_dtype: torch.dtype | None = None, keep_samples: int = 0,
             keep_predictions: bool = False, show_progress: bool = True, desc: str = "validate") -> EvalResult:
    """Loss and CER/WER for each decoder over `loader`, reduced across ranks.

    `decoders`: name -> a `crnn.decoding.Decoder`, `(log_probs (T, N, C), lengths (N,)) -> N strings`.
    A batch's decodings are collected after the next batch's forward pass, so that decoders running
    in other processes overlap with it. `decode_seconds` is the time each decoder held this process.
    """
    model.eval()
    result = EvalResult(0.0, {name: ErrorCounts() for name in decoders}, dict.fromkeys(decoders, 0.0), 0.0)
    result.predictions = {name: [] for name in decoders} if keep_predictions else {}
    loss_sum, loss_lines, start, previous = 0.0, 0, time.perf_counter(), None
    for batch in progress(loader, desc, show_progress):
        result.unreadable += len(batch.errors)
        result.problems.extend(batch.errors)
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        with autocast(device, amp_dtype):
            output = model(batch.images, batch.widths)
        feasible = output.lengths.cpu() >= batch.min_frames
        result.too_long += int((~feasible).sum())
        if feasible.any():
            kept, on_device = batch.select(feasible), feasible.to(device)
            losses = ctc_line_losses(output.log_probs[:, on_device], output.lengths[on_device], kept.targets,
                                     kept.target_lengths)
            loss_sum, loss_lines = loss_sum + float(losses.sum()), loss_lines + len(kept)
        pending = {}
        for name, decoder in decoders.items():
            submit_start = time.perf_counter()
            pending[name] = (submit_decoding(decoder, output.log_probs, output.lengths),
                             time.perf_counter() - submit_start)
        if previous is not None:
            _score(result, *previous, keep_samples, keep_predictions)
        previous = (batch, pending)
    if previous is not None:
        _score(result, *previous, keep_samples, keep_predictions)
    result.seconds = time.perf_counter() - start
    return _reduce_eval(result, loss_sum, loss_lines, device)
