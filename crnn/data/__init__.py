"""Data pipeline: records (sources.py) -> samples (samples.py) -> LineDataset and collate (collate.py)
-> width-grouped DataLoader (samplers.py)."""

from __future__ import annotations

import signal

import torch

from crnn.config import DataConfig
from crnn.data.collate import Batch, LineDataset, collate
from crnn.data.samplers import WidthBatchSampler
from crnn.data.samples import Preprocess, Sample, make_sample
from crnn.data.sources import LineRecords, load_records
from crnn.data.transforms import Augmenter
from crnn.data.vocab import Vocab

__all__ = ["Batch", "LineDataset", "LineRecords", "Preprocess", "Sample", "Vocab", "build_dataset", "build_loader",
           "collate", "load_records", "make_sample"]


def build_dataset(data_cfg: DataConfig, records: LineRecords, vocab: Vocab, train: bool) -> LineDataset:
    """Augmentation only for training and only when `data.augment.enabled`."""
    augmenter = Augmenter(data_cfg.augment) if train and data_cfg.augment.enabled else None
    return LineDataset(records, vocab, Preprocess.from_config(data_cfg), "train" if train else "evaluate",
                       augmenter)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly (after a
    checkpoint) and then shuts them down; a terminal's Ctrl-C or a scheduler's SIGTERM reaches the
    whole process group, and a worker killed by it would crash the main process mid-step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(data_cfg: DataConfig, dataset: LineDataset, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose batch sampler groups lines by width and shards them across ranks."""
    sampler = WidthBatchSampler(
        dataset.scaled_widths(), data_cfg.batch_size, shuffle=train, seed=seed,
        window=data_cfg.shuffle_window, augment=dataset.augmenter is not None,
        rank=rank, world_size=world_size,
    )
    workers = data_cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        # its own generator, so creating an iterator never draws from the global RNG (which
        # dropout uses): a resumed run then sees exactly the random numbers of an unbroken one
        generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_stop_signals,
    )
