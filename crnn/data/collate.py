"""The torch Dataset over line records, and the collate function that pads a batch."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from crnn.data.cache import LineCache
from crnn.data.records import LineRecords
from crnn.data.samplers import Key
from crnn.data.samples import Preprocess, Sample, make_sample, read_sample
from crnn.data.vocab import Vocab


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a host-device sync: on CUDA, copied from pinned memory
    asynchronously (a copy from pageable memory waits for the device)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class Batch:
    """A padded batch. images `(N, 1, H, W)`: uint8 ink from the loader, float ink in [0, 1] once
    `to(device)`; targets `(sum L,)` on the images' device. widths, target_lengths and min_frames
    `(N,)` stay on the CPU, so what is decided from them needs no device read."""

    images: torch.Tensor
    widths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    min_frames: torch.Tensor  # (N,) frames CTC needs: target length + repeated neighbours
    texts: list[str]
    indices: list[int]
    errors: list[str] = field(default_factory=list)  # samples dropped from this batch, and why
    seeds: list[int | None] = field(default_factory=list)  # per line: augmentation seed or None

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, keep: torch.Tensor) -> Batch:
        """The lines where the boolean CPU `(N,)` mask `keep` is set (targets re-cut to match), without
        a device sync; the padded width is kept, so the shape stays one of the bounded set."""
        pieces = torch.split(self.targets, self.target_lengths.tolist())
        kept = [i for i, flag in enumerate(keep.tolist()) if flag]
        targets = torch.cat([pieces[i] for i in kept]) if kept else self.targets[:0]
        lines = to_device(torch.tensor(kept, dtype=torch.long), self.images.device)
        return Batch(self.images[lines], self.widths[kept], targets, self.target_lengths[kept],
                     self.min_frames[kept], [self.texts[i] for i in kept], [self.indices[i] for i in kept],
                     self.errors, [self.seeds[i] for i in kept])

    def to(self, device: torch.device) -> Batch:
        """The batch as the model takes it: images on `device` as float ink in [0, 1] (they cross as
        uint8, a quarter of the bytes), targets there too; the lengths stay on the CPU."""
        images = self.images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return dataclasses.replace(self, images=images, targets=self.targets.to(device, non_blocking=True))

    @classmethod
    def blank(cls, height: int, width: int) -> Batch:
        """One line of blank paper with an empty transcription (a valid CTC target)."""
        empty = torch.zeros(0, dtype=torch.long)
        return cls(torch.zeros(1, 1, height, width, dtype=torch.uint8), torch.tensor([width]), empty,
                   torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), [""], [-1], [], [None])

    def pin_memory(self) -> Batch:
        self.images, self.targets = self.images.pin_memory(), self.targets.pin_memory()
        return self


class LineDataset(torch.utils.data.Dataset):
    """Indexed by sampler keys `(index, augmentation seed or None)`; returns a `Sample` per line,
    an unusable one (which collate drops and counts) for a line that cannot be used. `purpose`
    ("train" or "evaluate") decides the rule for characters outside the vocab (`crnn.data.samples`)."""

    def __init__(self, records: LineRecords, vocab: Vocab, preprocess: Preprocess, purpose: str):
        self.records, self.vocab, self.preprocess, self.purpose = records, vocab, preprocess, purpose
        self.cache: LineCache | None = None  # build_dataset's, sized from `widths`

    def __len__(self) -> int:
        return len(self.records)

    @functools.cached_property
    def widths(self) -> np.ndarray:
        """Width of each line after resizing, from image headers (to group batches, size the cache)."""
        return self.preprocess.scaled_widths(self.records.size_array())

    def __getitem__(self, key: Key) -> Sample:
        index, augmentation_seed = key
        ink = self.cache.get(index) if self.cache is not None else None
        if ink is None:
            sample = read_sample(self.records, index, self.vocab, self.preprocess, self.purpose)
            if self.cache is not None and sample.image is not None:
                self.cache.put(index, sample.image)
        else:
            sample = make_sample(index, ink, self.records.texts[index], self.vocab, self.preprocess,
                                 self.purpose, self.records.ids[index])
        return sample._replace(seed=augmentation_seed)


def collate(samples: list[Sample], width_multiple: int = 1) -> Batch:
    """Right-pad images to the widest line, rounded up to `width_multiple` (a bounded set of batch
    shapes); the CTC lengths come from each line's own width."""
    errors = [sample.error for sample in samples if sample.image is None]
    samples = [sample for sample in samples if sample.image is not None]
    if not samples:
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(torch.zeros(0, 1, 1, 1, dtype=torch.uint8), empty, empty, empty, empty, [], [], errors)
    widths = torch.tensor([sample.image.shape[-1] for sample in samples])
    canvas = round_up(int(widths.max()), width_multiple)
    images = torch.stack([F.pad(sample.image, (0, canvas - sample.image.shape[-1])) for sample in samples])
    targets = torch.tensor([i for sample in samples for i in sample.target], dtype=torch.long)
    target_lengths = torch.tensor([len(sample.target) for sample in samples])
    min_frames = torch.tensor([ctc_min_frames(sample.target) for sample in samples])
    return Batch(images, widths, targets, target_lengths, min_frames, [s.text for s in samples],
                 [s.index for s in samples], errors, [s.seed for s in samples])


def ctc_min_frames(target: Sequence[int]) -> int:
    """CTC needs one frame per label plus a blank between equal neighbours ('ll' needs 3)."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:], strict=False))
