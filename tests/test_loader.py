"""The DataLoader side of the loop: decode once (a cache shared by the workers), clean stops."""

import logging
import multiprocessing
import textwrap

import pytest
import torch

from crnn.config import load_config
from crnn.data import Vocab, build_dataset, build_loader, load_records, shut_down
from crnn.data.cache import LineCache
from crnn.trainer import fit
from tests.helpers import TINY, run_python, synthetic_folder


def lines_by_index(loader, epoch):
    loader.batch_sampler.set_epoch(epoch)
    found, errors = {}, []
    for batch in loader:
        errors += batch.errors
        for index, image, width in zip(batch.indices, batch.images, batch.widths, strict=True):
            found[index] = image[..., : int(width)].clone()
    return found, errors


def test_lines_are_decoded_once_into_memory_that_every_worker_shares(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 12)
    cfg = load_config(TINY, ["data.source=folder", f"data.train={lines}", "data.num_workers=2", "data.batch_size=3"])
    records = load_records(cfg.data, "train")
    dataset = build_dataset(cfg.data, records, Vocab.from_texts(records.texts), True, cache_bytes=10**8)
    loader = build_loader(cfg.data, dataset, True, seed=0)
    try:
        first, errors = lines_by_index(loader, 1)
        assert sorted(first) == list(range(12)) and not errors
        assert dataset.cache.lines_filled == 12  # filled by the workers, seen by this process
        for png in lines.glob("*.png"):
            png.unlink()  # later epochs must not need the files
        second, errors = lines_by_index(loader, 2)  # other batches, so other workers, read each line
        assert not errors, errors[:2]
        assert all(torch.equal(first[i], second[i]) for i in range(12))
    finally:
        shut_down(loader)


def test_the_cache_keeps_to_its_budget_and_skips_lines_of_unexpected_size():
    cache = LineCache([10, 20, 30, 40], height=2, budget_bytes=2 * (10 + 20 + 30) + 5)
    assert cache.slots == 3 and cache.nbytes == 120
    cache.put(0, torch.ones(1, 2, 10, dtype=torch.uint8))
    cache.put(1, torch.ones(1, 2, 21, dtype=torch.uint8))  # not the size its header promised
    cache.put(3, torch.ones(1, 2, 40, dtype=torch.uint8))  # over the budget
    assert cache.get(0).shape == (1, 2, 10) and cache.get(1) is None and cache.get(3) is None
    assert cache.lines_filled == 1 and "3 of 4 lines" in cache.describe() and "0 MB" in cache.describe()


def test_the_cache_budget_goes_to_the_validation_split_first(tmp_path, caplog):
    from crnn.distributed import DistInfo
    from crnn.runlog import RunLogger
    from crnn.trainer import build_loaders

    train, validation = synthetic_folder(tmp_path / "train", 40), synthetic_folder(tmp_path / "val", 10, seed=1)
    overrides = ["data.source=folder", f"data.train={train}", f"data.validation={validation}", "data.num_workers=0"]
    cfg = load_config(TINY, overrides)
    records = load_records(cfg.data, "train"), load_records(cfg.data, "validation")
    vocab = Vocab.from_texts(records[0].texts)
    val_bytes = int(sum(build_dataset(cfg.data, records[1], vocab, False).widths)) * cfg.data.height
    # a budget that holds the validation split and a few training lines, not the whole training split
    cfg = load_config(TINY, [*overrides, f"data.cache_mb={(val_bytes + 5 * 32 * 300) / 2**20}"])
    with caplog.at_level(logging.INFO, logger="crnn"):
        loaders = build_loaders(cfg, DistInfo(0, 0, 1, torch.device("cpu")), RunLogger(tmp_path, True), *records, vocab)
    train_cache, val_cache = (loader.dataset.cache for loader in loaders)
    assert val_cache.slots == 10 and 0 < train_cache.slots < 40
    assert "validation: decoded lines cached for later epochs: 10 of 10 lines (100%)" in caplog.text
    assert f"train: decoded lines cached for later epochs: {train_cache.slots} of 40 lines" in caplog.text
    for loader in loaders:
        shut_down(loader)


@pytest.mark.slow
def test_an_abandoned_loader_with_persistent_workers_exits_at_once(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 24)
    script = textwrap.dedent(f"""
        from crnn.config import load_config
        from crnn.data import Vocab, build_dataset, build_loader, load_records
        cfg = load_config({str(TINY)!r}, ["data.source=folder", "data.train={lines}", "data.num_workers=2",
                                           "data.batch_size=2"])
        records = load_records(cfg.data, "train")
        loader = build_loader(cfg.data, build_dataset(cfg.data, records, Vocab.from_texts(records.texts), True,
                                                      10**7), True)
        loader.batch_sampler.set_epoch(1)
        next(iter(loader))  # one batch of twelve, then leave without a word
        print("left")
        """)
    result = run_python("-c", script, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "left", result.stderr[-2000:]
    assert "Aborted" not in result.stderr and "terminate called" not in result.stderr


@pytest.mark.slow
def test_a_run_stops_its_loader_workers_when_it_ends(tmp_path):
    before = set(multiprocessing.active_children())  # e.g. decoder pools of earlier tests
    fit(load_config(TINY, ["data.num_workers=2", f"train.output_dir={tmp_path / 'run'}"]))
    assert set(multiprocessing.active_children()) <= before
