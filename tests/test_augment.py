"""Batch augmentation on the device (here: CPU tensors), bounded batch shapes, fixed batch sizes."""

import dataclasses
import functools
import random

import numpy as np
import pytest
import torch

from crnn.config import AugmentConfig, DataConfig, SyntheticConfig
from crnn.data import (
    BatchAugmenter,
    Preprocess,
    Vocab,
    build_augmenter,
    build_dataset,
    build_loader,
    collate,
    load_records,
    make_sample,
    synthetic,
)
from crnn.data.augment import augmented_widths, draw_params, draw_warps
from crnn.data.samplers import WidthBatchSampler, augmentation_seeds, batch_sizes
from tests.helpers import STRONG, ink_lines, pad_batch


@pytest.mark.slow
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
    morphology = AugmentConfig(prob=1.0, **{**only, "morphology": 2.0})
    dilating, eroding = (next(s for s in range(100) if draw_params(morphology, 100, 64, s).dilate == kind)
                         for kind in (True, False))
    dilated, _ = BatchAugmenter(morphology)(images, widths, [dilating])
    eroded, _ = BatchAugmenter(morphology)(images, widths, [eroding])
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
    widths = torch.randint(200, 2000, (640,), generator=torch.Generator().manual_seed(0)).numpy()
    will_have = functools.partial(augmented_widths, STRONG, 64)
    augmented = will_have(widths, augmentation_seeds(1, 3, len(widths)))

    def padding(sampler):
        sampler.set_epoch(3)
        padded = used = 0
        for keys in sampler:
            batch = augmented[[i for i, _ in keys]]
            padded, used = padded + len(keys) * batch.max(), used + batch.sum()
        return 1 - used / padded

    grouped = WidthBatchSampler(widths, 16, shuffle=True, seed=1, augmented_width=will_have)
    plain = WidthBatchSampler(widths, 16, shuffle=True, seed=1)
    assert padding(grouped) < padding(plain) / 3


@pytest.mark.slow
@pytest.mark.parametrize("cfg,height", [(STRONG, 64), (AugmentConfig(), 128), (AugmentConfig(prob=1.0), 32)])
def test_the_samplers_widths_are_the_augmenters_out_widths(cfg, height):
    seeds = augmentation_seeds(5, 2, 5000)
    widths = np.random.default_rng(0).choice([1, 8, 37, 100, 640, 1999, 4000], len(seeds))
    drawn = [draw_params(cfg, int(width), height, int(seed)).out_width
             for width, seed in zip(widths, seeds, strict=True)]
    predicted = augmented_widths(cfg, height, widths, seeds)
    assert predicted.tolist() == drawn and (predicted != widths).mean() > 0.5


def test_the_augmenter_gives_the_new_widths_on_the_cpu_as_the_seeds_predict():
    """What the training loop needs without reading the device: each line's width once augmented."""
    lines = ink_lines(8)
    images, widths = pad_batch(lines)
    seeds = [int(seed) for seed in augmentation_seeds(3, 1, 8)]
    seeds[2] = None  # a line without augmentation keeps its width
    augmented, new_widths = BatchAugmenter(STRONG)(images, widths, seeds)
    assert new_widths.device.type == "cpu" and new_widths.dtype == torch.int64
    # nothing is read back from the images' device: on the meta device (no values) it runs the same
    on_meta, meta_widths = BatchAugmenter(STRONG)(images.to("meta"), widths, seeds)
    assert on_meta.shape == augmented.shape and torch.equal(meta_widths, new_widths)
    predicted = augmented_widths(STRONG, 64, widths.numpy(), np.array([seed or 0 for seed in seeds]))
    expected = [int(width) if seed is None else int(p) for width, seed, p in zip(widths, seeds, predicted, strict=True)]
    assert new_widths.tolist() == expected and new_widths.tolist() != widths.tolist()


def test_prob_zero_turns_augmentation_off_and_training_batches_carry_no_seeds():
    data = DataConfig(source="synthetic", height=32, batch_size=4, num_workers=0, augment=AugmentConfig(prob=0.0),
                      synthetic=SyntheticConfig(train=8, max_words=2))
    assert build_augmenter(data) is None
    assert isinstance(build_augmenter(dataclasses.replace(data, augment=STRONG)), BatchAugmenter)
    records = load_records(data, "train")
    vocab = Vocab.from_texts(records.texts)
    for augment, seeded in ((AugmentConfig(prob=0.0), False), (STRONG, True)):
        cfg = dataclasses.replace(data, augment=augment)
        loader = build_loader(cfg, build_dataset(cfg, records, vocab, True), True, seed=1)
        loader.batch_sampler.set_epoch(1)
        seeds = [seed for batch in loader.batch_sampler for _, seed in batch]
        assert len(seeds) == 8 and all((seed is not None) == seeded for seed in seeds)


def test_augmentation_seeds_depend_on_the_seed_epoch_and_index_only():
    seeds = augmentation_seeds(1, 3, 100_000)
    assert seeds.dtype == np.int64 and seeds.min() >= 0  # so below 2**63
    assert np.array_equal(seeds, augmentation_seeds(1, 3, 100_000))
    assert np.array_equal(seeds[:10], augmentation_seeds(1, 3, 10))  # whatever the split's size
    assert len(np.unique(seeds)) == len(seeds)
    for other in (augmentation_seeds(1, 4, 100_000), augmentation_seeds(2, 3, 100_000)):
        assert not np.isin(seeds, other).any()
    for seed in [*seeds[:1000], seeds.max(), seeds.min()]:
        torch.Generator().manual_seed(int(seed))


def test_each_warp_op_fires_at_its_probability_and_draws_in_its_range():
    cfg, seeds = AugmentConfig(prob=0.3, shear=0.4, rotation=2.0, scale=0.2), augmentation_seeds(0, 1, 20_000)
    warps = draw_warps(cfg, 64, seeds)
    fired = {"shear": warps.shear != 0, "rotation": warps.angle != 0, "scale": warps.scale_x != 1,
             "distortion": warps.distort != 0}
    for name, fires in fired.items():
        assert abs(fires.mean() - cfg.prob) < 0.02, name  # 6 standard deviations
    assert abs((fired["shear"] & fired["scale"]).mean() - cfg.prob**2) < 0.015  # independent draws
    assert np.array_equal(warps.scale_y != 1, fired["scale"])
    assert np.abs(warps.shear).max() <= 0.4 and np.abs(np.degrees(warps.angle)).max() <= 2.0
    assert 0.8 <= warps.scale_x.min() and warps.scale_x.max() <= 1.2
    assert 0.8 <= warps.scale_y.min() and warps.scale_y.max() <= 1.0
    assert abs(warps.shear[fired["shear"]].mean()) < 0.02  # centred
    assert set(warps.distort.tolist()) == {0.0, 3.0}


def test_prob_zero_is_the_identity_everywhere():
    cfg, seeds = AugmentConfig(prob=0.0), augmentation_seeds(0, 1, 20_000)
    widths = np.random.default_rng(0).integers(1, 3000, len(seeds))
    assert draw_warps(cfg, 64, seeds).identity().all()
    assert np.array_equal(augmented_widths(cfg, 64, widths, seeds), widths)
    for seed in seeds[:200]:
        assert draw_params(cfg, 500, 64, int(seed)) == draw_params(cfg, 500, 64, None)


def test_an_epochs_keys_are_the_same_for_any_sampler_and_any_number_of_ranks():
    widths = np.random.default_rng(1).integers(100, 3000, 1000)
    will_have = functools.partial(augmented_widths, STRONG, 64)

    def keys(rank, world):
        sampler = WidthBatchSampler(widths, 16, shuffle=True, seed=4, augmented_width=will_have, rank=rank,
                                    world_size=world)
        sampler.set_epoch(2)
        return list(sampler)

    single = keys(0, 1)
    assert single == keys(0, 1)
    assert all(type(i) is int and type(seed) is int for batch in single for i, seed in batch)
    expected = {(i, int(seed)) for i, seed in enumerate(augmentation_seeds(4, 2, len(widths)))}
    assert {key for batch in single for key in batch} == expected
    shards = [keys(rank, 3) for rank in range(3)]
    union = [key for shard in shards for batch in shard for key in batch]
    assert len(union) == len(widths) and set(union) == expected
