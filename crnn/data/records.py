"""`LineRecords`: what every line source gives (texts and sizes up front, images on demand).

The sources themselves live in `sources.py` (hub, parquet, folder, synthetic) and `xml_pages.py`
(ALTO / PAGE pages); both build on this class, and neither imports the other's module for it.
"""

from __future__ import annotations

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
