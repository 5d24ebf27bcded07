"""`LineRecords`: what every line source gives (texts and sizes up front, images on demand).

The sources themselves live in `sources.py` (hub, parquet, folder, synthetic) and `xml_pages.py`
(ALTO / PAGE pages); both build on this class, and neither imports the other's module for it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image


class LineRecords:
    """A split of text lines. Subclasses fill `texts`, `ids`, `problems` and implement the rest."""

    name: str
    texts: list[str]
    ids: list[str]
    problems: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def image(self, index: int) -> Image.Image:
        """Grayscale (mode 'L') image of line `index`; DataError if it cannot be decoded."""
        raise NotImplementedError

    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every line, from image headers (or an estimate)."""
        raise NotImplementedError

    def size_array(self) -> np.ndarray:
        """`sizes()` as an `(N, 2)` integer array (sources with many lines give it without a list)."""
        return np.asarray(self.sizes(), dtype=np.int64).reshape(-1, 2)


# The reasons a line is left out, as the sources' messages word them: (what the message contains,
# the reason it is counted under). First match wins; `problem_summary` counts by these.
PROBLEM_REASONS = (
    ("empty file (0 bytes)", "empty image file"),
    ("decompression bomb", "image too large"),
    ("over the limit", "image too large"),
    ("unreadable image", "unreadable image"),
    ("image file not found", "image file not found"),
    ("not found", "image file not found"),
    ("has no entry in gt.tsv", "image without a gt.tsv line"),
    ("empty transcription", "empty transcription"),
    ("no transcription", "no transcription"),
    ("not valid UTF-8", "gt.tsv line not UTF-8"),
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


def problem_reason(problem: str) -> str:
    """The reason `problem` (a source's message) is counted under; 'other' if none matches."""
    return next((reason for text, reason in PROBLEM_REASONS if text in problem), "other")


def problem_summary(problems: list[str]) -> str:
    """'3 unreadable image, 2 empty transcription, ...': `problems` counted by reason, most first."""
    counts = Counter(problem_reason(problem) for problem in problems)
    return ", ".join(f"{count} {reason}" for reason, count in counts.most_common())
