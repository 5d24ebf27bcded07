"""Width-grouped batch sampling, single-process or sharded across distributed ranks, and the
per-line augmentation seeds it hands out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

Key = tuple[int, int | None]  # yielded per sample: (dataset index, augmentation seed or None)
WINDOW = 50  # a shuffled epoch is sorted by width within windows of this many batches

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2**64 / the golden ratio


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 in which every input bit moves every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash64(*parts: int | np.ndarray) -> np.ndarray:
    """A uint64 hash of a tuple of integers, element-wise over arrays (they broadcast). For fixed
    earlier parts, distinct last parts hash apart (a bijection): (seed, epoch, index) gives distinct
    seeds, and hash(seed, k) counter-based random numbers. At least 1-d (numpy wraps array products
    silently, not scalar ones)."""
    state = np.zeros(1, dtype=np.uint64)
    for part in parts:
        state = _mix64((state ^ np.asarray(part).astype(np.uint64)) + _GOLDEN)
    return state


def augmentation_seeds(seed: int, epoch: int, count: int) -> np.ndarray:
    """The augmentation seed of lines 0..count-1 in `epoch` (int64 in [0, 2**63), as
    `torch.Generator.manual_seed` wants): the same on any rank or worker, whatever the split's
    size, and after a resume."""
    return (hash64(seed, epoch, np.arange(count, dtype=np.uint64)) >> np.uint64(1)).astype(np.int64)


def batch_sizes(count: int, batch_size: int, batches: int) -> list[int]:
    """`count` lines in `batches` batches (count / batch_size <= batches <= count): as many full
    batches as leave at least one line for each of the others, which share the rest evenly."""
    full = batches if batch_size == 1 else min(batches, (count - batches) // (batch_size - 1))
    rest = np.array_split(np.arange(count - full * batch_size), batches - full) if full < batches else []
    return [batch_size] * full + [len(part) for part in rest]


class WidthBatchSampler:
    """Batches of lines of similar width, so that little of each padded batch is wasted.

    Training (`shuffle=True`): the epoch's lines (every line once; with `weights`, each source's
    lines drawn as `epoch_lines` says) are permuted (from `seed` and the epoch), cut into windows of
    `WINDOW` batches, each sorted by width (with `augmented_width`: the width each line will have
    once augmented with its epoch's seed) and cut into batches (`batch_sizes`), and the batch order
    is shuffled. The batch count is rounded up to a multiple of `world_size`, so every rank steps
    the same number of times; rank r takes batches r, r + W, r + 2W, ... Evaluation
    (`shuffle=False`): every line once, sorted by width, cut and dealt out the same way, so a
    sharded evaluation sees exactly the batches of a single process.
    """

    def __init__(self, widths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 augmented_width: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 rank: int = 0, world_size: int = 1, weights: Sequence[tuple[int, int, float]] = ()):
        if len(widths) == 0:
            raise ValueError("cannot sample batches from an empty split")
        self.widths = np.asarray(widths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augmented_width, self.rank, self.world_size = augmented_width, rank, world_size
        self.epoch, self.start_batch = 0, 0
        # (start, stop, weight) of each source whose weight is not 1
        self.weights = [(start, stop, weight) for start, stop, weight in weights if weight != 1] if shuffle else []
        self.count = len(self.widths) + sum(round(weight * (stop - start)) - (stop - start)
                                            for start, stop, weight in self.weights)
        if self.count == 0:
            raise ValueError("the sources' weights draw no line in an epoch")

    def epoch_lines(self, rng: np.random.Generator) -> np.ndarray:
        """The lines of an epoch, `count` of them: every line once, except that a source of weight w
        and n lines gives round(w * n): each of its lines int(w) times, and a random choice of the
        rest once more."""
        if not self.weights:
            return np.arange(len(self.widths))
        lines, position = [], 0
        for start, stop, weight in self.weights:
            lines.append(np.arange(position, start))
            whole, extra = divmod(round(weight * (stop - start)), stop - start)
            lines += [np.arange(start, stop)] * whole + [np.sort(rng.choice(np.arange(start, stop), extra, replace=False))]
            position = stop
        return np.concatenate([*lines, np.arange(position, len(self.widths))])

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; `start_batch` skips this rank's first batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self, seeds: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """The epoch's lines (`epoch_lines`) and all its batches, over all ranks, in the order they
        are dealt out, as positions in those lines; `seeds`: the augmentation seed of each position,
        or None."""
        count = self.count
        if not self.shuffle:
            order = np.argsort(self.widths, kind="stable")
            return np.arange(count), [order[i:i + self.batch_size] for i in range(0, count, self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        lines = self.epoch_lines(rng)
        order = rng.permutation(count)
        span = WINDOW * self.batch_size
        widths = self.widths[lines] if seeds is None else self.augmented_width(self.widths[lines], seeds)
        order = np.concatenate([chunk[np.argsort(widths[chunk], kind="stable")]
                                for chunk in np.split(order, range(span, count, span))])
        batches = np.split(order, np.cumsum(batch_sizes(count, self.batch_size, self.num_global_batches()))[:-1])
        return lines, [batches[i] for i in rng.permutation(len(batches))]

    def num_global_batches(self) -> int:
        total = -(-self.count // self.batch_size)
        if self.shuffle:  # a multiple of world_size, so that all ranks step together
            total = min(self.count, -(-total // self.world_size) * self.world_size)
        return total

    def __len__(self) -> int:
        mine = len(range(self.rank, self.num_global_batches(), self.world_size))
        return max(0, mine - self.start_batch)

    def __iter__(self) -> Iterator[list[Key]]:
        augment = self.shuffle and self.augmented_width is not None
        seeds = augmentation_seeds(self.seed, self.epoch, self.count) if augment else None
        lines, batches = self.global_batches(seeds)
        for batch in batches[self.rank::self.world_size][self.start_batch:]:
            yield [(int(lines[i]), None if seeds is None else int(seeds[i])) for i in batch]
