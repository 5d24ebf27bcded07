"""`LineRecords`: what every line source gives (texts and sizes up front, images on demand), and the
reasons lines are left out, counted for the logs. The sources live in `sources.py` (hub, parquet,
folder, synthetic) and `xml_pages.py` (ALTO / PAGE pages)."""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from crnn.data.direction import visual
from crnn.errors import DataError


class LineRecords:
    """A split of text lines. Subclasses fill `name`, `texts`, `ids`, `problems` (entries left out
    when loading, one message each) and implement `image` and `size_array`."""

    name: str
    texts: list[str]
    ids: list[str]
    problems: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def image(self, index: int) -> Image.Image:
        """Grayscale (mode 'L') image of line `index`; DataError if it cannot be decoded."""
        raise NotImplementedError

    def size_array(self) -> np.ndarray:
        """`(N, 2)` integer (width, height) of every line, from image headers (or an estimate)."""
        raise NotImplementedError

    def sizes(self) -> list[tuple[int, int]]:
        return [(int(width), int(height)) for width, height in self.size_array()]


# The reasons a line is left out, as the sources' messages word them: (what the message contains,
# the reason it is counted under). First match wins.
PROBLEM_REASONS = (
    ("empty file (0 bytes)", "empty image file"),
    ("decompression bomb", "image too large"),
    ("over the limit", "image too large"),
    ("unreadable image", "unreadable image"),
    ("not found", "image file not found"),
    ("has no entry in gt.tsv", "image without a gt.tsv line"),
    ("empty transcription", "empty transcription"),
    ("no transcription", "no transcription"),
    ("no TAB", "gt.tsv line without a TAB"),
    ("malformed XML", "XML that does not parse"),
    ("neither ALTO nor PAGE", "XML that does not parse"),
    ("leads outside", "page image outside its folder"),
    ("malformed", "malformed line region"),
    ("degenerate", "degenerate line region"),
    ("no polygon, box or baseline", "line without a region"),
    ("outside the", "line outside its page"),
    ("CTC frames", "text too long for its line"),
)


def problem_summary(problems: list[str]) -> str:
    """'3 unreadable image, 2 empty transcription, ...': `problems` counted by reason, most first."""
    counts = Counter(next((reason for text, reason in PROBLEM_REASONS if text in problem), "other")
                     for problem in problems)
    return ", ".join(f"{count} {reason}" for reason, count in counts.most_common())


def require_lines(records: LineRecords, key: str) -> None:
    """DataError unless at least one line of `records` can be read (its image header gave a size):
    a split with none would be scored as a perfect 0% CER, or trained on nothing. `key`: the config
    key or option that named the split."""
    readable = int((records.size_array()[:, 1] > 0).sum()) if len(records) else 0
    if readable:
        return
    first = f"; first: {records.problems[0]}" if records.problems else ""
    summary = f" ({problem_summary(records.problems)})" if records.problems else ""
    raise DataError(f"{key}: no line of {records.name} can be read; {len(records.problems)} left "
                    f"out{summary}{first}")


def normalized(text: str, form: str) -> str:
    """`text` in the Unicode `form` (`data.normalization`; "none": as it is), its runs of white space
    made one space and its ends stripped of them."""
    return " ".join((text if form == "none" else unicodedata.normalize(form, text)).split())


class MappedTexts(Sequence):
    """`texts` (a lazy sequence, e.g. a column of millions of lines) with `normalize` applied to
    each one when it is read: nothing is copied up front."""

    def __init__(self, texts: Sequence[str], normalize: Callable[[str], str]):
        self.texts, self.normalize = texts, normalize

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.normalize(text) for text in self.texts[index]]
        return self.normalize(self.texts[index])

    def __iter__(self):
        return map(self.normalize, self.texts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


def prepared(text: str, form: str, direction: str) -> str:
    """`text` `normalized` to `form`, in the order its image shows it (`crnn.data.direction.visual`)."""
    return visual(normalized(text, form), direction)


def normalize_texts(records: LineRecords, form: str, direction: str = "ltr") -> LineRecords:
    """`records` with their texts `prepared`: a list at once, a lazy one as each text is read."""
    normalize = functools.partial(prepared, form=form, direction=direction)  # picklable, for workers
    texts = records.texts
    records.texts = ([normalize(text) for text in texts] if isinstance(texts, list)
                     else MappedTexts(texts, normalize))
    return records
