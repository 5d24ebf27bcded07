"""The torch Dataset over line records, and the collate function that pads a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from crnn.data.samplers import Key
from crnn.data.samples import Preprocess, Sample, read_sample
from crnn.data.sources import LineRecords
from crnn.data.transforms import Augmenter
from crnn.data.vocab import Vocab


@dataclass
class Batch:
    """A padded batch. images `(N, 1, H, W)`; widths, target_lengths `(N,)`; targets `(sum L,)`."""

    images: torch.Tensor
    widths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    min_frames: torch.Tensor  # (N,) frames CTC needs: target length + repeated neighbours
    texts: list[str]
    indices: list[int]
    errors: list[str] = field(default_factory=list)  # samples dropped from this batch, and why

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, keep: torch.Tensor) -> Batch:
        """The lines where the boolean `(N,)` mask `keep` is set (targets re-cut to match)."""
        pieces = torch.split(self.targets, self.target_lengths.tolist())
        kept = [i for i in range(len(self)) if keep[i]]
        targets = torch.cat([pieces[i] for i in kept]) if kept else self.targets[:0]
        widths = self.widths[kept]
        return Batch(self.images[kept, ..., : int(widths.max()) if kept else 1], widths, targets,
                     self.target_lengths[kept], self.min_frames[kept], [self.texts[i] for i in kept],
                     [self.indices[i] for i in kept], self.errors)

    @classmethod
    def blank(cls, height: int, width: int) -> Batch:
        """One line of blank paper with an empty transcription (a valid CTC target)."""
        empty = torch.zeros(0, dtype=torch.long)
        return cls(torch.zeros(1, 1, height, width), torch.tensor([width]), empty,
                   torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), [""], [-1])

    def pin_memory(self) -> Batch:
        # only these go to the device; lengths stay on the CPU, where CTC and packing want them
        self.images, self.targets = self.images.pin_memory(), self.targets.pin_memory()
        return self


class LineDataset(torch.utils.data.Dataset):
    """Indexed by sampler keys `(index, augmentation seed or None)`; returns a `Sample` per line.

    A line that cannot be used (an image that does not decode, ...) comes back as an unusable
    sample, so that collate can drop and count it instead of killing the worker. `purpose` ("train"
    or "evaluate") decides the rule for characters outside the vocab (`crnn.data.samples`).
    """

    def __init__(self, records: LineRecords, vocab: Vocab, preprocess: Preprocess, purpose: str,
                 augmenter: Augmenter | None = None):
        self.records, self.vocab, self.preprocess = records, vocab, preprocess
        self.purpose, self.augmenter = purpose, augmenter

    def __len__(self) -> int:
        return len(self.records)

    def scaled_widths(self) -> list[int]:
        """Width of each line after resizing, from image headers (used to group batches)."""
        return [self.preprocess.scaled_width(width, height) for width, height in self.records.sizes()]

    def __getitem__(self, key: Key) -> Sample:
        index, augmentation_seed = key
        sample = read_sample(self.records, index, self.vocab, self.preprocess, self.purpose)
        if sample.image is not None and self.augmenter is not None and augmentation_seed is not None:
            generator = torch.Generator().manual_seed(augmentation_seed)
            sample = sample._replace(image=self.augmenter(sample.image, generator))
        return sample


def collate(samples: list[Sample]) -> Batch:
    """Right-pad images to the widest line; the CTC lengths come from each line's own width."""
    errors = [sample.error for sample in samples if sample.image is None]
    samples = [sample for sample in samples if sample.image is not None]
    if not samples:
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(torch.zeros(0, 1, 1, 1), empty, empty, empty, empty, [], [], errors)
    widths = torch.tensor([sample.image.shape[-1] for sample in samples])
    max_width = int(widths.max())
    images = torch.stack([F.pad(sample.image, (0, max_width - sample.image.shape[-1])) for sample in samples])
    targets = torch.tensor([i for sample in samples for i in sample.target], dtype=torch.long)
    target_lengths = torch.tensor([len(sample.target) for sample in samples])
    min_frames = torch.tensor([ctc_min_frames(sample.target) for sample in samples])
    return Batch(images, widths, targets, target_lengths, min_frames, [s.text for s in samples],
                 [s.index for s in samples], errors)


def ctc_min_frames(target: Sequence[int]) -> int:
    """CTC needs one frame per label plus a blank between equal neighbours ('ll' needs 3)."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:], strict=False))
