"""Decode once (docs/gpu.md): resized lines in one block of shared memory that all DataLoader workers
(and the main process) read and fill, so the cache takes its size once, not once per worker.

Lines get slots in index order until `budget_bytes` is used up, each sized from its image header
(`Preprocess.scaled_width`); a line whose decoded size differs from its slot (a synthetic line's size
is only estimated) is not cached. The worker that first decodes a line writes its slot, then marks
it filled: readers never see half a line.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch


class LineCache:
    """uint8 ink `(1, height, width)` per line index, in shared memory."""

    def __init__(self, widths: list[int], height: int, budget_bytes: int):
        with contextlib.suppress(OSError):  # never fill /dev/shm: writing past it kills the workers (SIGBUS)
            stats = os.statvfs("/dev/shm")
            budget_bytes = min(budget_bytes, stats.f_bavail * stats.f_frsize // 2)
        self.height = height
        self.widths = np.asarray(widths, dtype=np.int64)
        sizes = self.widths * height
        ends = np.cumsum(sizes)
        self.slots = int(np.searchsorted(ends, budget_bytes, side="right"))  # lines 0..slots-1 have one
        self.offsets = ends - sizes
        self.nbytes = int(ends[self.slots - 1]) if self.slots else 0
        self.pixels = torch.empty(self.nbytes, dtype=torch.uint8).share_memory_()
        self.filled = torch.zeros(len(widths), dtype=torch.uint8).share_memory_()

    def get(self, index: int) -> torch.Tensor | None:
        if index >= self.slots or not self.filled[index]:
            return None
        start, width = int(self.offsets[index]), int(self.widths[index])
        return self.pixels[start:start + width * self.height].view(1, self.height, width)

    def put(self, index: int, ink: torch.Tensor) -> None:
        """Keep `ink` `(1, height, width)` if line `index` has a slot of that size."""
        width = int(self.widths[index])
        if index >= self.slots or self.filled[index] or ink.shape != (1, self.height, width):
            return
        start = int(self.offsets[index])
        self.pixels[start:start + width * self.height] = ink.reshape(-1)
        self.filled[index] = 1

    @property
    def lines_filled(self) -> int:
        return int(self.filled.sum())

    def describe(self) -> str:
        share = 100 * self.slots / max(1, len(self.widths))
        return (f"{self.slots} of {len(self.widths)} lines ({share:.0f}%), {self.nbytes / 2**20:.0f} MB of shared "
                f"memory (one copy for all DataLoader workers)")
