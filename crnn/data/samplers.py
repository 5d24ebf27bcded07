"""Width-grouped batch sampling, single-process or sharded across distributed ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

# Yielded per sample: (dataset index, augmentation seed or None for no augmentation).
Key = tuple[int, int | None]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2**64 / the golden ratio


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 in which every input bit moves every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash64(*parts: int | np.ndarray) -> np.ndarray:
    """A uint64 hash of a tuple of integers, element-wise over arrays (they broadcast). Each part is
    absorbed, then mixed: for fixed earlier parts, distinct last parts hash apart (a bijection), so
    (seed, epoch, index) gives distinct seeds and hash(seed, k) counter-based random numbers, for a
    million lines in a few array ops. At least 1-d: numpy wraps array products silently."""
    state = np.zeros(1, dtype=np.uint64)
    for part in parts:
        state = _mix64((state ^ np.asarray(part).astype(np.uint64)) + _GOLDEN)
    return state


def augmentation_seeds(seed: int, epoch: int, count: int) -> np.ndarray:
    """The augmentation seed of lines 0..count-1 in `epoch` (int64, in [0, 2**63) as
    `torch.Generator.manual_seed` wants): a hash of (seed, epoch, index), so a line's seed is the same
    on any rank or worker, whatever the split's size, and after a resume."""
    return (hash64(seed, epoch, np.arange(count, dtype=np.uint64)) >> np.uint64(1)).astype(np.int64)


def batch_sizes(count: int, batch_size: int, batches: int) -> list[int]:
    """`count` lines in `batches` batches (count / batch_size <= batches <= count): as many full
    batches as leave at least one line for each of the others, which share the rest evenly."""
    full = batches if batch_size == 1 else min(batches, (count - batches) // (batch_size - 1))
    if full == batches:
        return [batch_size] * full
    rest = [len(part) for part in np.array_split(np.arange(count - full * batch_size), batches - full)]
    return [batch_size] * full + rest


class WidthBatchSampler:
    """Batches of lines of similar width, so that little of each padded batch is wasted.

    Training (`shuffle=True`): the epoch's permutation (from `seed` and the epoch) is cut into
    windows of `window` batches, each window is sorted by width (the width each line will have once
    augmented: `augmented_width` maps arrays of widths and seeds to those widths, all lines at once)
    and cut into batches, and the batch order is shuffled. Batches hold exactly `batch_size` lines but
    for the last few (`batch_sizes`), so the GPU sees few distinct shapes. The batch count is rounded
    up to a multiple of `world_size`, so every rank gets the same number of batches and every sample
    is used exactly once per epoch (no duplicates to pad the shards). Rank r takes batches r, r + W,
    r + 2W, ...

    Evaluation (`shuffle=False`): lines sorted by width, cut into batches of `batch_size`; rank r
    takes the same batches r, r + W, ... so a sharded evaluation sees exactly the batches that a
    single process would.
    """

    def __init__(self, widths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = 50,
                 augmented_width: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 rank: int = 0, world_size: int = 1, augment_from_epoch: int = 1):
        if len(widths) == 0:
            raise ValueError("cannot sample batches from an empty split")
        self.widths = np.asarray(widths)
        self.batch_size, self.shuffle, self.seed, self.window = batch_size, shuffle, seed, window
        self.augmented_width, self.rank, self.world_size = augmented_width, rank, world_size
        self.augment_from_epoch = augment_from_epoch
        self.epoch, self.start_batch = 0, 0
        self._seeds: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; `start_batch` skips this rank's first batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _epoch_seeds(self, epoch: int) -> np.ndarray | None:
        """Each line's augmentation seed in `epoch`, or None without augmentation (none configured,
        or `epoch` before `augment_from_epoch`); kept for the epoch: the batches and their keys
        both need them."""
        if self.augmented_width is None or epoch < self.augment_from_epoch:
            return None
        if self._seeds[0] != epoch:
            self._seeds = (epoch, augmentation_seeds(self.seed, epoch, len(self.widths)))
        return self._seeds[1]

    def epoch_widths(self) -> np.ndarray:
        """The widths batches are grouped by: with augmentation, the widths lines will have once
        augmented (a sheared or scaled line changes width), so that little padding is added."""
        seeds = self._epoch_seeds(self.epoch)
        if seeds is None:
            return self.widths
        return self.augmented_width(self.widths, seeds)

    def global_batches(self) -> list[np.ndarray]:
        """All batches of the epoch, over all ranks, in the order they are dealt out."""
        count = len(self.widths)
        if not self.shuffle:
            order = np.argsort(self.widths, kind="stable")
            return [order[i:i + self.batch_size] for i in range(0, count, self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(count)
        span, widths = self.window * self.batch_size, self.epoch_widths()
        order = np.concatenate([
            chunk[np.argsort(widths[chunk], kind="stable")]
            for chunk in np.split(order, range(span, count, span))
        ])
        batches = np.split(order, np.cumsum(batch_sizes(count, self.batch_size, self.num_global_batches()))[:-1])
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
        seeds = self._epoch_seeds(self.epoch) if self.shuffle else None
        for batch in mine[self.start_batch:]:
            yield [(int(i), None if seeds is None else int(seeds[i])) for i in batch]
