"""Width-grouped batch sampling, single-process or sharded across distributed ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

# Yielded per sample: (dataset index, augmentation seed or None for no augmentation).
Key = tuple[int, int | None]


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends only on (seed, epoch, index): reproducible on any worker."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class WidthBatchSampler:
    """Batches of lines of similar width, so that little of each padded batch is wasted.

    Training (`shuffle=True`): the epoch's permutation (from `seed` and the epoch) is cut into
    windows of `window` batches, each window is sorted by width and cut into batches, and the batch
    order is shuffled. The batch count is rounded up to a multiple of `world_size`, with sizes
    evened out, so every rank gets the same number of batches and every sample is used exactly
    once per epoch (no duplicates to pad the shards). Rank r takes batches r, r + W, r + 2W, ...

    Evaluation (`shuffle=False`): lines sorted by width, cut into batches of `batch_size`; rank r
    takes the same batches r, r + W, ... so a sharded evaluation sees exactly the batches that a
    single process would.
    """

    def __init__(self, widths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = 50, augment: bool = False, rank: int = 0, world_size: int = 1):
        if len(widths) == 0:
            raise ValueError("cannot sample batches from an empty split")
        self.widths = np.asarray(widths)
        self.batch_size, self.shuffle, self.seed, self.window = batch_size, shuffle, seed, window
        self.augment, self.rank, self.world_size = augment, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; `start_batch` skips this rank's first batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self) -> list[np.ndarray]:
        """All batches of the epoch, over all ranks, in the order they are dealt out."""
        count = len(self.widths)
        if not self.shuffle:
            order = np.argsort(self.widths, kind="stable")
            return [order[i:i + self.batch_size] for i in range(0, count, self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(count)
        span = self.window * self.batch_size
        order = np.concatenate([
            chunk[np.argsort(self.widths[chunk], kind="stable")]
            for chunk in np.split(order, range(span, count, span))
        ])
        batches = np.array_split(order, self.num_global_batches())
        return [batches[i] for i in rng.permutation(len(batches))]

    def num_global_batches(self) -> int:
        count = len(self.widths)
        total = -(-count // self.batch_size)
        if self.shuffle:  # a multiple of world_size, so that all ranks step together
            total = min(count, -(-total // self.world_size) * self.world_size)
        return total

    def __len__(self) -> int:
        mine = len(range(self.rank, self.num_global_batches(), self.world_size))
        return max(0, mine - self.start_batch)

    def __iter__(self) -> Iterator[list[Key]]:
        mine = self.global_batches()[self.rank::self.world_size]
        for batch in mine[self.start_batch:]:
            yield [
                (int(i), augmentation_seed(self.seed, self.epoch, int(i)) if self.augment else None)
                for i in batch
            ]
