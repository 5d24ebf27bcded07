"""The CTC loss and one evaluation pass, in the shape of torchvision's reference scripts (the
training loop itself is `crnn.trainer.train`). Autocast wraps the forward pass and the loss only;
the model returns float32 log-probs, so CTC always runs in float32."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from crnn.data.collate import Batch
from crnn.data.records import Part
from crnn.data.vocab import BLANK
from crnn.device import autocast
from crnn.distributed import all_reduce_sum
from crnn.errors import CrnnError
from crnn.metrics import ErrorCounts
from crnn.runlog import progress


class TrainingError(CrnnError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def ctc_line_losses(log_probs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                    target_lengths: torch.Tensor) -> torch.Tensor:
    """Per-line CTC negative log-likelihood `(N,)`, in float32; inf for a line with too few frames."""
    return F.ctc_loss(log_probs.float(), targets, lengths, target_lengths, blank=BLANK, reduction="none")


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
    # with several sources: per source name, per decoder name
    by_source: dict[str, dict[str, ErrorCounts]] = field(default_factory=dict)


def _reduce_eval(result: EvalResult, loss_sum: float, loss_lines: int, device: torch.device) -> EvalResult:
    """Sum everything across ranks, then divide: equal to one process evaluating all lines."""
    names = sorted(result.counts)
    tables = [result.counts, *result.by_source.values()]
    local = torch.cat([torch.tensor([loss_sum, loss_lines, result.unreadable, result.too_long],
                                    dtype=torch.float64)]
                      + [table[name].to_tensor() for table in tables for name in names]).to(device)
    total = all_reduce_sum(local).cpu()
    result.loss = float(total[0]) / max(float(total[1]), 1.0)
    result.unreadable, result.too_long = int(total[2]), int(total[3])
    sums = iter(total[4:].split(5))
    for table in tables:
        for name in names:
            table[name] = ErrorCounts.from_tensor(next(sums))
    return result


def submit_decoding(decoder, log_probs: torch.Tensor, lengths: torch.Tensor) -> Callable[[], list[str]]:
    """Start decoding; the returned function gives the texts. Decoders that run in other processes
    (`submit`) work meanwhile; the others decode here and now."""
    if hasattr(decoder, "submit"):
        return decoder.submit(log_probs, lengths)
    texts = decoder(log_probs, lengths)
    return lambda: texts


def _score(result: EvalResult, batch: Batch, pending: dict, keep_samples: int, keep_predictions: bool,
           parts: Sequence[Part]) -> None:
    """Collect a batch's decodings (`pending`: name -> (result function, seconds so far))."""
    for position, (name, (texts_of, seconds)) in enumerate(pending.items()):
        wait_start = time.perf_counter()
        hypotheses = texts_of()
        result.decode_seconds[name] += seconds + time.perf_counter() - wait_start
        result.counts[name].update(batch.texts, hypotheses)
        if result.by_source:
            starts = [part.start for part in parts]
            for index, reference, hypothesis in zip(batch.indices, batch.texts, hypotheses, strict=True):
                part = parts[bisect.bisect_right(starts, index) - 1]
                result.by_source[part.name][name].update([reference], [hypothesis])
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
    """Loss and CER/WER for each decoder over `loader`, reduced across ranks; with several sources
    (`loader.dataset.records.parts`), also each source's (`by_source`).

    `decoders`: name -> a `crnn.decoding.Decoder`, `(log_probs (T, N, C), lengths (N,)) -> N strings`.
    A batch's decodings are collected after the next batch's forward pass, so that decoders running
    in other processes overlap with it. `decode_seconds` is the time each decoder held this process.
    """
    model.eval()
    result = EvalResult(0.0, {name: ErrorCounts() for name in decoders}, dict.fromkeys(decoders, 0.0), 0.0)
    result.predictions = {name: [] for name in decoders} if keep_predictions else {}
    parts = loader.dataset.records.parts
    if len(parts) > 1:
        result.by_source = {part.name: {name: ErrorCounts() for name in decoders} for part in parts}
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
            _score(result, *previous, keep_samples, keep_predictions, parts)
        previous = (batch, pending)
    if previous is not None:
        _score(result, *previous, keep_samples, keep_predictions, parts)
    result.seconds = time.perf_counter() - start
    return _reduce_eval(result, loss_sum, loss_lines, device)
