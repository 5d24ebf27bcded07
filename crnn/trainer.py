"""`fit(cfg)`: a whole training run, from data to the run directory.

Run directory (`train.output_dir`): config.yaml, checkpoints/last.pt and best.pt, TensorBoard event
files and metrics.jsonl. Only rank 0 writes there; all ranks train.

A run reads top to bottom: `fit` -> `build_run` (functions that each return what they build:
`load_data`, `start_run_directory`, `build_loaders`, `build_training`, `restore`) -> `Run.train`,
the loop over epochs. Each epoch is `crnn.engine.train_epoch`, a generator of optimizer steps that
`Run.train` iterates; between two steps the run logs, checkpoints and decides whether to stop
(`Run.after_step`), then validates and checkpoints at the epoch's end (`Run.end_epoch`). Nothing
below calls back up. `crnn.benchmark` builds its loop from the same builders.

Checkpoints are written at each epoch end and every `train.checkpoint_every_steps` steps; each
carries the position inside the epoch, so `train.resume=auto` continues at the right batch with the
same data order, augmentation and random numbers as an unbroken run. SIGTERM or SIGINT finish the
current step, write a checkpoint and end the run (exit code 128 + signal number from the tool);
so does `train.stop_after_minutes` of wall-clock time (as SIGALRM, 142).
"""

from __future__ import annotations

import random
import signal
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from crnn import distributed
from crnn.calibration import (
    Calibration,
    CalibrationProbe,
    cross_fitted_report,
    describe_report,
    expected_calibration_error,
    fit_calibration,
    reliability,
    reliability_diagram,
)
from crnn.checkpoint import (
    ModelFile,
    RunState,
    TrainingCheckpoint,
    load_checkpoint,
    load_newest_valid,
    read_model_file,
    rng_state,
    save_checkpoint,
    set_rng_state,
    store_calibration,
)
from crnn.config import Config, check_starting_point, config_from_dict, config_yaml
from crnn.data import LineRecords, Vocab, build_dataset, build_loader, load_records, shut_down
from crnn.data.check import check_records
from crnn.data.records import problem_summary
from crnn.device import AMP_NAMES, check_device_options, resolve_memory_format
from crnn.distributed import DataParallelCRNN, DistInfo, StopRequest, unwrap
from crnn.engine import EpochStats, EvalResult, TrainSetup, evaluate, train_epoch
from crnn.errors import CheckpointError, ConfigError, DataError
from crnn.finetune import initial_vocab, starting_weights
from crnn.inference import labelled_lines, load_trained_model
from crnn.metrics import aligned_hits
from crnn.models import build_model, check_model_name
from crnn.optim import WeightEma, scaled_lr
from crnn.outputs import RunLock, atomic_write, atomic_write_text
from crnn.runlog import RunLogger, describe_memory, process_age, process_memory


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


def report_problems(logger: RunLogger, records: LineRecords, split: str) -> None:
    if records.problems:
        logger.warning("%s: %d problem(s) in %s, those lines are left out (%s); first: %s", split,
                       len(records.problems), records.name, problem_summary(records.problems),
                       " | ".join(records.problems[:3]))


def check_vocab_coverage(logger: RunLogger, vocab: Vocab, records: LineRecords, split: str) -> None:
    unknown = vocab.unknown_in(records.texts)
    if unknown:
        effect = "left out of the CTC targets" if split == "train" else "counted as errors"
        logger.warning("%s: characters not in the vocabulary (%s): %r", split, effect, "".join(sorted(unknown)))


def find_resume_checkpoint(cfg: Config, checkpoint_dir: Path,
                           logger: RunLogger) -> tuple[TrainingCheckpoint, Path] | None:
    """`train.resume`: "" starts a new run (refusing to overwrite one), "auto" continues from the
    newest valid checkpoint of the run directory, a path continues from that file."""
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
    return (TrainingCheckpoint.from_dict(found[0], str(found[1])), found[1]) if found else None


@dataclass
class RunData:
    train: LineRecords
    validation: LineRecords
    vocab: Vocab  # from the training texts, or the resumed checkpoint's


def load_data(cfg: Config, dist: DistInfo, logger: RunLogger, resume: TrainingCheckpoint | None = None,
              start: ModelFile | None = None) -> RunData:
    """Both splits and the vocabulary (the resumed run's, the starting model's as `train.init_vocab`
    says, or the training texts'), with their problems reported (`data.check`: all of them)."""
    train, validation = load_records(cfg.data, "train"), load_records(cfg.data, "validation")
    if resume:
        vocab = Vocab(resume.vocab)
    elif start:
        vocab, added, dropped = initial_vocab(start, train.texts, cfg.train.init_vocab)
        logger.info("alphabet (train.init_vocab=%s): %d classes; added %r, dropped %r", cfg.train.init_vocab,
                    len(vocab), added, dropped)
    else:
        vocab = Vocab.from_texts(train.texts)
    data = RunData(train, validation, vocab)
    splits = {"train": data.train, "validation": data.validation}
    if cfg.data.check and dist.is_main:
        for split, records in splits.items():
            purpose = "train" if split == "train" else "evaluate"
            for problem in check_records(records, cfg.data, cfg.model, data.vocab, purpose):
                logger.warning("data check, %s: %s", split, problem)
    for split, records in splits.items():
        report_problems(logger, records, split)
        check_vocab_coverage(logger, data.vocab, records, split)
    return data


def start_run_directory(cfg: Config, dist: DistInfo, logger: RunLogger, data: RunData,
                        resume: TrainingCheckpoint | None) -> None:
    """config.yaml, the training transcriptions (for the beam-search language model) and, when
    resuming, metrics.jsonl cut back to the checkpoint's epoch. Rank 0 alone touches the run
    directory, and every file it rewrites is replaced atomically."""
    if not dist.is_main:
        return
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", config_yaml(cfg))
    atomic_write(output_dir / "train_texts.txt",
                 lambda stream: stream.writelines(f"{text}\n".encode() for text in data.train.texts))
    if resume:
        logger.truncate_metrics(resume.progress.epoch)


def build_loaders(cfg: Config, dist: DistInfo, logger: RunLogger, data: RunData) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders, sharded over the ranks; `data.cache_mb` of decoded lines
    for both, the validation split first (it is read whole every epoch, the training split the rest)."""
    shard = {"rank": dist.rank, "world_size": dist.world_size, "pin_memory": dist.device.type == "cuda"}
    budget = int(cfg.data.cache_mb * 2**20)
    val_set = build_dataset(cfg.data, data.validation, data.vocab, False, budget)
    used = val_set.cache.nbytes if val_set.cache else 0
    train_set = build_dataset(cfg.data, data.train, data.vocab, True, budget - used)
    for split, dataset in (("validation", val_set), ("train", train_set)):
        if dataset.cache is not None:
            logger.info("%s: decoded lines cached for later epochs: %s", split, dataset.cache.describe())
        elif cfg.data.cache_mb:
            logger.info("%s: no decoded lines cached (data.cache_mb=%g is taken by the validation split)",
                        split, cfg.data.cache_mb)
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


def build_training(cfg: Config, dist: DistInfo, vocab: Vocab, steps_per_epoch: int,
                   start: ModelFile | None = None) -> tuple[nn.Module, TrainSetup]:
    """The model (the same initial weights on every rank: random, or the starting model's laid out
    for `vocab`, wrapped as the config asks) and what its steps need: optimizer, schedule, AMP."""
    torch.manual_seed(cfg.train.seed)
    bare = build_model(cfg.model, len(vocab))
    if start:
        bare.load_state_dict(starting_weights(start, vocab, bare))
    bare = bare.to(dist.device, memory_format=resolve_memory_format(cfg.train.memory_format, dist.device))
    model = wrap_model(cfg, bare, dist)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    setup = TrainSetup.from_config(cfg, model=bare, device=dist.device, total_steps=total_steps,
                                   world_size=dist.world_size)
    return model, setup


def restore(checkpoint: TrainingCheckpoint, cfg: Config, model: nn.Module, setup: TrainSetup) -> RunState:
    """Load a checkpoint's weights, optimizer, scheduler, scaler and RNG states; its progress."""
    saved = config_from_dict(checkpoint.config, "checkpoint config")
    if saved.model != cfg.model:
        changed = [k for k, v in vars(cfg.model).items() if getattr(saved.model, k) != v]
        raise CheckpointError(f"cannot resume: the checkpoint's model differs in model.{', model.'.join(changed)}")
    if saved.train.optimizer != cfg.train.optimizer:
        raise CheckpointError(f"cannot resume: the checkpoint was trained with train.optimizer={saved.train.optimizer}, "
                              f"this run asks for train.optimizer={cfg.train.optimizer}")
    unwrap(model).load_state_dict(checkpoint.training_weights or checkpoint.model)
    if setup.ema is not None:  # from a checkpoint without an average, it starts from the loaded weights
        setup.ema.load_state_dict(checkpoint.model, checkpoint.ema_updates if checkpoint.training_weights else 0)
    setup.optimizer.load_state_dict(checkpoint.optimizer)
    setup.scheduler.load_state_dict(checkpoint.scheduler)
    setup.scaler.load_state_dict(checkpoint.scaler)
    set_rng_state(checkpoint.rng)
    if checkpoint.progress.planned_steps:  # the schedule's end as fitted to train.max_minutes
        setup.horizon.steps = checkpoint.progress.planned_steps
    return checkpoint.progress


@contextmanager
def averaged_weights(model: nn.Module, ema: WeightEma | None):
    """`model` holds the weights' moving average inside the block (nothing changes without one);
    its own weights come back bit for bit afterwards."""
    if ema is None:
        yield
        return
    own = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(ema.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(own)


def log_run(logger: RunLogger, cfg: Config, dist: DistInfo, data: RunData, model: nn.Module,
            setup: TrainSetup, steps_per_epoch: int) -> None:
    parameters = sum(p.numel() for p in unwrap(model).parameters())
    logger.info("data: %d train lines, %d validation lines, %d classes (blank included)",
                len(data.train), len(data.validation), len(data.vocab))
    logger.info("model: %.2fM parameters, device %s, precision %s", parameters / 1e6, dist.device,
                AMP_NAMES[setup.amp_dtype])
    logger.info("%d process(es)%s x batch %d = effective batch %d; peak lr %.2e (train.lr_scaling=%s); "
                "%d step(s) per epoch", dist.world_size, f" ({dist.backend})" if dist.backend else "",
                cfg.data.batch_size, dist.world_size * cfg.data.batch_size, scaled_lr(cfg.train, dist.world_size),
                cfg.train.lr_scaling, steps_per_epoch)


def starting_model(cfg: Config, start: ModelFile | None) -> ModelFile | None:
    """The model `train.init_from` names: `start` when the caller has read it already (tools/train.py,
    through `crnn.config.load_run_config`), else read here; checked against `cfg` either way."""
    if not cfg.train.init_from:
        return None
    if start is None:
        start = read_model_file(Path(cfg.train.init_from), "train.init_from")
        digest = start.sha256() if cfg.train.init_sha256 else ""  # nothing to check against without one
        check_starting_point(cfg, start, digest)
    return start


def build_run(cfg: Config, dist: DistInfo, start: ModelFile | None = None) -> Run:
    """Everything a run needs, built in order; nothing is written before the data has loaded.
    `start`: the model of `train.init_from`, if the caller has read it (else it is read here)."""
    check_device_options(cfg.train, dist.device)
    check_model_name(cfg.model.name)
    output_dir = Path(cfg.train.output_dir)
    logger = RunLogger(output_dir, dist.is_main)
    resumed = find_resume_checkpoint(cfg, output_dir / "checkpoints", logger)
    resume, resume_path = resumed if resumed else (None, None)
    start = starting_model(cfg, start)
    if start:
        logger.info("starting from %s (weights sha256 %s...)", start.path, cfg.train.init_sha256[:16] or "not recorded")
    data = load_data(cfg, dist, logger, resume, start)  # may fail: nothing is written before
    start_run_directory(cfg, dist, logger, data, resume)
    train_loader, val_loader = build_loaders(cfg, dist, logger, data)
    steps_per_epoch = len(train_loader.batch_sampler)
    model, setup = build_training(cfg, dist, data.vocab, steps_per_epoch, start)
    log_run(logger, cfg, dist, data, model, setup, steps_per_epoch)
    state = restore(resume, cfg, model, setup) if resume else RunState()
    if resume:
        logger.info("resuming from %s: %d epoch(s) done, %d batch(es) into epoch %d, step %d", resume_path,
                    state.epoch, state.epoch_stats.get("batches", 0), state.epoch + 1, state.step)
    return Run(cfg, dist, logger, data.vocab, train_loader, val_loader, model, setup, state)


def report_skipped(logger: RunLogger, epoch: int, stats: EpochStats) -> None:
    if stats.unreadable or stats.too_long or stats.bad_steps:
        unreadable = f"; first unreadable: {' | '.join(stats.problems[:3])}" if stats.problems else ""
        logger.warning("epoch %d: skipped %d unreadable line(s), %d line(s) with more characters than CTC frames, "
                       "%d non-finite step(s)%s", epoch, stats.unreadable, stats.too_long, stats.bad_steps, unreadable)


def epoch_record(epoch: int, step: int, stats: EpochStats, result: EvalResult, lr: float) -> dict:
    """One line of metrics.jsonl."""
    counts = result.counts["greedy"]
    return {"epoch": epoch, "step": step, "train_loss": stats.loss, "train_shortcut_loss": stats.shortcut_loss,
            "train_attention_loss": stats.attention_loss,
            "val_loss": result.loss, "val_cer": counts.cer, "val_wer": counts.wer, "lr": lr,
            "lines_per_s": stats.lines_per_s, "epoch_seconds": stats.seconds,
            "skipped_unreadable": stats.unreadable, "skipped_too_long": stats.too_long,
            "bad_steps": stats.bad_steps}


# train.max_minutes: the steps timed to fit the schedule to the budget (after the first, slower ones),
# and the first epoch whose own speed fits it again at its end (the decode cache is full by then;
# every later epoch fits it again too)
BUDGET_STEPS = (10, 50)
BUDGET_REFIT_EPOCH = 2
HELD_OUT_FOLDS = 5  # the end-of-run calibration is measured cross-fitted over this many folds


@dataclass
class Run:
    """One training run's loop: steps, validation, logs, checkpoints and stop decisions."""

    cfg: Config
    dist: DistInfo
    logger: RunLogger
    vocab: Vocab
    train_loader: DataLoader
    val_loader: DataLoader
    model: nn.Module  # wrapped (DDP, DataParallel) as the config asks
    setup: TrainSetup
    state: RunState
    _budget_timer: tuple[int, float] | None = None  # (step, training seconds) where the budget's timing began
    stepped: bool = False  # this process has taken its first step (logged with its start-up time and memory)

    def save(self, metrics: dict, best: bool = False) -> None:
        """Write checkpoints/last.pt (keeping the one it replaces) and, if `best`, best.pt."""
        if not self.dist.is_main:
            return
        setup, weights = self.setup, unwrap(self.model).state_dict()
        state = TrainingCheckpoint(
            model=setup.ema.state_dict() if setup.ema else weights, optimizer=setup.optimizer.state_dict(),
            scheduler=setup.scheduler.state_dict(), scaler=setup.scaler.state_dict(),
            config=self.cfg.to_dict(), vocab=list(self.vocab.chars), rng=rng_state(), progress=self.state,
            metrics=metrics, training_weights=weights if setup.ema else {},
            ema_updates=setup.ema.updates if setup.ema else 0).to_dict()
        checkpoint_dir = Path(self.cfg.train.output_dir) / "checkpoints"
        save_checkpoint(state, checkpoint_dir / "last.pt", keep_previous=True)
        if best:
            save_checkpoint(state, checkpoint_dir / "best.pt")

    def validate(self) -> EvalResult:
        """The model the run saves (the weights' average with train.ema) on the validation split."""
        model = self.model if isinstance(self.model, DataParallelCRNN) else unwrap(self.model)
        distributed.broadcast_buffers(model)  # every rank ends the epoch with the statistics rank 0 saves
        probe = CalibrationProbe(Calibration(), self.vocab)  # greedy, keeping each character's confidence
        with averaged_weights(unwrap(self.model), self.setup.ema):
            distributed.broadcast_buffers(model)  # the average's too (each rank averaged its own)
            result = evaluate(model, self.val_loader, self.dist.device, {"greedy": probe}, self.setup.amp_dtype,
                              keep_samples=self.cfg.train.val_images, keep_predictions=self.dist.is_main,
                              show_progress=self.dist.is_main)
        if self.dist.is_main:
            self.log_reliability(probe, result)
        return result

    def log_reliability(self, probe: CalibrationProbe, result: EvalResult) -> None:
        """TensorBoard: how well the raw character confidences match their accuracy on (this rank's
        share of) the validation split: `val/ece_characters` and the reliability diagram."""
        pairs = result.predictions.get("greedy", [])
        hits = [hit for _, reference, hypothesis in pairs for hit in aligned_hits(reference, hypothesis)]
        confidences = [c for line in probe.confidences for c in line]
        if not hits or len(hits) != len(confidences):
            return
        self.logger.scalars(self.state.step, {"val/ece_characters": expected_calibration_error(confidences, hits)})
        self.logger.image("val/reliability", reliability_diagram({"characters": reliability(confidences, hits)}),
                          self.state.step)

    def out_of_budget(self, step: int, epoch_seconds: float) -> bool:
        """train.max_steps, the steps planned for train.max_minutes or the minutes themselves reached
        (the caller agrees it across ranks)."""
        train, planned = self.cfg.train, self.state.planned_steps
        if (train.max_steps and step >= train.max_steps) or (planned and step >= planned):
            return True
        return bool(train.max_minutes and self.state.train_seconds + epoch_seconds >= 60 * train.max_minutes)

    def fit_schedule_to_budget(self, step: int, epoch_seconds: float) -> None:
        """With train.max_minutes (and no train.max_steps), time steps BUDGET_STEPS[0] to
        BUDGET_STEPS[1] of the run, then end the LR schedule at the step the minutes allow: the
        cosine reaches its floor as the budget runs out, instead of stopping the run near its peak."""
        train, state = self.cfg.train, self.state
        if not train.max_minutes or train.max_steps or state.planned_steps or step < BUDGET_STEPS[0]:
            return
        elapsed = state.train_seconds + epoch_seconds
        if self._budget_timer is None:
            self._budget_timer = (step, elapsed)
        if step < self._budget_timer[0] + BUDGET_STEPS[1] - BUDGET_STEPS[0]:
            return
        first_step, first_seconds = self._budget_timer
        self.plan_budget(step, (step - first_step) / max(elapsed - first_seconds, 1e-9), elapsed,
                         f"steps {first_step}-{step}")

    def plan_budget(self, step: int, per_second: float, elapsed: float, timed: str) -> None:
        """End the LR schedule at the step that `per_second` steps/s reach when the minutes run out."""
        train = self.cfg.train
        planned = step + int(per_second * max(60 * train.max_minutes - elapsed, 0.0))
        planned = min(planned, train.epochs * len(self.train_loader.batch_sampler))
        planned = -int(distributed.max_over_ranks([-planned])[0])  # the slowest rank's plan
        self.state.planned_steps = self.setup.horizon.steps = planned
        self.logger.info("train.max_minutes=%g: %.2f steps/s over %s, so the LR schedule ends at step %d",
                         train.max_minutes, per_second, timed, planned)

    def refit_budget(self, epoch: int, stats: EpochStats) -> None:
        """From the end of epoch BUDGET_REFIT_EPOCH on, plan the schedule's end again after every
        epoch from that epoch's own speed: the steps 10-50 of the first plan run while the decode
        cache fills, and are slower than the rest (by 3-9% on copiste-h64), and a machine's speed
        drifts over hours (17-23 lines/s within one two-hour run), so one plan left the cosine at
        93-96% of its length when the minutes ran out. A plan a few percent longer or shorter moves
        the LR by a few percent of the peak at most (the cosine is flat at both ends). Augmentation
        that starts later (`data.augment.start_epoch`) is waited for: its epochs are the slower."""
        train, augment = self.cfg.train, self.cfg.data.augment
        refit_epoch = max(BUDGET_REFIT_EPOCH, augment.start_epoch if augment.enabled else 1)
        if not (train.max_minutes and self.state.planned_steps and epoch >= refit_epoch and stats.batches
                and self.state.step < self.state.planned_steps):
            return
        self.plan_budget(self.state.step, stats.batches / max(stats.seconds, 1e-9), self.state.train_seconds,
                         f"epoch {epoch}")

    def after_step(self, stats: EpochStats, stop: StopRequest) -> bool:
        """Between two steps: log, checkpoint on schedule or on a stop request. True: end the epoch."""
        step, train = self.state.step, self.cfg.train
        if not self.stepped:
            self.stepped = True
            self.logger.info("first training step %.1f s after the process started; memory of this process: %s",
                             process_age() or 0.0, describe_memory(process_memory()))
        self.fit_schedule_to_budget(step, stats.seconds)
        if step % train.log_every == 0:
            self.logger.scalars(step, {"train/loss": stats.loss, "train/shortcut_loss": stats.shortcut_loss,
                                       "train/attention_loss": stats.attention_loss,
                                       "train/lr": self.setup.scheduler.get_last_lr()[0],
                                       "train/lines_per_s": stats.lines_per_s})
        signal_number, over_budget = distributed.max_over_ranks(
            [stop.requested() or 0, self.out_of_budget(step, stats.seconds)])
        self.state.stopped_by = int(signal_number) or None
        if self.state.stopped_by or (train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0):
            partial = EpochStats(**stats.to_dict())
            partial.reduce(self.dist.device)  # the whole epoch so far, over all ranks
            self.state.epoch_stats = partial.to_dict()
            self.save({})
        return bool(self.state.stopped_by or over_budget)

    def end_epoch(self, epoch: int, stats: EpochStats, result: EvalResult) -> bool:
        """Log, checkpoint, decide on early stopping. Returns True to stop."""
        record = epoch_record(epoch, self.state.step, stats, result, self.setup.scheduler.get_last_lr()[0])
        state, best = self.state, record["val_cer"] < self.state.best_cer
        state.epoch, state.epoch_stats, state.train_seconds = epoch, {}, state.train_seconds + stats.seconds
        self.refit_budget(epoch, stats)
        state.best_cer = min(state.best_cer, record["val_cer"])
        state.epochs_without_improvement = 0 if best else state.epochs_without_improvement + 1
        self.save(record, best)
        self.logger.epoch(record, state.step)
        self.logger.samples(state.step, result.samples)
        report_skipped(self.logger, epoch, stats)
        patience = self.cfg.train.patience
        if patience and state.epochs_without_improvement >= patience:
            self.logger.info("early stopping: no better validation CER for %d epoch(s)", patience)
            return True
        return bool(distributed.max_over_ranks([self.out_of_budget(state.step, 0.0)])[0])

    def resumed_stats(self) -> EpochStats:
        """The unfinished epoch's stats: the totals on rank 0, only the position elsewhere."""
        saved = EpochStats(**self.state.epoch_stats)
        return saved if self.dist.is_main else EpochStats(batches=saved.batches)

    def train(self, deadline: float | None = None) -> RunState:
        """Train to the end, or until a stop signal or the `deadline` (time.monotonic()): epoch after
        epoch, step after step, each epoch validated and checkpointed."""
        try:
            with StopRequest(deadline) as stop:
                for epoch in range(self.state.epoch + 1, self.cfg.train.epochs + 1):
                    stats = self.resumed_stats()
                    self.train_loader.batch_sampler.set_epoch(epoch, start_batch=stats.batches)
                    with closing(train_epoch(self.model, self.train_loader, self.setup, epoch, self.state.step,
                                             stats, show_progress=self.dist.is_main)) as steps:
                        for step, stats in steps:
                            self.state.step = step
                            if self.after_step(stats, stop):
                                break
                    if self.state.stopped_by:
                        self.report_stop()
                        break
                    stats.reduce(self.dist.device)
                    if self.end_epoch(epoch, stats, self.validate()):
                        break
        finally:  # the workers stop with the run, not at interpreter exit (which can hang or abort)
            shut_down(self.train_loader)
            shut_down(self.val_loader)
        self.logger.info("done: best validation CER %.4f; run directory %s", self.state.best_cer,
                         self.cfg.train.output_dir)
        self.logger.close()
        return self.state

    def report_stop(self) -> None:
        cause = (f"train.stop_after_minutes={self.cfg.train.stop_after_minutes:g}"
                 if self.state.stopped_by == signal.SIGALRM else f"signal {self.state.stopped_by}")
        self.logger.warning("stopped by %s at step %d; checkpoint written, continue with train.resume=auto",
                            cause, self.state.step)


def fit(cfg: Config, start: ModelFile | None = None) -> RunState:
    """Train as configured; under torchrun each process calls this. `start`: the model of
    `train.init_from` as `crnn.config.load_run_config` read it (else it is read here). Returns the
    final RunState."""
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
            state = run.train(started + 60 * stop_after if stop_after else None)
            finished = True
            distributed.cleanup(wait_for_all=True)
            if dist_info.is_main and state.stopped_by is None:
                calibrate_run(cfg, run.logger)
        return state
    finally:
        distributed.cleanup(wait_for_all=finished)


def calibrate_run(cfg: Config, logger: RunLogger) -> None:
    """At the end of a run, in the main process alone: fit the calibration of checkpoints/best.pt on
    the validation split (crnn.calibration) and store it in best.pt; a split too small for it is a
    warning (tools/calibrate.py fits one on any labelled split later). How well it holds on lines
    it was not fitted on is logged too, cross-fitted over HELD_OUT_FOLDS blocks of the split, when
    each fit keeps enough lines (crnn.calibration.MIN_LINES)."""
    best = Path(cfg.train.output_dir) / "checkpoints" / "best.pt"
    if not best.is_file():
        return
    trained = load_trained_model(best, device=cfg.train.device)
    try:
        lines = labelled_lines(trained, "validation")
        calibration = fit_calibration(lines.log_probs, lines.references, trained.vocab, lines.where)
    except DataError as err:
        logger.warning("no calibration fitted: %s (tools/calibrate.py fits one on another labelled split)", err)
        return
    store_calibration(best, calibration.to_dict())
    logger.info("calibration fitted on %d validation lines and stored in %s: temperature %.3f", calibration.lines,
                best, calibration.temperature)
    try:
        report = cross_fitted_report(lines.log_probs, lines.references, trained.vocab, HELD_OUT_FOLDS, lines.where)
    except DataError:
        return  # too few lines to fit on all but one fold of them
    logger.info("the calibration on lines it was not fitted on (%d folds of the validation split):\n%s",
                HELD_OUT_FOLDS, "\n".join(describe_report(report)))


@contextmanager
def run_directory_lock(cfg: Config, dist: DistInfo):
    """The run directory's lock for the life of the run (crnn.outputs.RunLock), taken by the main
    process only (under torchrun the other ranks write nothing there); checks train.output_dir
    before any data is read. Yields the lock, or None on the other ranks."""
    if not dist.is_main:
        yield None
        return
    lock = RunLock(cfg.train.output_dir, "train.output_dir").acquire()
    try:
        yield lock
    finally:
        lock.release()
