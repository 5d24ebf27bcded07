"""A user's data that the sources used to turn into a traceback or quietly lost lines: an empty
parquet, raw image bytes, a damaged index, a gt.tsv that is not UTF-8 or starts with a BOM, the
temporary file a killed index build leaves behind, a page whose size is not a number."""

from __future__ import annotations

import io
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crnn.data.sources import FolderRecords, parquet_records
from crnn.data.xml_pages import read_page
from crnn.errors import DataError
from tests.helpers import draw_line


def test_an_empty_parquet_split_is_an_error_naming_the_file(parquet_split, tmp_path):
    path, _ = parquet_split()
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), empty)
    with pytest.raises(DataError, match=f"data.test: {empty} has no lines"):
        parquet_records(str(empty), "data.test", str(tmp_path / "index"))


def test_an_image_column_of_raw_bytes_is_read_as_the_images(tmp_path):
    texts, images = ["abc", "hello there"], []
    for text in texts:
        stream = io.BytesIO()
        draw_line(text).save(stream, format="PNG")
        images.append(stream.getvalue())
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"image": pa.array(images + [b""], pa.binary()), "text": texts + ["gone"]}), path)
    records = parquet_records(str(path), "data.train", str(tmp_path / "index"))
    assert list(records.texts) == texts + ["gone"]
    assert records.sizes()[:2] == [(12 * 3 + 16, 32), (12 * 11 + 16, 32)]
    assert records.image(1).size == (12 * 11 + 16, 32) and records.image(1).mode == "L"
    assert records.problems == ["data.train:2: empty file (0 bytes), not an image"]
    with pytest.raises(DataError, match=f"{path}:2: empty file"):
        records.image(2)
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"image": ["a.png"], "text": ["abc"]}), strings)
    with pytest.raises(DataError, match=f"data.train: column 'image' of {strings} holds string"):
        parquet_records(str(strings), "data.train", str(tmp_path / "index"))


@pytest.mark.parametrize("damage", [b"jello", b"h\xffllo"])  # another text; bytes that are not UTF-8
def test_an_index_damaged_in_the_middle_is_rebuilt_with_a_warning(parquet_split, tmp_path, caplog, damage):
    path, texts = parquet_split()
    root = tmp_path / "index"
    parquet_records(str(path), "data.train", str(root))
    [index] = root.glob("*.arrow")
    content = index.read_bytes()
    assert content.count(b"hello") == 1
    index.write_bytes(content.replace(b"hello", damage))
    with caplog.at_level(logging.INFO, logger="crnn"):
        records = parquet_records(str(path), "data.train", str(root))
        assert list(records.texts) == texts
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"index {index} is damaged" in warnings[0], warnings
    assert index.read_bytes() == content  # rebuilt as it was


def test_a_gt_tsv_that_is_not_utf8_is_one_error_for_the_file(folder_split):
    folder, _ = folder_split(texts=("abc", "café", "été", "dog"))
    gt = folder / "gt.tsv"
    gt.write_bytes(gt.read_text(encoding="utf-8").encode("latin-1"))
    with pytest.raises(DataError) as raised:
        FolderRecords(str(folder), "data.train")
    message = str(raised.value)
    assert message.startswith(f"{gt} line 2: not valid UTF-8 (byte 0xe9 at byte 14 of the line)"), message
    assert "save gt.tsv as UTF-8" in message


def test_a_gt_tsv_starting_with_a_bom_keeps_its_first_line(folder_split):
    folder, texts = folder_split()
    gt = folder / "gt.tsv"
    gt.write_bytes(b"\xef\xbb\xbf" + gt.read_bytes())
    records = FolderRecords(str(folder), "data.train")
    assert records.texts == texts and records.problems == []


def test_a_build_removes_the_temporary_file_a_killed_build_left(parquet_split, tmp_path, caplog):
    path, texts = parquet_split()
    root = tmp_path / "index"
    parquet_records(str(path), "data.train", str(root))
    [index] = root.glob("*.arrow")
    index.unlink()
    stale = root / f".{index.name}.4194305.tmp"  # atomic_write's name, with the pid of a killed process
    stale.write_bytes(path.read_bytes())
    records = parquet_records(str(path), "data.train", str(root))
    assert list(records.texts) == texts and index.is_file()
    assert not stale.exists() and not list(root.glob("*.tmp"))


@pytest.mark.parametrize("width", ["abc", "nan", "-5"])
def test_a_page_whose_size_is_not_a_number_is_an_error_naming_the_file(tmp_path, width):
    page = tmp_path / "page.xml"
    page.write_text('<alto xmlns="http://www.loc.gov/standards/alto/ns-v4#"><Layout>'
                    f'<Page WIDTH="{width}" HEIGHT="100"/></Layout></alto>', encoding="utf-8")
    with pytest.raises(DataError, match=f"{page}: the page's size .* is not a pair of"):
        read_page(page)
