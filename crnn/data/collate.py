"""The torch Dataset over line records, and the collate function that pads a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from crnn.data.samplers import Key
from crnn.data.sources import LineRecords
from crnn.data.transforms import Augmenter, resize_line
from crnn.data.vocab import Vocab
from crnn.errors import DataError


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
    """Indexed by sampler keys `(index, augmentation seed or None)`; returns a dict per line.

    A line whose image cannot be decoded comes back as `{"index", "error"}` so that collate can
    drop and count it instead of killing the worker. Characters outside the vocab are left out of
    the CTC target (the reference text keeps them, so they count as errors in CER/WER).
    """

    def __init__(self, records: LineRecords, vocab: Vocab, height: int, resize: str = "keep_aspect",
                 width: int = 0, max_width: int = 4000, augmenter: Augmenter | None = None):
        self.records, self.vocab, self.augmenter = records, vocab, augmenter
        self.height, self.resize, self.width, self.max_width = height, resize, width, max_width

    def __len__(self) -> int:
        return len(self.records)

    def scaled_widths(self) -> list[int]:
        """Width of each line after resizing, from image headers (used to group batches)."""
        if self.resize != "keep_aspect":
            return [self.width] * len(self.records)
        return [
            min(self.max_width, max(1, round(w * self.height / h))) if h else self.max_width
            for w, h in self.records.sizes()
        ]

    def __getitem__(self, key: Key) -> dict:
        index, augmentation_seed = key
        try:
            image = self.records.image(index)
        except DataError as err:
            return {"index": index, "error": str(err)}
        ink = resize_line(image, self.height, self.resize, self.width, self.max_width)
        if self.augmenter is not None and augmentation_seed is not None:
            generator = torch.Generator().manual_seed(augmentation_seed)
            ink = self.augmenter(ink, generator)
        text = self.records.texts[index]
        target = [self.vocab.index[char] for char in text if char in self.vocab.index]
        return {"index": index, "image": ink, "text": text, "target": target}


def collate(samples: list[dict]) -> Batch:
    """Right-pad images to the widest line; the CTC lengths come from each line's own width."""
    errors = [sample["error"] for sample in samples if "error" in sample]
    samples = [sample for sample in samples if "error" not in sample]
    if not samples:
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(torch.zeros(0, 1, 1, 1), empty, empty, empty, empty, [], [], errors)
    widths = torch.tensor([sample["image"].shape[-1] for sample in samples])
    max_width = int(widths.max())
    images = torch.stack([F.pad(sample["image"], (0, max_width - sample["image"].shape[-1]))
                          for sample in samples])
    targets = torch.tensor([i for sample in samples for i in sample["target"]], dtype=torch.long)
    target_lengths = torch.tensor([len(sample["target"]) for sample in samples])
    min_frames = torch.tensor([ctc_min_frames(sample["target"]) for sample in samples])
    return Batch(images, widths, targets, target_lengths, min_frames, [s["text"] for s in samples],
                 [s["index"] for s in samples], errors)


def ctc_min_frames(target: list[int]) -> int:
    """CTC needs one frame per label plus a blank between equal neighbours ('ll' needs 3)."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:], strict=False))
