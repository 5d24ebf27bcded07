"""Batch augmentation on the device (here: CPU tensors), bounded batch shapes, fixed batch sizes."""

import functools
import random

import pytest
import torch

from crnn.config import AugmentConfig
from crnn.data import BatchAugmenter, Preprocess, Vocab, collate, make_sample, synthetic
from crnn.data.augment import augmented_width, draw_params
from crnn.data.samplers import WidthBatchSampler, augmentation_seed, batch_sizes
from tests.helpers import STRONG, ink_lines, pad_batch


def test_a_line_is_augmented_the_same_alone_or_anywhere_in_any_batch():
    lines, seeds = ink_lines(6), [11, 12, 13, 14, 15, 16]
    augmenter = BatchAugmenter(STRONG, width_multiple=64)
    images, widths = pad_batch(lines, width=900)
    batch, batch_widths = augmenter(images, widths, seeds)
    assert batch.shape[-1] % 64 == 0 and batch.shape[-1] >= int(batch_widths.max())
    order = [5, 3, 1, 0, 2, 4]
    shuffled, shuffled_widths = augmenter(*pad_batch([lines[i] for i in order]), [seeds[i] for i in order])
    for i, line in enumerate(lines):
        alone, alone_width = BatchAugmenter(STRONG)(*pad_batch([line]), [seeds[i]])
        width = int(alone_width[0])
        assert int(batch_widths[i]) == width == int(shuffled_widths[order.index(i)])
        assert torch.allclose(batch[i, ..., :width], alone[0, ..., :width], atol=1e-4), i
        assert torch.allclose(shuffled[order.index(i), ..., :width], alone[0, ..., :width], atol=1e-4), i
        assert batch[i, ..., width:].abs().sum() == 0  # blank paper right of the line


def test_unseeded_lines_are_untouched_and_seeds_decide_everything():
    lines = ink_lines(3)
    images, widths = pad_batch(lines)
    augmenter = BatchAugmenter(STRONG, width_multiple=1)
    out, out_widths = augmenter(images, widths, [None, 7, None])
    assert torch.equal(out[0, ..., : widths[0]], images[0, ..., : widths[0]])
    assert torch.equal(out[2, ..., : widths[2]], images[2, ..., : widths[2]])
    assert out_widths[0] == widths[0] and out_widths[2] == widths[2]
    again, _ = augmenter(images, widths, [None, 7, None])
    other, _ = augmenter(images, widths, [None, 8, None])
    assert torch.equal(out, again)
    assert not torch.equal(out[1], other[1])


def test_each_op_does_what_it_says():
    (line,) = ink_lines(1)
    images, widths = pad_batch([line])
    only = {"shear": 0.0, "rotation": 0.0, "scale": 0.0, "distortion": 0.0, "morphology": 0.0,
            "brightness": 0.0, "contrast": 0.0}
    wider = AugmentConfig(prob=1.0, **{**only, "shear": 0.4})
    seed = next(s for s in range(100) if abs(draw_params(wider, int(widths[0]), 64, s).out_width - widths[0]) > 10)
    sheared, sheared_width = BatchAugmenter(wider)(images, widths, [seed])
    assert int(sheared_width[0]) > int(widths[0])  # a sheared line takes more columns, and its CTC frames follow
    thick, _ = BatchAugmenter(AugmentConfig(prob=1.0, **{**only, "morphology": 2.0}))(images, widths, [1])
    thin, _ = BatchAugmenter(AugmentConfig(prob=1.0, **{**only, "morphology": 2.0}))(images, widths, [3])
    kinds = {seed: draw_params(AugmentConfig(prob=1.0, **{**only, "morphology": 2.0}), 100, 64, seed).dilate
             for seed in (1, 3)}
    assert kinds == {1: True, 3: False} or kinds == {1: False, 3: True}
    dilated, eroded = (thick, thin) if kinds[1] else (thin, thick)
    assert dilated.sum() > images.sum() > eroded.sum()
    lit, _ = BatchAugmenter(AugmentConfig(prob=1.0, **{**only, "brightness": 0.5, "contrast": 0.5}))(
        images, widths, [5])
    assert 0.0 <= float(lit.min()) and float(lit.max()) <= 1.0 and not torch.equal(lit, images)


def test_batches_are_padded_to_the_width_multiple_and_keep_each_width():
    vocab, preprocess = Vocab(list("ab")), Preprocess(16)
    samples = [make_sample(i, synthetic.render_line("ab" * (i + 1), random.Random(i), 32), "ab", vocab, preprocess,
                           "train") for i in range(3)]
    batch = collate(samples, width_multiple=64)
    widths = [s.image.shape[-1] for s in samples]
    assert batch.widths.tolist() == widths and batch.images.shape[-1] == -(-max(widths) // 64) * 64
    assert batch.images.dtype == torch.uint8 and batch.to(torch.device("cpu")).images.dtype == torch.float32
    assert float(batch.to(torch.device("cpu")).images.max()) <= 1.0


@pytest.mark.parametrize("count,batch,batches", [(41, 4, 12), (100, 16, 8), (4906, 32, 154), (7, 2, 4)])
def test_batches_are_full_but_the_last_few(count, batch, batches):
    sizes = batch_sizes(count, batch, batches)
    assert sum(sizes) == count and len(sizes) == batches and min(sizes) >= 1
    short = [size for size in sizes if size != batch]
    assert len(short) <= 3 and sizes == sorted(sizes, reverse=True)


def test_a_shuffled_epoch_has_few_distinct_batch_sizes():
    widths = torch.randint(100, 3000, (1000,)).tolist()
    for world in (1, 3):
        sampler = WidthBatchSampler(widths, 32, shuffle=True, seed=0, world_size=world)
        sampler.set_epoch(1)
        sizes = [len(batch) for batch in sampler]
        assert sizes.count(32) >= len(sizes) - 2


def test_training_batches_group_lines_by_the_width_they_will_have_once_augmented():
    widths = torch.randint(200, 2000, (640,), generator=torch.Generator().manual_seed(0)).tolist()
    will_have = functools.partial(augmented_width, STRONG, 64)
    assert all(will_have(w, s) == draw_params(STRONG, w, 64, s).out_width for s, w in enumerate(widths[:50]))

    def padding(sampler):
        sampler.set_epoch(3)
        padded = used = 0
        for keys in sampler:
            augmented = [will_have(widths[i], augmentation_seed(1, 3, i)) for i, _ in keys]
            padded, used = padded + len(keys) * max(augmented), used + sum(augmented)
        return 1 - used / padded

    grouped = WidthBatchSampler(widths, 16, shuffle=True, seed=1, augmented_width=will_have)
    grouped.set_epoch(3)
    assert all(seed == augmentation_seed(1, 3, i) for keys in grouped for i, seed in keys)
    plain = WidthBatchSampler(widths, 16, shuffle=True, seed=1)
    assert padding(grouped) < padding(plain) / 3
