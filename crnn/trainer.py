"""`fit(cfg)`: a whole training run, from data to the run directory.

Run directory (`train.output_dir`): config.yaml, checkpoints/last.pt and best.pt, TensorBoard event
files and metrics.jsonl. Only rank 0 writes there; all ranks train.

Checkpoints are written at each epoch end and every `train.checkpoint_every_steps` steps; each
carries the position inside the epoch, so `train.resume=auto` continues at the right batch with the
same data order, augmentation and random numbers as an unbroken run. SIGTERM or SIGINT finish the
current step, write a checkpoint and end the run (exit code 128 + signal number from the tool).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from crnn import distributed
from crnn.checkpoint import load_checkpoint, load_newest_valid, rng_state, save_checkpoint, set_rng_state
from crnn.config import Config, config_from_dict, save_config
from crnn.data import Batch, LineRecords, Vocab, build_dataset, build_loader, load_records
from crnn.data.check import check_records
from crnn.decoding import GreedyDecoder
from crnn.distributed import DataParallelCRNN, DistInfo, StopRequest
from crnn.engine import EpochStats, EvalResult, TrainSetup, evaluate, train_one_epoch, unwrap
from crnn.errors import CheckpointError, ConfigError
from crnn.models import build_model
from crnn.optim import build_optimizer, build_scheduler, scaled_lr
from crnn.runlog import RunLogger


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """`train.amp` -> autocast dtype (None: full float32)."""
    if amp == "auto":
        if device.type != "cuda":
            return None  # CPU autocast is slower than float32 on most CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("'train.amp=fp16' needs a CUDA device (GradScaler); on CPU use train.amp=off or bf16")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def check_device_options(cfg: Config, device: torch.device) -> None:
    """Reject options the device cannot honour before any work is done."""
    resolve_amp(cfg.train.amp, device)
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError("'train.sync_bn=true' needs CUDA (SyncBatchNorm does not run on CPU); "
                          "set train.sync_bn=false")
    if cfg.train.data_parallel and device.type != "cuda":
        raise ConfigError("'train.data_parallel=true' needs CUDA devices; set train.data_parallel=false")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunState:
    """Progress that a checkpoint carries over to a resumed run."""

    epoch: int = 0  # completed epochs
    step: int = 0
    best_cer: float = float("inf")
    epochs_without_improvement: int = 0
    epoch_stats: dict = field(default_factory=dict)  # the unfinished epoch so far (summed over ranks)
    train_seconds: float = 0.0  # time spent in finished epochs' training loops (train.max_minutes)
    stopped_by: int | None = None  # the signal that ended the run early, if any


def report_problems(logger: RunLogger, records: LineRecords, split: str) -> None:
    if records.problems:
        logger.warning("%s: %d problem(s) in %s, those lines are left out; first: %s", split,
                       len(records.problems), records.name, " | ".join(records.problems[:3]))


def check_vocab_coverage(logger: RunLogger, vocab: Vocab, records: LineRecords, split: str) -> None:
    unknown = set().union(*(vocab.unknown(text) for text in records.texts))
    if unknown:
        logger.warning("%s: characters never seen in training (counted as errors): %r", split,
                       "".join(sorted(unknown)))


def find_resume_checkpoint(cfg: Config, checkpoint_dir: Path, logger: RunLogger) -> tuple[dict, Path] | None:
    """`train.resume`: "" starts a new run (refusing to overwrite one), "auto" continues from the
    newest valid checkpoint of the run directory, a path continues from that file."""
    last = checkpoint_dir / "last.pt"
    if cfg.train.resume == "auto":
        return load_newest_valid(last, logger.warning)
    if cfg.train.resume:
        return load_checkpoint(cfg.train.resume), Path(cfg.train.resume)
    if last.exists():
        raise ConfigError(
            f"{checkpoint_dir.parent} already holds a run (checkpoints/last.pt). Continue it with "
            f"train.resume=auto, or start a new one with another train.output_dir"
        )
    return None


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metrics.jsonl lines of epochs after the resumed checkpoint (a crash in between)."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= last_epoch]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def wrap_model(cfg: Config, model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """SyncBatchNorm, DDP or DataParallel, torch.compile, as the config asks."""
    device = dist_info.device
    if cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist_info.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    elif cfg.train.data_parallel:
        model = DataParallelCRNN(model)
    if cfg.train.compile:
        model = torch.compile(model, dynamic=True)
    return model


class Run:
    """The pieces of one training run, built once by `fit`."""

    def __init__(self, cfg: Config, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        check_device_options(cfg, dist_info.device)
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.logger = RunLogger(self.output_dir, dist_info.is_main)
        resumed = find_resume_checkpoint(cfg, self.checkpoint_dir, self.logger)
        self.resume_state, resume_path = resumed if resumed else (None, None)
        train_records, val_records = self._load_records()  # may fail: nothing is written before
        self._start_run_directory(train_records)
        self._build_loaders(train_records, val_records)
        self._build_model()
        if resume_path:
            self.logger.info("resuming from %s: %d epoch(s) done, %d batch(es) into epoch %d, step %d",
                             resume_path, self.state.epoch, self.state.epoch_stats.get("batches", 0),
                             self.state.epoch + 1, self.state.step)

    def _load_records(self) -> tuple[LineRecords, LineRecords]:
        cfg, logger = self.cfg, self.logger
        train_records = load_records(cfg.data, "train")
        val_records = load_records(cfg.data, "validation")
        self.vocab = (Vocab(self.resume_state["vocab"]) if self.resume_state
                      else Vocab.from_texts(train_records.texts))
        if cfg.data.check and self.dist.is_main:
            for split, records in (("train", train_records), ("validation", val_records)):
                for problem in check_records(records, cfg.data, cfg.model, self.vocab):
                    logger.warning("data check, %s: %s", split, problem)
        report_problems(logger, train_records, "train")
        report_problems(logger, val_records, "validation")
        check_vocab_coverage(logger, self.vocab, val_records, "validation")
        return train_records, val_records

    def _start_run_directory(self, train_records: LineRecords) -> None:
        """config.yaml, and the training transcriptions for the beam-search language model."""
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.output_dir / "config.yaml")
            (self.output_dir / "train_texts.txt").write_text(
                "".join(text + "\n" for text in train_records.texts), encoding="utf-8")

    def _build_loaders(self, train_records: LineRecords, val_records: LineRecords) -> None:
        cfg = self.cfg
        pin = self.dist.device.type == "cuda"
        shard = {"rank": self.dist.rank, "world_size": self.dist.world_size, "pin_memory": pin}
        self.train_loader = build_loader(cfg.data, build_dataset(cfg.data, train_records, self.vocab, True),
                                         True, cfg.train.seed, **shard)
        self.val_loader = build_loader(cfg.data, build_dataset(cfg.data, val_records, self.vocab, False),
                                       False, cfg.train.seed, **shard)
        self.logger.info("data: %d train lines, %d validation lines, %d classes (blank included)",
                         len(train_records), len(val_records), len(self.vocab))

    def _build_model(self) -> None:
        cfg, device = self.cfg, self.dist.device
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        bare = build_model(cfg.model, len(self.vocab)).to(device)
        self.model = wrap_model(cfg, bare, self.dist)
        steps_per_epoch = len(self.train_loader.batch_sampler)
        total_steps = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps:
            total_steps = min(total_steps, cfg.train.max_steps)
        amp_dtype = resolve_amp(cfg.train.amp, device)
        optimizer = build_optimizer(cfg.train, bare, device, self.dist.world_size)
        self.setup = TrainSetup(
            optimizer, build_scheduler(cfg.train, optimizer, total_steps),
            torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), device, amp_dtype,
            cfg.train.grad_clip, cfg.model.shortcut_weight if cfg.model.shortcut else 0.0,
            cfg.train.max_bad_steps, cfg.train.oom_retry,
        )
        parameters = sum(p.numel() for p in bare.parameters())
        self.logger.info("model: %.2fM parameters, device %s, amp %s", parameters / 1e6, device, amp_dtype)
        self.logger.info("%d process(es) x batch %d = effective batch %d; peak lr %.2e (train.lr_scaling="
                         "%s); %d step(s) per epoch", self.dist.world_size, cfg.data.batch_size,
                         self.dist.world_size * cfg.data.batch_size, scaled_lr(cfg.train, self.dist.world_size),
                         cfg.train.lr_scaling, steps_per_epoch)
        # under DDP a rank whose batch is left empty steps this blank line, so no rank hangs
        self.placeholder = Batch.blank(cfg.data.height, cfg.data.height) if self.dist.distributed else None
        self.state = RunState()
        if self.resume_state:
            self.state = self._restore(self.resume_state)
            truncate_metrics(self.output_dir / "metrics.jsonl", self.state.epoch)

    def _restore(self, state: dict) -> RunState:
        """Load a checkpoint's weights, optimizer, scheduler, scaler and RNG states."""
        saved = config_from_dict(state["config"], "checkpoint config")
        if saved.model != self.cfg.model:
            changed = [k for k, v in vars(self.cfg.model).items() if getattr(saved.model, k) != v]
            raise CheckpointError(f"cannot resume: the checkpoint's model differs in model.{', model.'.join(changed)}")
        unwrap(self.model).load_state_dict(state["model"])
        self.setup.optimizer.load_state_dict(state["optimizer"])
        self.setup.scheduler.load_state_dict(state["scheduler"])
        self.setup.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return RunState(state["epoch"], state["step"], state["best_cer"],
                        state["epochs_without_improvement"], state.get("epoch_stats", {}),
                        state.get("train_seconds", 0.0))

    def save(self, metrics: dict, best: bool = False) -> None:
        """Write checkpoints/last.pt (keeping the one it replaces) and, if `best`, best.pt."""
        if not self.dist.is_main:
            return
        state = {
            "model": unwrap(self.model).state_dict(), "optimizer": self.setup.optimizer.state_dict(),
            "scheduler": self.setup.scheduler.state_dict(), "scaler": self.setup.scaler.state_dict(),
            "epoch": self.state.epoch, "step": self.state.step, "best_cer": self.state.best_cer,
            "epochs_without_improvement": self.state.epochs_without_improvement,
            "epoch_stats": self.state.epoch_stats, "train_seconds": self.state.train_seconds,
            "config": self.cfg.to_dict(),
            "vocab": list(self.vocab.chars), "rng": rng_state(), "metrics": metrics,
        }
        save_checkpoint(state, self.checkpoint_dir / "last.pt", keep_previous=True)
        if best:
            save_checkpoint(state, self.checkpoint_dir / "best.pt")

    def validate(self) -> EvalResult:
        model = self.model if isinstance(self.model, DataParallelCRNN) else unwrap(self.model)
        distributed.broadcast_buffers(model)  # validate with the statistics that rank 0 saves
        return evaluate(model, self.val_loader, self.dist.device, {"greedy": GreedyDecoder(self.vocab)},
                        self.setup.amp_dtype, keep_samples=self.cfg.train.val_images,
                        show_progress=self.dist.is_main)

    def out_of_budget(self, step: int, epoch_seconds: float) -> bool:
        """train.max_steps or train.max_minutes reached (the caller agrees it across ranks)."""
        train = self.cfg.train
        if train.max_steps and step >= train.max_steps:
            return True
        return bool(train.max_minutes and self.state.train_seconds + epoch_seconds >= 60 * train.max_minutes)

    def after_step(self, step: int, stats: EpochStats, stop: StopRequest) -> bool:
        """Log, checkpoint on schedule or on a stop signal. Returns True to end the epoch now."""
        self.state.step = step
        train = self.cfg.train
        if step % train.log_every == 0:
            self.logger.scalars(step, {"train/loss": stats.loss, "train/shortcut_loss": stats.shortcut_loss,
                                       "train/lr": self.setup.scheduler.get_last_lr()[0],
                                       "train/lines_per_s": stats.lines_per_s})
        signal_number, over_budget = distributed.max_over_ranks(
            [stop.signal_number or 0, self.out_of_budget(step, stats.seconds)])
        self.state.stopped_by = int(signal_number) or None
        if self.state.stopped_by or (train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0):
            partial = EpochStats(**stats.to_dict())
            partial.reduce(self.dist.device)  # the whole epoch so far, over all ranks
            self.state.epoch_stats = partial.to_dict()
            self.save({})
        return bool(self.state.stopped_by or over_budget)

    def end_epoch(self, epoch: int, stats: EpochStats, result: EvalResult) -> bool:
        """Log, checkpoint, decide on early stopping. Returns True to stop."""
        counts = result.counts["greedy"]
        record = {"epoch": epoch, "step": self.state.step, "train_loss": stats.loss,
                  "train_shortcut_loss": stats.shortcut_loss, "val_loss": result.loss,
                  "val_cer": counts.cer, "val_wer": counts.wer,
                  "lr": self.setup.scheduler.get_last_lr()[0], "lines_per_s": stats.lines_per_s,
                  "epoch_seconds": stats.seconds, "skipped_unreadable": stats.unreadable,
                  "skipped_too_long": stats.too_long, "bad_steps": stats.bad_steps}
        best = counts.cer < self.state.best_cer
        self.state.epoch, self.state.epoch_stats = epoch, {}
        self.state.train_seconds += stats.seconds
        self.state.best_cer = min(self.state.best_cer, counts.cer)
        self.state.epochs_without_improvement = 0 if best else self.state.epochs_without_improvement + 1
        self.save(record, best)
        self.logger.epoch(record, self.state.step)
        self.logger.samples(self.state.step, result.samples)
        if stats.unreadable or stats.too_long or stats.bad_steps:
            self.logger.warning("epoch %d: skipped %d unreadable line(s), %d line(s) too long for their "
                                "width, %d non-finite step(s); first: %s", epoch, stats.unreadable,
                                stats.too_long, stats.bad_steps, " | ".join(stats.problems[:3]) or "-")
        patience = self.cfg.train.patience
        if patience and self.state.epochs_without_improvement >= patience:
            self.logger.info("early stopping: no better validation CER for %d epoch(s)", patience)
            return True
        return bool(distributed.max_over_ranks([self.out_of_budget(self.state.step, 0.0)])[0])

    def resumed_stats(self) -> EpochStats:
        """The unfinished epoch's stats: the totals on rank 0, only the position elsewhere."""
        saved = EpochStats(**self.state.epoch_stats)
        return saved if self.dist.is_main else EpochStats(batches=saved.batches)

    def train(self) -> RunState:
        cfg = self.cfg
        with StopRequest() as stop:
            for epoch in range(self.state.epoch + 1, cfg.train.epochs + 1):
                stats = self.resumed_stats()
                self.train_loader.batch_sampler.set_epoch(epoch, start_batch=stats.batches)
                stats, self.state.step = train_one_epoch(
                    self.model, self.train_loader, self.setup, epoch, self.state.step, stats,
                    after_step=lambda step, stats: self.after_step(step, stats, stop),
                    show_progress=self.dist.is_main, placeholder=self.placeholder,
                    distributed=self.dist.distributed)
                if self.state.stopped_by:
                    self.logger.warning("stopped by signal %d at step %d; checkpoint written, continue "
                                        "with train.resume=auto", self.state.stopped_by, self.state.step)
                    break
                stats.reduce(self.dist.device)
                if self.end_epoch(epoch, stats, self.validate()):
                    break
        self.logger.info("done: best validation CER %.4f; run directory %s", self.state.best_cer, self.output_dir)
        self.logger.close()
        return self.state


def fit(cfg: Config) -> RunState:
    """Train as configured; under torchrun each process calls this. Returns the final RunState."""
    dist_info = distributed.setup(cfg.train.device)
    finished = False
    try:
        seed_everything(cfg.train.seed + dist_info.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        state = Run(cfg, dist_info).train()
        finished = True
        return state
    finally:
        distributed.cleanup(wait_for_all=finished)
