"""Corpus-level CER and WER (words: `str.split()` tokens): summed edits over summed reference lengths,
never averages of rates; nothing to divide by divides by 1 (an empty reference: its insertions)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass

import editdistance
import torch


def char_errors(reference: str, hypothesis: str) -> int:
    return editdistance.eval(reference, hypothesis)


def word_errors(reference: str, hypothesis: str) -> int:
    return editdistance.eval(reference.split(), hypothesis.split())


@dataclass
class ErrorCounts:
    """Sums that can be added across batches and all-reduced across ranks."""

    char_errors: int = 0
    chars: int = 0
    word_errors: int = 0
    words: int = 0
    lines: int = 0

    def update(self, references: list[str], hypotheses: list[str]) -> None:
        for reference, hypothesis in zip(references, hypotheses, strict=True):
            self.char_errors += char_errors(reference, hypothesis)
            self.chars += len(reference)
            self.word_errors += word_errors(reference, hypothesis)
            self.words += len(reference.split())
            self.lines += 1

    @property
    def cer(self) -> float:
        return self.char_errors / max(self.chars, 1)

    @property
    def wer(self) -> float:
        return self.word_errors / max(self.words, 1)

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, sums: torch.Tensor) -> ErrorCounts:
        return cls(*(int(round(value)) for value in sums.tolist()))


@dataclass(frozen=True)
class LineErrors:
    """One line's reference, hypothesis and character errors (for error listings)."""

    id: str
    reference: str
    hypothesis: str
    char_errors: int

    @property
    def cer(self) -> float:
        return self.char_errors / max(len(self.reference), 1)


def worst_lines_first(lines: Iterable[tuple[str, str, str]]) -> list[LineErrors]:
    """(id, reference, hypothesis) triples -> LineErrors, highest CER first, then most errors, then id."""
    scored = [LineErrors(line_id, reference, hypothesis, char_errors(reference, hypothesis))
              for line_id, reference, hypothesis in lines]
    return sorted(scored, key=lambda line: (-line.cer, -line.char_errors, line.id))


def aligned_hits(reference: str, hypothesis: str) -> list[bool]:
    """For each character of `hypothesis`, whether a minimum edit alignment to `reference` matches it
    with the same character (False: substituted or inserted)."""
    cost = [list(range(len(hypothesis) + 1))]  # cost[i][j]: edits from reference[:i] to hypothesis[:j]
    for i, ref_char in enumerate(reference, start=1):
        row = [i]
        for j, hyp_char in enumerate(hypothesis, start=1):
            row.append(min(cost[i - 1][j] + 1, row[j - 1] + 1, cost[i - 1][j - 1] + (ref_char != hyp_char)))
        cost.append(row)
    hits, i, j = [False] * len(hypothesis), len(reference), len(hypothesis)
    while i > 0 and j > 0:
        same = reference[i - 1] == hypothesis[j - 1]
        if cost[i][j] == cost[i - 1][j - 1] + (not same):
            hits[j - 1] = same
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i][j - 1] + 1:
            j -= 1
        else:
            i -= 1
    return hits
