"""`fit(cfg)`: a whole training run, from data to the run directory (docs/training.md: the loop,
the run directory, resuming, stops). Only rank 0 writes there; all ranks train.

    fit -> build_run (data, run directory, loaders, model, optimizer) -> train (the loop, one
    function) -> calibrate_run (once, at the end)

`train` reads top to bottom: batch to device, augment, forward and CTC under autocast, backward,
unscale and clip, optimizer and schedule step; every `train.log_every` steps it reads the device,
logs and agrees with the other ranks whether to stop. Checkpoints carry the position inside the
epoch, so `train.resume=auto` continues at the right batch, as an unbroken run would.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from crnn import distributed
from crnn.calibration import fit_calibration
from crnn.checkpoint import (
    ModelFile,
    RunState,
    TrainingCheckpoint,
    load_checkpoint,
    load_newest_valid,
    rng_state,
    save_checkpoint,
    set_rng_state,
    store_calibration,
)
from crnn.config import Config, architecture_changes, check_best, config_from_dict, config_yaml
from crnn.data import (
    BatchAugmenter,
    LineRecords,
    Preprocess,
    Vocab,
    build_augmenter,
    build_dataset,
    build_loader,
    load_records,
    shut_down,
)
from crnn.data.check import check_records
from crnn.data.collate import Batch
from crnn.data.records import problem_summary, require_lines
from crnn.decoding import GreedyDecoder
from crnn.device import AMP_NAMES, autocast, check_device_options, memory_format, resolve_amp
from crnn.distributed import DataParallelCRNN, DistInfo, StopRequest, unwrap
from crnn.engine import EvalResult, TrainingError, ctc_line_losses, evaluate
from crnn.errors import CheckpointError, ConfigError, DataError
from crnn.finetune import initial_vocab, normalization_change, starting_weights
from crnn.inference import labelled_lines, load_trained_model
from crnn.models import build_model
from crnn.optim import build_optimizer, build_scheduler, scaled_lr
from crnn.outputs import RunLock, atomic_write, atomic_write_text
from crnn.runlog import RunLogger, progress


@dataclass
class Run:
    """What a run's loop needs, built by `build_run`."""

    cfg: Config
    dist: DistInfo
    logger: RunLogger
    vocab: Vocab
    train_loader: DataLoader
    val_loader: DataLoader
    model: nn.Module  # wrapped (DDP, DataParallel) as the config asks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    amp_dtype: torch.dtype | None
    augmenter: BatchAugmenter | None
    state: RunState
    # under DDP, a rank whose batch is left empty steps this blank line (loss weight 0) to join the all-reduce
    placeholder: Batch | None = None


@dataclass
class EpochStats:
    """An epoch's sums so far. `device` holds the per-step sums on the training device (main and
    shortcut loss, lines, non-finite steps, the current and the longest run of them in a row), so
    that a step never waits for the device; `read()` brings them over at the logging interval."""

    device: torch.Tensor
    batches: int = 0  # taken from the loader, skipped ones included (the resume position)
    steps: int = 0
    unreadable: int = 0  # lines skipped because their image could not be decoded
    too_long: int = 0  # lines skipped because their text needs more CTC frames than the line gives
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # the first few unreadable lines, for the log

    SUMS = ("loss_sum", "shortcut_loss_sum", "lines", "bad_steps", "bad_run", "worst_bad_run")

    @classmethod
    def resumed(cls, saved: dict, device: torch.device, is_main: bool) -> EpochStats:
        """From a checkpoint's `epoch_stats` (empty for a new epoch): the totals on rank 0 (they were
        summed over the ranks), only the position elsewhere."""
        saved = saved if is_main else {"batches": saved.get("batches", 0)}
        sums = torch.tensor([float(saved.get(name, 0)) for name in cls.SUMS], dtype=torch.float64, device=device)
        return cls(sums, **{key: saved[key] for key in ("batches", "steps", "unreadable", "too_long", "seconds",
                                                        "problems") if key in saved})

    def count_skipped(self, errors: list[str], too_long: int) -> None:
        """A batch's skipped lines; the first few unreadable ones' reasons are kept for the log."""
        self.unreadable += len(errors)
        self.too_long += too_long
        self.problems.extend(errors[: max(0, 5 - len(self.problems))])

    def add_step(self, main: torch.Tensor, shortcut: torch.Tensor, finite: torch.Tensor, lines: int) -> None:
        """A step's loss sums (counted if its gradients were finite and its lines real), on the device."""
        self.steps += 1
        counted = finite if lines else torch.zeros_like(finite)
        step = torch.stack([main.double(), shortcut.double(), torch.full_like(main, lines, dtype=torch.float64)])
        self.device[:3] += torch.where(counted, step, 0.0)
        bad = (~finite).double()
        self.device[3] += bad
        self.device[4] = (self.device[4] + 1) * bad
        self.device[5] = torch.maximum(self.device[5], self.device[4])

    def read(self) -> dict:
        """Everything as plain numbers (one device sync), with the mean losses and the speed."""
        return with_means(dict(zip(self.SUMS, self.device.tolist(), strict=True)), self.seconds)

    def to_dict(self) -> dict:
        """The loss sums, lines and skipped lines summed over the ranks; the non-finite steps (every
        rank takes the same), the position and the time this rank's."""
        skipped = torch.tensor([self.unreadable, self.too_long], dtype=torch.float64, device=self.device.device)
        totals = distributed.all_reduce_sum(torch.cat([self.device[:3], skipped])).tolist()
        values = dict(zip(self.SUMS, totals[:3] + self.device[3:].tolist(), strict=True))
        return {**values, "unreadable": int(totals[3]), "too_long": int(totals[4]), "batches": self.batches,
                "steps": self.steps, "seconds": self.seconds, "problems": self.problems}


def with_means(values: dict, seconds: float) -> dict:
    """`values` (EpochStats sums) with the mean losses per line and the lines per second."""
    lines = max(values["lines"], 1.0)
    return {**values, "loss": values["loss_sum"] / lines, "shortcut_loss": values["shortcut_loss_sum"] / lines,
            "lines_per_s": values["lines"] / max(seconds, 1e-9)}


def train(run: Run, deadline: float | None = None) -> RunState:
    """Train to the end, or until a stop signal, the `deadline` (time.monotonic()) or
    `train.max_minutes`: epoch after epoch, step after step."""
    cfg, train_cfg, state, model = run.cfg, run.cfg.train, run.state, run.model
    device, bare = run.dist.device, unwrap(run.model)
    max_norm = train_cfg.grad_clip or math.inf
    with StopRequest(deadline) as stop, shut_down_at_exit(run.train_loader, run.val_loader):
        for epoch in range(state.epoch + 1, train_cfg.epochs + 1):
            stats = EpochStats.resumed(state.epoch_stats, device, run.dist.is_main)
            run.train_loader.batch_sampler.set_epoch(epoch, start_batch=stats.batches)
            model.train()
            started, out_of_time = time.perf_counter() - stats.seconds, False
            bar = progress(run.train_loader, f"epoch {epoch}", run.dist.is_main)
            for batch in bar:
                stats.batches += 1
                batch = batch.to(device)
                if run.augmenter is not None and any(seed is not None for seed in batch.seeds):
                    images, widths = run.augmenter(batch.images, batch.widths, batch.seeds)
                    batch = dataclasses.replace(batch, images=images, widths=widths)
                # widths stay on the CPU: the frames of each line, and which lines CTC can align, are
                # known without waiting for the device
                frames = bare.output_lengths(batch.widths)
                feasible = frames >= batch.min_frames
                stats.count_skipped(batch.errors, int((~feasible).sum()))
                if not bool(feasible.all()):
                    batch, frames = batch.select(feasible), frames[feasible]
                weight = 1.0
                if len(batch) == 0:
                    if run.placeholder is None:
                        continue
                    batch, weight = run.placeholder.to(device), 0.0
                    frames = bare.output_lengths(batch.widths)
                if train_cfg.freeze_encoder_steps:
                    hold_batchnorm(bare.encoder, state.step < train_cfg.freeze_encoder_steps)

                run.optimizer.zero_grad(set_to_none=True)
                with autocast(device, run.amp_dtype):
                    output = model(batch.images, batch.widths)
                    main = ctc_line_losses(output.log_probs, frames, batch.targets, batch.target_lengths).sum()
                    shortcut = torch.zeros((), device=device)
                    if output.shortcut_log_probs is not None:
                        shortcut = ctc_line_losses(output.shortcut_log_probs, frames, batch.targets,
                                                   batch.target_lengths).sum()
                    loss = weight * (main + cfg.model.shortcut_weight * shortcut) / len(batch)
                run.scaler.scale(loss).backward()
                run.scaler.unscale_(run.optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                finite = torch.isfinite(grad_norm)  # DDP averaged the gradients: every rank agrees
                if not run.scaler.is_enabled():
                    zero_non_finite(model)  # fp16's scaler skips such a step itself
                run.scaler.step(run.optimizer)
                run.scaler.update()
                run.scheduler.step()
                state.step += 1
                stats.add_step(main.detach(), shortcut.detach(), finite, len(batch) if weight else 0)
                stats.seconds = time.perf_counter() - started

                if state.step % train_cfg.log_every == 0:  # the only reads from the device, and the stop vote
                    values = stats.read()
                    check_bad_steps(values["worst_bad_run"], run, epoch)
                    run.logger.scalars(state.step, {"train/loss": values["loss"], "train/lines_per_s":
                                                    values["lines_per_s"], "train/shortcut_loss":
                                                    values["shortcut_loss"], "train/lr": run.scheduler.get_last_lr()[0]})
                    bar.set_postfix(loss=f"{values['loss']:.3f}", lines_per_s=f"{values['lines_per_s']:.1f}")
                    signal_number, out_of_time = distributed.max_over_ranks(
                        [stop.requested() or 0, minutes_out(train_cfg.max_minutes, state.train_seconds + stats.seconds)])
                    state.stopped_by = int(signal_number) or None
                every = train_cfg.checkpoint_every_steps
                if state.stopped_by or (every and state.step % every == 0):
                    state.epoch_stats = stats.to_dict()
                    save(run, {})
                if state.stopped_by or out_of_time or steps_out(cfg, state):
                    break
            bar.close()
            stats.seconds = time.perf_counter() - started
            if state.stopped_by:
                report_stop(run)
                break
            if end_epoch(run, epoch, stats):
                break
    best = f"best validation CER {state.best_cer:.4f}" if math.isfinite(state.best_cer) else "no validation yet"
    run.logger.info("done: %s; run directory %s", best, cfg.train.output_dir)
    run.logger.close()
    return state


def zero_non_finite(model: nn.Module) -> None:
    """After clipping, a non-finite gradient norm has made every gradient non-finite (or zero): zero
    them, so the optimizer coasts on its momentum instead of writing NaN (docs/training.md). No sync."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            torch.nan_to_num_(parameter.grad, nan=0.0, posinf=0.0, neginf=0.0)


def check_bad_steps(worst_run: float, run: Run, epoch: int) -> None:
    """TrainingError after more than `train.max_bad_steps` non-finite steps in a row (with fp16, only
    once the scaler's scale is below 1: it skips overflowing steps while it finds its scale)."""
    limit = run.cfg.train.max_bad_steps
    if worst_run <= limit or (run.scaler.is_enabled() and run.scaler.get_scale() >= 1.0):
        return
    raise TrainingError(f"{int(worst_run)} training steps in a row had non-finite gradients (epoch {epoch}, before "
                        f"step {run.state.step}; train.max_bad_steps={limit}): lower train.lr, set train.grad_clip, "
                        f"or try train.amp=off")


def hold_batchnorm(module: nn.Module, hold: bool) -> None:
    """BatchNorm layers of `module` use (and keep) their running statistics while `hold`."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.train(not hold)


def total_steps(cfg: Config, loader: DataLoader) -> int:
    """The run's length in optimizer steps, where the LR schedule ends: train.epochs, or
    train.max_steps if sooner (`loader` before any `set_epoch` that starts mid-epoch)."""
    steps = cfg.train.epochs * len(loader.batch_sampler)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def steps_out(cfg: Config, state: RunState) -> bool:
    """`train.max_steps` are done (else the run ends with its epochs)."""
    return bool(cfg.train.max_steps and state.step >= cfg.train.max_steps)


def minutes_out(max_minutes: float, train_seconds: float) -> bool:
    """`train.max_minutes` of training steps are spent."""
    return bool(max_minutes and train_seconds >= 60 * max_minutes)


def end_epoch(run: Run, epoch: int, stats: EpochStats) -> bool:
    """Validate, log, checkpoint, decide on early stopping. Returns True to stop."""
    state, cfg = run.state, run.cfg
    values = with_means(stats.to_dict(), stats.seconds)  # summed over ranks
    result = validate(run)
    for split, lines in (("training", values["lines"]), ("validation", result.counts["greedy"].lines)):
        if not lines:  # not a 0% CER or a finished run: nothing was read
            unreadable = stats.problems if split == "training" else result.problems
            first = f"; first unreadable: {unreadable[0]}" if unreadable else ""
            raise TrainingError(f"epoch {epoch}: no {split} line could be used (unreadable, or more characters "
                                f"than CTC frames){first}")
    record = {"epoch": epoch, "step": state.step, "train_loss": values["loss"],
              "train_shortcut_loss": values["shortcut_loss"], "val_loss": result.loss,
              "val_cer": result.counts["greedy"].cer, "val_wer": result.counts["greedy"].wer,
              "lr": run.scheduler.get_last_lr()[0], "lines_per_s": values["lines_per_s"],
              "epoch_seconds": stats.seconds, "skipped_unreadable": values["unreadable"], "skipped_too_long": values["too_long"],
              "bad_steps": int(values["bad_steps"])}
    if result.by_source:  # several validation sources: each one's figures, and the rule's
        record["val_sources"] = {name: {"cer": counts["greedy"].cer, "wer": counts["greedy"].wer,
                                        "lines": counts["greedy"].lines} for name, counts in result.by_source.items()}
        record["val_cer"], record["val_wer"] = best_rule_values(record["val_sources"], cfg.train.best)
        record["best_by"] = cfg.train.best
    best = record["val_cer"] < state.best_cer
    state.epoch, state.epoch_stats, state.train_seconds = epoch, {}, state.train_seconds + stats.seconds
    state.best_cer = min(state.best_cer, record["val_cer"])
    state.epochs_without_improvement = 0 if best else state.epochs_without_improvement + 1
    save(run, record, best)
    run.logger.epoch(record, state.step)
    run.logger.samples(state.step, result.samples)
    if record["skipped_unreadable"] or record["skipped_too_long"] or record["bad_steps"]:
        first = f"; first unreadable: {' | '.join(stats.problems[:3])}" if stats.problems else ""
        run.logger.warning("epoch %d: skipped %d unreadable line(s), %d line(s) with more characters than CTC "
                           "frames, %d non-finite step(s)%s", epoch, record["skipped_unreadable"],
                           record["skipped_too_long"], record["bad_steps"], first)
    patience = cfg.train.patience
    if patience and state.epochs_without_improvement >= patience:
        run.logger.info("early stopping: no better validation CER for %d epoch(s)", patience)
        return True
    over = steps_out(cfg, state) or minutes_out(cfg.train.max_minutes, state.train_seconds)
    return bool(distributed.max_over_ranks([over])[0])


def best_rule_values(sources: dict[str, dict], rule: str) -> tuple[float, float]:
    """The validation CER and WER that `train.best` chooses best.pt by: the mean over the sources
    (each collection counts the same, whatever its size), or the named source's."""
    if rule != "mean":
        return sources[rule]["cer"], sources[rule]["wer"]
    return (sum(source["cer"] for source in sources.values()) / len(sources),
            sum(source["wer"] for source in sources.values()) / len(sources))


def validate(run: Run) -> EvalResult:
    """Greedy CER and WER and the CTC loss on the validation split, reduced over the ranks."""
    model = run.model if isinstance(run.model, DataParallelCRNN) else unwrap(run.model)
    distributed.broadcast_buffers(model)  # every rank validates with the statistics rank 0 saves
    return evaluate(model, run.val_loader, run.dist.device, {"greedy": GreedyDecoder(run.vocab)}, run.amp_dtype,
                    keep_samples=run.cfg.train.val_images, show_progress=run.dist.is_main)


def save(run: Run, metrics: dict, best: bool = False) -> None:
    """Write checkpoints/last.pt (keeping the one it replaces) and, if `best`, best.pt."""
    if not run.dist.is_main:
        return
    state = TrainingCheckpoint(
        model=unwrap(run.model).state_dict(), optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(), config=run.cfg.to_dict(),
        vocab=list(run.vocab.chars), rng=rng_state(), progress=run.state, metrics=metrics).to_dict()
    checkpoint_dir = Path(run.cfg.train.output_dir) / "checkpoints"
    save_checkpoint(state, checkpoint_dir / "last.pt", keep_previous=True)
    if best:
        save_checkpoint(state, checkpoint_dir / "best.pt")


def report_stop(run: Run) -> None:
    cause = (f"train.stop_after_minutes={run.cfg.train.stop_after_minutes:g}"
             if run.state.stopped_by == signal.SIGALRM else f"signal {run.state.stopped_by}")
    run.logger.warning("stopped by %s at step %d; checkpoint written, continue with train.resume=auto",
                       cause, run.state.step)


@contextmanager
def shut_down_at_exit(*loaders: DataLoader):
    """The loaders' workers stop with the run, not at interpreter exit (which can hang or abort)."""
    try:
        yield
    finally:
        for loader in loaders:
            shut_down(loader)


# ---------------------------------------------------------------------------------------------
# Building a run


def configure_torch(cfg: Config, rank: int = 0) -> None:
    """Seeds (one stream per rank), deterministic algorithms and cuDNN autotuning, as configured."""
    seed = cfg.train.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    # autotuning searches once per batch shape: it can pay with bounded shapes (data.width_multiple)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic


def find_resume_checkpoint(cfg: Config, checkpoint_dir: Path,
                           logger: RunLogger) -> tuple[TrainingCheckpoint, Path] | None:
    """`train.resume`: "" starts a new run (refusing to overwrite one), "auto" continues from the
    newest valid checkpoint of the run directory, a path from that file (`check_resumable` checks it)."""
    last = checkpoint_dir / "last.pt"
    if cfg.train.resume == "auto":
        found = load_newest_valid(last, logger.warning)
        if not found:
            logger.info("train.resume=auto: nothing to resume in %s (no checkpoints/last.pt), so a new run starts",
                        checkpoint_dir.parent)
    elif cfg.train.resume:
        found = load_checkpoint(cfg.train.resume), Path(cfg.train.resume)
    elif last.exists():
        raise ConfigError(
            f"{checkpoint_dir.parent} already holds a run (checkpoints/last.pt). Continue it with "
            f"train.resume=auto, or start a new one with another train.output_dir"
        )
    else:
        return None
    if not found:
        return None
    checkpoint = TrainingCheckpoint.from_dict(found[0], str(found[1]))
    check_resumable(checkpoint, cfg)
    return checkpoint, found[1]


def check_resumable(checkpoint: TrainingCheckpoint, cfg: Config) -> None:
    """CheckpointError unless `cfg` can continue `checkpoint` (the same architecture and optimizer)."""
    saved = config_from_dict(checkpoint.config, "checkpoint config")
    changed = architecture_changes(cfg.model, saved.model)
    if changed:
        raise CheckpointError(f"cannot resume: the checkpoint's model differs in {', '.join(changed)}")
    if saved.train.optimizer != cfg.train.optimizer:
        raise CheckpointError(f"cannot resume: the checkpoint was trained with train.optimizer={saved.train.optimizer}, "
                              f"this run asks for train.optimizer={cfg.train.optimizer}")


def load_data(cfg: Config, dist: DistInfo, logger: RunLogger, resume: TrainingCheckpoint | None = None,
              start: ModelFile | None = None) -> tuple[LineRecords, LineRecords, Vocab]:
    """Both splits and the vocabulary (the resumed run's, the starting model's as `train.init_vocab`
    says, or the training texts'), with their problems reported (`data.check`: all of them)."""
    train_records, validation = load_records(cfg.data, "train"), load_records(cfg.data, "validation")
    if resume:
        vocab = Vocab(resume.vocab)
    elif start:
        vocab, added, dropped = initial_vocab(start, train_records.texts, cfg.train.init_vocab)
        logger.info("alphabet (train.init_vocab=%s): %d classes; added %r, dropped %r", cfg.train.init_vocab,
                    len(vocab), added, dropped)
        if change := normalization_change(start, cfg.data):
            logger.warning(change)
    else:
        vocab = Vocab.from_texts(train_records.texts)
    for split, records in {"train": train_records, "validation": validation}.items():
        if cfg.data.check and dist.is_main:
            purpose = "train" if split == "train" else "evaluate"
            for problem in check_records(records, cfg.data, cfg.model, vocab, purpose):
                logger.warning("data check, %s: %s", split, problem)
        if records.problems:
            logger.warning("%s: %d problem(s) in %s, those lines are left out (%s); first: %s", split,
                           len(records.problems), records.name, problem_summary(records.problems),
                           " | ".join(records.problems[:3]))
        unknown = vocab.unknown_in(records.texts)
        if unknown:
            effect = "left out of the CTC targets" if split == "train" else "counted as errors"
            logger.warning("%s: characters not in the vocabulary (%s): %r", split, effect, "".join(sorted(unknown)))
        require_lines(records, f"data.{split}")
        squeezed = Preprocess.from_config(cfg.data).squeeze_warning(records.size_array(), f"data.{split}")
        if squeezed and dist.is_main:
            logger.warning(squeezed)
    return train_records, validation, vocab


def start_run_directory(cfg: Config, dist: DistInfo, logger: RunLogger, train_texts: list[str],
                        resume: TrainingCheckpoint | None) -> None:
    """config.yaml, the training transcriptions (for the beam-search language model) and, when
    resuming, metrics.jsonl cut back to the checkpoint's epoch; rank 0 alone, each file atomically."""
    if not dist.is_main:
        return
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", config_yaml(cfg))
    atomic_write(output_dir / "train_texts.txt",
                 lambda stream: stream.writelines(f"{text}\n".encode() for text in train_texts))
    if resume:
        logger.truncate_metrics(resume.progress.epoch)


def build_loaders(cfg: Config, dist: DistInfo, logger: RunLogger, train_records: LineRecords,
                  validation: LineRecords, vocab: Vocab) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders, sharded over the ranks, sharing `data.cache_mb` (docs/data.md)."""
    shard = {"rank": dist.rank, "world_size": dist.world_size, "pin_memory": dist.device.type == "cuda"}
    budget = int(cfg.data.cache_mb * 2**20)
    val_set = build_dataset(cfg.data, validation, vocab, False, budget)
    used = val_set.cache.nbytes if val_set.cache else 0
    train_set = build_dataset(cfg.data, train_records, vocab, True, budget - used)
    for split, dataset in (("validation", val_set), ("train", train_set)):
        if dataset.cache is not None:
            logger.info("%s: decoded lines cached for later epochs: %s", split, dataset.cache.describe())
    return (build_loader(cfg.data, train_set, True, cfg.train.seed, **shard),
            build_loader(cfg.data, val_set, False, cfg.train.seed, **shard))


def wrap_model(cfg: Config, model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """SyncBatchNorm, DDP or DataParallel, as the config asks."""
    device = dist_info.device
    if cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist_info.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    elif cfg.train.data_parallel:
        model = DataParallelCRNN(model)
    return model


def build_run(cfg: Config, dist: DistInfo, start: ModelFile | None = None) -> Run:
    """Everything a run needs, built in order; nothing is written before the data has loaded."""
    check_device_options(cfg.train, dist.device)
    check_best(cfg)
    if cfg.train.init_from and start is None:
        raise ConfigError("train.init_from is set, but the starting model was not read: load the config with "
                          "crnn.finetune.load_run_config (as tools/train.py does)")
    output_dir = Path(cfg.train.output_dir)
    logger = RunLogger(output_dir, dist.is_main)
    resumed = find_resume_checkpoint(cfg, output_dir / "checkpoints", logger)
    resume, resume_path = resumed if resumed else (None, None)
    if start:
        logger.info("starting from %s (weights sha256 %s)", start.path, start.sha256())
    train_records, validation, vocab = load_data(cfg, dist, logger, resume, start)  # may fail: nothing written yet
    start_run_directory(cfg, dist, logger, train_records.texts, resume)
    train_loader, val_loader = build_loaders(cfg, dist, logger, train_records, validation, vocab)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    bare = build_model(cfg.model, len(vocab))
    if start:
        bare.load_state_dict(starting_weights(start, vocab, bare))
    bare = bare.to(dist.device, memory_format=memory_format(dist.device))
    model = wrap_model(cfg, bare, dist)
    optimizer = build_optimizer(cfg.train, bare, dist.device, dist.world_size)
    amp_dtype, steps = resolve_amp(cfg.train.amp, dist.device), total_steps(cfg, train_loader)
    run = Run(cfg, dist, logger, vocab, train_loader, val_loader, model, optimizer,
              build_scheduler(cfg.train, optimizer, steps),
              torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16), amp_dtype,
              build_augmenter(cfg.data), RunState(),
              Batch.blank(cfg.data.height, cfg.data.height) if dist.distributed else None)
    if resume:
        restore(resume, run)
        logger.info("resuming from %s: %d epoch(s) done, %d batch(es) into epoch %d, step %d", resume_path,
                    run.state.epoch, run.state.epoch_stats.get("batches", 0), run.state.epoch + 1, run.state.step)
    logger.info("data: %d train lines, %d validation lines, %d classes (blank included)",
                len(train_records), len(validation), len(vocab))
    for split, records in (("train", train_records), ("validation", validation)):
        if len(records.parts) > 1:
            logger.info("%s sources: %s", split, ", ".join(
                f"{part.name} {part.stop - part.start} lines" + (f" (weight {part.weight:g})" if split == "train" else "")
                for part in records.parts))
    if train_loader.batch_sampler.count != len(train_records):
        logger.info("train: %d lines drawn per epoch, as the weights say", train_loader.batch_sampler.count)
    logger.info("model: %.2fM parameters, device %s, precision %s", sum(p.numel() for p in bare.parameters()) / 1e6,
                dist.device, AMP_NAMES[amp_dtype])
    logger.info("%d process(es)%s x batch %d = effective batch %d; peak lr %.2e (train.lr_scaling=%s); "
                "%d step(s) per epoch, %d in all", dist.world_size, f" ({dist.backend})" if dist.backend else "",
                cfg.data.batch_size, dist.world_size * cfg.data.batch_size, scaled_lr(cfg.train, dist.world_size),
                cfg.train.lr_scaling, len(train_loader.batch_sampler), steps)
    return run


def restore(checkpoint: TrainingCheckpoint, run: Run) -> None:
    """Load a checkpoint's weights, optimizer, scheduler, scaler and RNG states, and its progress."""
    unwrap(run.model).load_state_dict(checkpoint.model)
    run.optimizer.load_state_dict(checkpoint.optimizer)
    run.scheduler.load_state_dict(checkpoint.scheduler)
    run.scaler.load_state_dict(checkpoint.scaler)
    set_rng_state(checkpoint.rng)
    run.state = checkpoint.progress


def fit(cfg: Config, start: ModelFile | None = None) -> RunState:
    """Train as configured; under torchrun each process calls this. `start`: the model of
    `train.init_from` (`crnn.finetune.load_run_config`). Returns the final RunState."""
    started = time.monotonic()
    dist_info = distributed.setup(cfg.train.device)
    finished = False
    try:
        configure_torch(cfg, dist_info.rank)
        stop_after = cfg.train.stop_after_minutes
        with run_directory_lock(cfg, dist_info) as lock:
            run = build_run(cfg, dist_info, start)
            if lock and lock.taken_over:
                run.logger.warning("took over the lock of %s left by process %s, which is no longer running",
                                   cfg.train.output_dir, lock.taken_over.get("pid", "?"))
            state = train(run, started + 60 * stop_after if stop_after else None)
            finished, logger = True, run.logger
            del run  # the DDP model's reducer is freed before the process group it talks to
            distributed.cleanup(wait_for_all=True)
            if dist_info.is_main and state.stopped_by is None:
                calibrate_run(cfg, logger)
        return state
    finally:
        distributed.cleanup(wait_for_all=finished)


def calibrate_run(cfg: Config, logger: RunLogger) -> None:
    """At the end of a run, in the main process alone: fit the calibration of checkpoints/best.pt on
    the validation split and store it there (docs/calibration.md); a split too small is a warning."""
    best = Path(cfg.train.output_dir) / "checkpoints" / "best.pt"
    if not best.is_file():
        return
    started = time.perf_counter()
    trained = load_trained_model(best, device=cfg.train.device)
    try:
        lines = labelled_lines(trained, "validation")  # float32, as predict and tools/calibrate.py read
        calibration = fit_calibration(lines.log_probs, lines.references, trained.vocab, lines.where)
    except DataError as err:
        logger.warning("no calibration fitted: %s (tools/calibrate.py fits one on another labelled split)", err)
        return
    store_calibration(best, calibration.to_dict())
    logger.info("calibration fitted on %d validation lines in %.1f s and stored in %s: temperature %.3f",
                calibration.lines, time.perf_counter() - started, best, calibration.temperature)


@contextmanager
def run_directory_lock(cfg: Config, dist: DistInfo):
    """The run directory's lock (crnn.outputs.RunLock) for the life of the run, taken by the main
    process before any data is read; yields it, or None on the other ranks."""
    if not dist.is_main:
        yield None
        return
    lock = RunLock(cfg.train.output_dir, "train.output_dir").acquire()
    try:
        yield lock
    finally:
        lock.release()
