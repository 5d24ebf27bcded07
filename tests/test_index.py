"""Data indexes (crnn.data.index): built once, reused, rebuilt when the data changes or the index is
damaged; records read through them give the same lines as the files; the decode cache's split."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crnn.data.images import decode_image, image_size
from crnn.data.index import header_size, index_path
from crnn.data.samples import Preprocess
from crnn.data.sources import FolderRecords, dataset_records, parquet_records, parquet_texts
from tests.helpers import draw_line

ROOT = Path(__file__).resolve().parent.parent


def write_parquet(path: Path, texts: list[str], image_format: str = "PNG", widths: list[int] | None = None) -> Path:
    """A parquet file in the Teklia/IAM-line schema, written with pyarrow alone."""
    cells = []
    for i, text in enumerate(texts):
        image = draw_line(text)
        if widths:
            image = image.resize((widths[i], image.height))
        stream = io.BytesIO()
        image.save(stream, format=image_format)
        cells.append({"bytes": stream.getvalue(), "path": f"{i}.{image_format.lower()}"})
    pq.write_table(pa.table({"image": cells, "text": texts}), path)
    return path


def index_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.arrow"))


def test_parquet_records_read_the_same_lines_as_the_file_and_hold_no_copy_of_the_images(tmp_path):
    texts = ["first line", "  ", "second", "third one", "fourth"]
    path = write_parquet(tmp_path / "lines.parquet", texts)
    allocated = pa.total_allocated_bytes()
    records = parquet_records(str(path), "data.train", str(tmp_path / "index"))
    # the images stay in the memory-mapped index: nothing of their size is allocated
    assert pa.total_allocated_bytes() - allocated < 1024
    assert list(records.texts) == ["first line", "second", "third one", "fourth"]
    assert records.texts[-1] == "fourth" and records.texts[1:3] == ["second", "third one"]
    assert list(records.ids) == [f"{path}:{row}" for row in (0, 2, 3, 4)]
    assert records.problems == [f"{path} row 1: empty transcription, line skipped"]
    table = pq.read_table(path)
    for index, row in enumerate((0, 2, 3, 4)):
        cell = table.column("image")[row].as_py()["bytes"]
        assert records.image(index).tobytes() == decode_image(cell, "x").tobytes()
        assert records.sizes()[index] == image_size(cell, "x")
    assert records.size_array().shape == (4, 2)


def test_an_index_is_built_once_and_reused(tmp_path, caplog):
    path = write_parquet(tmp_path / "lines.parquet", ["abc", "de"])
    root = tmp_path / "index"
    with caplog.at_level(logging.INFO, logger="crnn"):
        parquet_records(str(path), "data.train", str(root))
        [index] = index_files(root)
        stamp = index.stat().st_mtime_ns
        again = parquet_records(str(path), "data.train", str(root))
    assert [r.message.split(" in ")[0] for r in caplog.records if "index" in r.message] == \
        ["data.train: index built", f"data.train: index reused ({index})"]
    assert index_files(root) == [index] and index.stat().st_mtime_ns == stamp
    assert list(again.texts) == ["abc", "de"]


def test_an_index_is_rebuilt_when_its_file_changes(tmp_path, caplog):
    path = write_parquet(tmp_path / "lines.parquet", ["abc", "de"])
    root = tmp_path / "index"
    parquet_records(str(path), "data.train", str(root))
    write_parquet(path, ["new text", "other", "third"], widths=[300, 200, 100])
    with caplog.at_level(logging.INFO, logger="crnn"):
        records = parquet_records(str(path), "data.train", str(root))
    assert "built from another version of the data" in caplog.text
    assert list(records.texts) == ["new text", "other", "third"]
    assert [width for width, _ in records.sizes()] == [300, 200, 100]
    assert len(index_files(root)) == 1  # the new index replaced the old one


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_index_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    path = write_parquet(tmp_path / "lines.parquet", ["abc", "de"])
    root = tmp_path / "index"
    parquet_records(str(path), "data.train", str(root))
    [index] = index_files(root)
    content = index.read_bytes()
    index.write_bytes({"truncated": content[: len(content) // 2], "garbage": os.urandom(len(content)),
                       "empty": b""}[damage])
    with caplog.at_level(logging.INFO, logger="crnn"):
        records = parquet_records(str(path), "data.train", str(root))
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"index {index} is damaged" in warnings[0] and "building it again" in warnings[0]
    assert list(records.texts) == ["abc", "de"] and index.read_bytes()[:6] == b"ARROW1"


def test_an_index_folder_that_cannot_be_written_reads_without_an_index(tmp_path, caplog):
    path = write_parquet(tmp_path / "lines.parquet", ["abc", "de"])
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="crnn"):
        records = parquet_records(str(path), "data.train", str(blocked / "index"))
    assert "cannot write its index" in caplog.text and "data.index_dir" in caplog.text
    assert list(records.texts) == ["abc", "de"] and records.image(1).size == draw_line("de").size


BUILD_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from crnn.data.sources import parquet_records
parquet_records(sys.argv[1], "data.train", sys.argv[2])
"""


@pytest.mark.slow
def test_processes_started_together_build_the_index_once(tmp_path):
    """As the ranks of a torchrun job: one builds, the others wait and read it."""
    path = write_parquet(tmp_path / "lines.parquet", [f"line {i}" for i in range(400)])
    root = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(path), str(root)], env=env,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    logs = [process.communicate(timeout=120)[1] for process in processes]
    assert all(process.returncode == 0 for process in processes), logs
    assert sum("index built" in log for log in logs) == 1
    assert sum("index reused" in log for log in logs) == 2
    assert len(index_files(root)) == 1


def test_a_folder_of_parquet_files_and_its_texts(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    write_parquet(folder / "a.parquet", ["one", "two"])
    write_parquet(folder / "b.parquet", ["three", ""])
    records = parquet_records(str(folder), "data.train", str(tmp_path / "index"))
    assert list(records.texts) == ["one", "two", "three"] and len(index_files(tmp_path / "index")) == 2
    assert records.image(2).size == draw_line("three").size
    assert parquet_texts(str(folder), "data.train") == ["one", "two", "three"]


def test_folder_sizes_come_from_an_index_rebuilt_when_an_image_changes(folder_split, tmp_path, caplog):
    folder, texts = folder_split()
    root = tmp_path / "index"
    first = FolderRecords(str(folder), "data.train", str(root))
    assert first.sizes() == [draw_line(text).size for text in texts]
    with caplog.at_level(logging.INFO, logger="crnn"):
        assert FolderRecords(str(folder), "data.train", str(root)).sizes() == first.sizes()
    assert "index reused" in caplog.text
    draw_line("a much longer line than before").save(folder / "line0.png")
    changed = FolderRecords(str(folder), "data.train", str(root))
    assert changed.sizes()[0] == draw_line("a much longer line than before").size
    assert changed.sizes()[1:] == first.sizes()[1:] and len(index_files(root)) == 1


def test_a_hub_style_dataset_indexes_its_sizes_by_its_cache_files(tmp_path, caplog):
    import datasets

    path = write_parquet(tmp_path / "lines.parquet", ["abc", "hello there"])
    dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf"))
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    assert dataset.cache_files
    root = tmp_path / "index"
    with caplog.at_level(logging.INFO, logger="crnn"):
        first = dataset_records(dataset, "hub:train", str(root))
        allocated = pa.total_allocated_bytes()
        second = dataset_records(dataset, "hub:train", str(root))
    assert pa.total_allocated_bytes() - allocated < 1024  # the dataset's own memory-mapped files are read
    assert caplog.text.count("index built") == 1 and caplog.text.count("index reused") == 1
    assert first.sizes() == second.sizes() == [draw_line("abc").size, draw_line("hello there").size]
    assert index_path(root, "hub", "hub:train").is_file()


@pytest.mark.parametrize("image_format, options", [
    ("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("JPEG", {"exif": b"Exif\0\0" + b"x" * 3000}),
    ("WEBP", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {})])
def test_image_sizes_read_from_headers_agree_with_pillow(image_format, options):
    for size in ((1, 1), (37, 64), (4000, 128), (16383, 3)):
        stream = io.BytesIO()
        Image.new("L", size, 200).convert("RGB").save(stream, format=image_format, **options)
        data = stream.getvalue()
        found = header_size(data)
        assert found is None if image_format in ("GIF", "BMP") else found == size
        assert image_size(data, "x") == size


def test_scaled_widths_are_the_widths_the_lines_are_resized_to():
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(1, 3000, 60), rng.integers(1, 200, 60)], axis=1)
    sizes[:5, 1] = 400  # scaled down
    for preprocess in (Preprocess(64), Preprocess(128, max_width=1000)):
        resized = [preprocess(Image.new("L", (int(w), int(h)), 255)).shape[-1] for w, h in sizes]
        assert preprocess.scaled_widths(sizes).tolist() == resized
        assert max(resized) == preprocess.max_width
        assert preprocess.scaled_widths(np.array([[0, 0]])).tolist() == [preprocess.max_width]  # unknown: widest
