"""Character vocabulary: index 0 is the CTC blank, characters follow in sorted order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from crnn.errors import DataError

BLANK = 0


def characters(texts: Iterable[str]) -> set[str]:
    """Every character of `texts` (a million lines without one string of them all)."""
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    return seen


class Vocab:
    """Maps characters to class indices 1..C-1 (0 is the blank) and back."""

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise DataError(f"vocab must be distinct single characters, got {list(chars)!r}")
        self.chars = list(chars)
        self.index = {char: i + 1 for i, char in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Vocab:
        return cls(sorted(characters(texts)))

    def __len__(self) -> int:
        """Number of classes, blank included."""
        return len(self.chars) + 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def unknown(self, text: str) -> set[str]:
        return {char for char in text if char not in self.index}

    def unknown_in(self, texts: Iterable[str]) -> set[str]:
        """The characters of `texts` that are not in the vocabulary."""
        return characters(texts) - self.index.keys()

    def decode(self, indices: Iterable[int]) -> str:
        """Class indices (no blanks) -> text."""
        return "".join(self.chars[i - 1] for i in indices)
