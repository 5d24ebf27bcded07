"""CTC decoding: greedy (best path), vectorised over the batch."""

from __future__ import annotations

import torch

from crnn.data.vocab import BLANK, Vocab


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks.

    log_probs `(T, N, C)`, lengths `(N,)` -> N lists of class indices.
    """
    best = log_probs.argmax(dim=-1).T  # (N, T)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    keep &= torch.arange(best.shape[1], device=best.device)[None, :] < lengths.to(best.device)[:, None]
    best, keep = best.cpu(), keep.cpu()  # one transfer for the whole batch
    return [row[mask].tolist() for row, mask in zip(best, keep, strict=True)]


class GreedyDecoder:
    """log_probs `(T, N, C)`, lengths `(N,)` -> N strings."""

    name = "greedy"

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [self.vocab.decode(indices) for indices in greedy_decode(log_probs, lengths)]
