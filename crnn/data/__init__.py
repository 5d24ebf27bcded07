"""Data pipeline: records (sources.py, xml_pages.py) -> samples (samples.py) -> LineDataset and
collate (collate.py) -> width-grouped DataLoader (samplers.py), decoded once (cache.py) -> on the
device, augmentation of whole training batches (augment.py)."""

from __future__ import annotations

import atexit
import functools
import signal
import weakref

import torch

from crnn.config import DataConfig
from crnn.data.augment import BatchAugmenter, augmented_widths
from crnn.data.cache import LineCache
from crnn.data.collate import Batch, LineDataset, collate
from crnn.data.records import LineRecords
from crnn.data.samplers import WidthBatchSampler
from crnn.data.samples import Preprocess, Sample, make_sample
from crnn.data.sources import load_records
from crnn.data.vocab import Vocab

__all__ = ["Batch", "BatchAugmenter", "LineCache", "LineDataset", "LineRecords", "Preprocess", "Sample", "Vocab",
           "build_augmenter", "build_dataset", "build_loader", "collate", "load_records", "make_sample",
           "shut_down"]


def build_dataset(data_cfg: DataConfig, records: LineRecords, vocab: Vocab, train: bool,
                  cache_bytes: int = 0) -> LineDataset:
    """A split as samples for training (`train`) or evaluation; with `cache_bytes`, its decoded
    lines are kept in shared memory up to that size (`crnn.data.cache`)."""
    preprocess = Preprocess.from_config(data_cfg)
    dataset = LineDataset(records, vocab, preprocess, "train" if train else "evaluate")
    if cache_bytes > 0:
        dataset.cache = LineCache(dataset.widths, data_cfg.height, cache_bytes)
    return dataset


def build_augmenter(data_cfg: DataConfig) -> BatchAugmenter | None:
    """The training batches' augmentation; None when `data.augment.prob` is 0."""
    return BatchAugmenter(data_cfg.augment, data_cfg.width_multiple) if data_cfg.augment.prob > 0 else None


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly (after a
    checkpoint) and then shuts them down: a Ctrl-C or a scheduler's SIGTERM reaches the whole
    process group, and a worker killed by it would crash the main process mid-step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(data_cfg: DataConfig, dataset: LineDataset, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose batch sampler groups lines by width and shards them across ranks; training
    batches draw each source's lines as its weight says and carry each line's augmentation seed
    when augmentation is on."""
    augment = train and data_cfg.augment.prob > 0
    sampler = WidthBatchSampler(
        dataset.widths, data_cfg.batch_size, shuffle=train, seed=seed, rank=rank, world_size=world_size,
        augmented_width=functools.partial(augmented_widths, data_cfg.augment, data_cfg.height) if augment else None,
        weights=[(part.start, part.stop, part.weight) for part in dataset.records.parts])
    workers = data_cfg.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        collate_fn=functools.partial(collate, width_multiple=data_cfg.width_multiple),
        pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        # its own generator, so creating an iterator never draws from the global RNG (which
        # dropout uses): a resumed run then sees exactly the random numbers of an unbroken one
        generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_stop_signals,
    )
    if workers:
        # before multiprocessing's own exit hook (registered earlier, so run later), which would
        # SIGTERM the workers (ignored, see above) and wait for them forever
        atexit.register(_shut_down_if_alive, weakref.ref(loader))
    return loader


def _shut_down_if_alive(loader_ref: weakref.ref) -> None:
    loader = loader_ref()
    if loader is not None:
        shut_down(loader)


def shut_down(loader: torch.utils.data.DataLoader) -> None:
    """Stop a loader's worker processes now (every run and benchmark does at its end): persistent
    workers otherwise outlive it, and at exit multiprocessing would wait for them forever (they ignore
    its SIGTERM). The DataLoader has no public method: this is what its iterator's finaliser does."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
