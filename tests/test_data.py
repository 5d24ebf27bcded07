import time

import numpy as np
import pytest
import torch
from PIL import Image

from crnn.benchmark import batches_for
from crnn.config import load_config
from crnn.data import Preprocess, Vocab, build_dataset, build_loader, load_records, make_sample
from crnn.data.check import check_records
from crnn.data.collate import LineDataset, collate, ctc_min_frames
from crnn.data.images import decode_image, image_size
from crnn.data.sources import FolderRecords, hub_records, parquet_records
from crnn.errors import DataError


def test_folder_source_reads_gt_and_reports_bad_lines(folder_split):
    folder, texts = folder_split()
    gt = folder / "gt.tsv"
    with open(gt, "ab") as stream:
        stream.write(b"line0.png\t   \n")  # whitespace-only transcription
        stream.write(b"no tab here\n")
        stream.write(b"missing.png\tghost\n")
    (folder / "orphan.png").write_bytes((folder / "line0.png").read_bytes())
    records = FolderRecords(str(folder), "data.train")
    assert records.texts == texts  # every good line kept, in order
    problems = "\n".join(records.problems)
    assert f"{gt} line 7: empty transcription" in problems
    assert f"{gt} line 8: no TAB" in problems
    assert f"{gt} line 9: image file {folder / 'missing.png'} not found" in problems
    assert "orphan.png: image has no entry in gt.tsv" in problems
    width, height = records.sizes()[1]
    assert height == 32 and width == 12 * len(texts[1]) + 16
    assert records.image(0).mode == "L"


def test_folder_source_errors_name_the_key(tmp_path):
    with pytest.raises(DataError, match="data.validation: folder not found"):
        load_records(load_config(None, ["data.source=folder", f"data.validation={tmp_path}/x"]).data, "validation")
    with pytest.raises(DataError, match="has no gt.tsv"):
        FolderRecords(str(tmp_path), "data.train")
    with pytest.raises(DataError, match=r"'data.test' is not set"):
        load_records(load_config(None, ["data.source=parquet"]).data, "test")


def test_parquet_source_written_through_datasets(parquet_split):
    path, texts = parquet_split()
    records = load_records(load_config(None, ["data.source=parquet", f"data.train={path}"]).data, "train")
    assert records.texts == texts
    assert records.sizes()[0] == (12 * 3 + 16, 32)
    image = records.image(2)
    assert image.mode == "L" and image.size == (12 * 7 + 16, 32)
    assert np.asarray(image).min() < 100  # ink survived the round trip


def test_parquet_source_errors(tmp_path, parquet_split):
    with pytest.raises(DataError, match="data.train: no .parquet file found at"):
        parquet_records(str(tmp_path / "nope.parquet"), "data.train")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"], "label": ["a"]}), tmp_path / "wrong.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['image', 'text'\]"):
        parquet_records(str(tmp_path / "wrong.parquet"), "data.train")


def test_hub_source_fails_fast_offline_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        hub_records("Teklia/IAM-line", "train")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "cannot reach the Hugging Face hub" in message and "Teklia/IAM-line" in message
    assert "data.source=parquet" in message and "experiments/synthetic.yaml" in message


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "LA", "1"])
def test_any_image_mode_becomes_grayscale_with_white_paper(tmp_path, mode):
    pixels = np.full((10, 20), 255, np.uint8)
    pixels[3:7, 5:15] = 0
    image = Image.fromarray(pixels, "L")
    if mode == "RGBA":
        image = Image.fromarray(np.stack([pixels] * 3 + [np.where(pixels == 0, 255, 0)], -1).astype(np.uint8), "RGBA")
    elif mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257).convert("I;16")
    else:
        image = image.convert(mode)
    path = tmp_path / "line.png"
    image.save(path)
    gray = np.asarray(decode_image(path, str(path)))
    assert gray.shape == (10, 20)
    assert gray[5, 10] < 50 and gray[0, 0] > 200  # ink dark, paper (or transparency) white


def test_unreadable_and_empty_images_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name, why in (("empty.png", r"empty file \(0 bytes\), not an image"), ("junk.png", "unreadable image")):
        for read in (decode_image, image_size):
            with pytest.raises(DataError, match=rf"{name}: {why}"):
                read(tmp_path / name, str(tmp_path / name))
        with pytest.raises(DataError, match=rf"{name}: {why}"):
            decode_image((tmp_path / name).read_bytes(), str(tmp_path / name))
    with pytest.raises(DataError, match="missing.png: image file not found"):
        decode_image(tmp_path / "missing.png", str(tmp_path / "missing.png"))


def test_collate_pads_right_and_keeps_each_width(folder_split):
    folder, texts = folder_split()
    records = FolderRecords(str(folder), "data.train")
    vocab = Vocab.from_texts(texts)
    dataset = LineDataset(records, vocab, Preprocess(16), "train")
    batch = collate([dataset[(i, None)] for i in (0, 1, 4)])
    expected = [round((12 * len(texts[i]) + 16) * 16 / 32) for i in (0, 1, 4)]
    assert batch.widths.tolist() == expected
    assert batch.images.shape == (3, 1, 16, max(expected))
    assert batch.images[0, :, :, expected[0]:].abs().sum() == 0  # padding is blank paper (0 ink)
    assert batch.target_lengths.tolist() == [len(texts[i]) for i in (0, 1, 4)]
    assert vocab.decode(batch.targets[:3].tolist()) == texts[0]
    assert batch.texts == [texts[0], texts[1], texts[4]]
    kept = batch.select(torch.tensor([True, False, True]))  # as lines too long for their width are dropped
    assert kept.texts == [texts[0], texts[4]] and kept.widths.tolist() == [expected[0], expected[2]]
    assert vocab.decode(kept.targets.tolist()) == texts[0] + texts[4] and kept.images.shape[-1] == max(expected)
    assert torch.equal(kept.images[1], batch.images[2])
    on_meta = batch.to(torch.device("meta")).select(torch.tensor([True, False, True]))  # reads nothing back
    assert on_meta.images.shape == (2, 1, 16, max(expected)) and on_meta.widths.tolist() == kept.widths.tolist()


def test_collate_drops_unreadable_samples_and_says_why(folder_split):
    folder, texts = folder_split()
    (folder / "line2.png").write_bytes(b"broken")
    dataset = LineDataset(FolderRecords(str(folder), "data.train"), Vocab.from_texts(texts), Preprocess(16),
                          "train")
    batch = collate([dataset[(i, None)] for i in range(4)])
    assert len(batch) == 3 and batch.indices == [0, 1, 3]
    assert len(batch.errors) == 1 and "line2.png: unreadable image" in batch.errors[0]


def test_ctc_min_frames_counts_repeats():
    assert ctc_min_frames([1, 2, 3]) == 3
    assert ctc_min_frames([1, 1, 2, 2, 2]) == 8
    assert ctc_min_frames([]) == 0


def test_loader_groups_by_width_and_augments_only_training(folder_split):
    folder, texts = folder_split()
    cfg = load_config(None, ["data.source=folder", f"data.train={folder}", "data.height=16",
                             "data.batch_size=2", "data.num_workers=0"])
    records = load_records(cfg.data, "train")
    vocab = Vocab.from_texts(records.texts)
    train = build_loader(cfg.data, build_dataset(cfg.data, records, vocab, True), True, seed=1)
    evaluation = build_loader(cfg.data, build_dataset(cfg.data, records, vocab, False), False)
    widths = [b.widths.tolist() for b in evaluation]
    assert sorted(sum(widths, [])) == sum(widths, [])  # evaluation batches sorted by width
    assert sorted(i for b in train for i in b.indices) == list(range(len(texts)))
    clean = [b.images for b in build_loader(cfg.data, build_dataset(cfg.data, records, vocab, False), False)]
    again = [b.images for b in evaluation]
    assert all(torch.equal(a, b) for a, b in zip(clean, again, strict=True))  # no augmentation at evaluation


def test_one_rule_for_characters_outside_the_vocab_by_purpose():
    vocab, preprocess, image = Vocab(list(" ab")), Preprocess(16), Image.new("L", (40, 32), 255)
    space, a, b = vocab.index[" "], vocab.index["a"], vocab.index["b"]
    train = make_sample(0, image, "ab c", vocab, preprocess, "train")
    assert train.text == "ab c" and train.target == (a, b, space) and train.image.shape == (1, 16, 20)
    evaluation = make_sample(1, image, "ab c", vocab, preprocess, "evaluate")
    assert evaluation.text == "ab c" and evaluation.target == train.target  # the c counts as an error
    left_out = make_sample(2, image, "ccc", vocab, preprocess, "train", "page.xml line 7")
    assert left_out.image is None and "page.xml line 7: none of the characters of 'ccc'" in left_out.error
    kept = make_sample(3, image, "ccc", vocab, preprocess, "evaluate")
    assert kept.target == () and kept.text == "ccc" and kept.image is not None
    prediction = make_sample(4, image, "ab", vocab, preprocess, "predict")
    assert prediction.text == "" and prediction.target == ()
    with pytest.raises(ValueError, match="purpose must be one of train, evaluate, predict"):
        make_sample(5, image, "ab", vocab, preprocess, "fine-tune")


def test_loader_check_and_benchmark_make_the_same_samples(folder_split):
    folder, texts = folder_split(texts=("abc", "hello world", "dog"))
    cfg = load_config(None, ["data.source=folder", f"data.train={folder}", "data.height=16", "data.num_workers=0",
                             "model.channels=[8]", "model.blocks=[1]", "model.strides=[[2,2]]"])
    records = load_records(cfg.data, "train")
    vocab = Vocab(list("abcdeglo"))  # no space, no h, r, w: "hello world" keeps only e, l, l, o, o, l, d
    dataset = build_dataset(cfg.data, records, vocab, train=False)
    expected = make_sample(1, records.image(1), texts[1], vocab, Preprocess.from_config(cfg.data), "evaluate")
    sample = dataset[(1, None)]
    assert sample._replace(image=None) == expected._replace(image=None)
    assert torch.equal(sample.image, expected.image)
    assert vocab.decode(expected.target) == "elloold"
    problems = check_records(records, cfg.data, cfg.model, vocab, "evaluate")
    assert [p for p in problems if "not in the vocab" in p] == [
        "line1.png: characters ' hrw' are not in the vocab (counted as errors)"]
    lines = [(records.image(i), text) for i, text in enumerate(texts)]
    batches = batches_for(cfg, lines, vocab, batch_size=3)  # used to raise on the unknown characters
    assert sorted(batches[0].texts) == sorted(texts) and batches[0].target_lengths.sum() == 3 + 7 + 3
