"""A text line on its way to the model: one typed `Sample`, made by `make_sample` for every purpose
(training loader, evaluation, inference, benchmark, data check), so they agree on the preprocessing
and on the CTC target.

Images become uint8 tensors `(1, H, W)` of *ink*, 0 (paper) to 255: right-padding a batch with zeros
looks like more blank paper, and uint8 is a quarter of the bytes to cache and to copy to the device.

Characters outside the vocabulary (one rule, by purpose):
- "train": the character is left out of the CTC target and the rest of the line still trains (the
  model has no output for it); a line with no known character at all is left out, as an error
  sample (its ink would only be taught as blank).
- "evaluate": the same target; the reference text keeps every character, so unknown ones count as
  errors in CER/WER. Never a crash, never left out.
- "predict": there is no reference; the target is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from crnn.config import DataConfig
from crnn.data.records import LineRecords
from crnn.data.vocab import Vocab
from crnn.errors import DataError

PURPOSES = ("train", "evaluate", "predict")


class Sample(NamedTuple):
    """One line, ready to be batched by `collate`."""

    index: int  # the line's index in its records (or in the caller's list)
    image: torch.Tensor | None  # (1, H, W) uint8 ink; None when the line cannot be used
    text: str  # the reference transcription ("" when predicting)
    target: tuple[int, ...]  # CTC labels: the classes of the text's characters that are in the vocab
    error: str = ""  # why the line cannot be used (then `image` is None)
    seed: int | None = None  # its augmentation seed (crnn.data.augment); None: not augmented


@dataclass(frozen=True)
class Preprocess:
    """Grayscale PIL line -> ink `(1, height, W)`: scaled to `height`, the aspect ratio kept, W
    capped at `max_width`."""

    height: int
    max_width: int = 4000

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> Preprocess:
        return cls(data_cfg.height, data_cfg.max_width)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = (self.scaled_width(*image.size), self.height)
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
        return 255 - torch.from_numpy(np.array(image, dtype=np.uint8)).unsqueeze(0)

    def scaled_width(self, width: int, height: int) -> int:
        """The width `__call__` gives an image of this size (0 x 0: unknown, assume the widest)."""
        return int(self.scaled_widths(np.array([[width, height]]))[0])

    def natural_widths(self, sizes: np.ndarray) -> np.ndarray:
        """The width at `height` of each row `(width, height)` of `sizes` `(N, 2)`, before
        `max_width`, as an int64 array."""
        sizes = np.asarray(sizes).reshape(-1, 2)
        scale = self.height / np.maximum(sizes[:, 1], 1).astype(np.float64)
        return np.rint(sizes[:, 0] * scale).astype(np.int64)  # half to even

    def scaled_widths(self, sizes: np.ndarray) -> np.ndarray:
        """`scaled_width` of each row `(width, height)` of `sizes` `(N, 2)`, as an int64 array."""
        sizes = np.asarray(sizes).reshape(-1, 2)
        widths = np.clip(self.natural_widths(sizes), 1, self.max_width)
        return np.where(sizes[:, 1] > 0, widths, self.max_width)

    def squeeze_warning(self, sizes: np.ndarray, name: str) -> str:
        """A warning about the lines of `name` (their `sizes` `(N, 2)`) wider than `max_width` at
        `height`, which `__call__` squeezes to it (they lose detail and read worse); "" if none is."""
        widths = self.natural_widths(sizes)[np.asarray(sizes).reshape(-1, 2)[:, 1] > 0]
        wide = widths[widths > self.max_width]
        if not len(wide):
            return ""
        return (f"{name}: {len(wide)} line(s) wider than data.max_width={self.max_width} px at height "
                f"{self.height} (the widest {wide.max()} px) are squeezed to it and read worse; raise "
                f"data.max_width to read them whole")


def unusable(index: int, error: str) -> Sample:
    """A line left out, and why; `collate` drops it and counts it."""
    return Sample(index, None, "", (), error)


def make_sample(index: int, image: Image.Image | torch.Tensor, text: str, vocab: Vocab, preprocess: Preprocess,
                purpose: str, where: str = "") -> Sample:
    """The one way a line becomes a sample (the vocabulary rule: module docstring). `image`: the
    grayscale PIL line, or its ink already preprocessed (from `crnn.data.cache`)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    if purpose == "predict":
        text = ""
    target = tuple(vocab.index[char] for char in text if char in vocab.index)
    if purpose == "train" and not target:
        return unusable(index, f"{where or f'line {index}'}: none of the characters of {text!r} is in "
                               f"the vocabulary, line left out")
    ink = image if isinstance(image, torch.Tensor) else preprocess(image)
    return Sample(index, ink, text, target)


def read_sample(records: LineRecords, index: int, vocab: Vocab, preprocess: Preprocess, purpose: str) -> Sample:
    """Decode line `index` of `records` and make its sample; an image that cannot be decoded gives
    an unusable sample (so a DataLoader worker never dies of one bad file)."""
    try:
        image = records.image(index)
    except DataError as err:
        return unusable(index, str(err))
    return make_sample(index, image, records.texts[index], vocab, preprocess, purpose, records.ids[index])
