"""`LineRecords`: what every line source gives (texts and sizes up front, images on demand), and the
reasons lines are left out, counted for the logs. The sources live in `sources.py` (hub, parquet,
folder, synthetic) and `xml_pages.py` (ALTO / PAGE pages)."""

from __future__ import annotations

import bisect
import functools
import itertools
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

    @property
    def parts(self) -> list[Part]:
        """The sources the lines come from, in order (one for a single source)."""
        return [Part(self.name, 0, len(self), 1.0, self, "")]


@dataclass(frozen=True)
class Part:
    """One source of a split: lines `start` to `stop` of the split, drawn `weight` times per
    training epoch on average (`crnn.data.samplers`)."""

    name: str
    start: int
    stop: int
    weight: float
    records: LineRecords
    key: str  # the config key that lists it (data.train[1])


class Chain(Sequence):
    """Sequences one after the other, read lazily (e.g. the texts of several sources)."""

    def __init__(self, sequences: Sequence[Sequence], starts: list[int]):
        self.sequences, self.starts = sequences, starts

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self.starts, index) - 1
        return self.sequences[part][index - self.starts[part]]

    def __iter__(self):
        return itertools.chain.from_iterable(self.sequences)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


class SourceRecords(LineRecords):
    """The lines of several sources as one split (`data.train: [...]`): (name, config key, records,
    weight) each."""

    def __init__(self, sources: list[tuple[str, str, LineRecords, float]]):
        starts = [0, *itertools.accumulate(len(records) for _, _, records, _ in sources)]
        self._parts = [Part(name, start, stop, weight, records, key) for (name, key, records, weight), start, stop
                       in zip(sources, starts, starts[1:], strict=False)]
        self.name = " + ".join(f"{name} ({records.name})" for name, _, records, _ in sources)
        self.texts = Chain([records.texts for _, _, records, _ in sources], starts)
        self.ids = Chain([records.ids for _, _, records, _ in sources], starts)
        self._starts = starts

    @property
    def parts(self) -> list[Part]:
        return self._parts

    @property
    def problems(self) -> list[str]:  # the sources add to theirs as their images' headers are read
        return [problem for part in self._parts for problem in part.records.problems]

    def image(self, index: int) -> Image.Image:
        part = self._parts[bisect.bisect_right(self._starts, index) - 1]
        return part.records.image(index - part.start)

    def size_array(self) -> np.ndarray:
        return np.concatenate([part.records.size_array().reshape(-1, 2) for part in self._parts])


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
    key or option that named the split; with several sources, each must have one (named by its own key)."""
    if len(records.parts) > 1:
        for part in records.parts:
            require_lines(part.records, part.key)
        return
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
