"""`LineRecords` (crnn/data/records.py) from every `data.source`: hub dataset, parquet files, image
folder, synthetic, page XML (xml_pages.py)."""

from __future__ import annotations

import codecs
import glob
import os
import random
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

import crnn.data.synthetic as synthetic
from crnn.config import SPLITS, DataConfig, SourceConfig, split_sources
from crnn.data.images import IMAGE_SUFFIXES, decode_image, image_size
from crnn.data.index import (
    check_columns,
    digest,
    image_sources,
    index_path,
    index_root,
    parquet_index,
    size_array,
    size_columns,
    size_index,
)
from crnn.data.records import LineRecords, SourceRecords, normalize_texts
from crnn.data.xml_pages import XmlRecords
from crnn.errors import DataError


class ArrowRecords(LineRecords):
    """Rows of an Arrow table in the Teklia/IAM-line schema: `image` {bytes, path} (or the image's
    bytes alone) and `text`. The table may be memory-mapped (`crnn.data.index`): the records hold
    per line only its row number. `sizes`: `width`, `height` and `error` per row of `table`."""

    def __init__(self, table: pa.Table, name: str, sizes: pa.Table, base_dir: Path | None = None):
        check_columns(table.column_names, name)
        texts = table.column("text")
        if texts.type not in (pa.string(), pa.large_string(), pa.null()):
            raise DataError(f"{name}: column 'text' holds {texts.type}, not text (the Teklia/IAM-line schema "
                            f"has strings)")
        self.name, self.base_dir, self.images = name, base_dir, table.column("image")
        self._size_table, self._sizes = sizes, None
        usable = _usable_texts(texts)
        self.rows = np.flatnonzero(usable)
        self.problems = [f"{name} row {row}: empty transcription, line skipped" for row in np.flatnonzero(~usable)]
        self.texts, self.ids = RowView(texts, self.rows), RowIds(name, self.rows)

    def image(self, index: int) -> Image.Image:
        cell = self.images[int(self.rows[index])].as_py()  # {bytes, path}, or the image's bytes alone
        if isinstance(cell, dict):  # its bytes, else its file (`/` keeps an absolute path as it is)
            cell = cell.get("bytes") or cell.get("path") and (self.base_dir or Path()) / cell["path"]
        if not isinstance(cell, (bytes, Path)):
            raise DataError(f"{self.ids[index]}: the image cell holds neither bytes nor a path")
        return decode_image(cell, self.ids[index])

    def size_array(self) -> np.ndarray:
        if self._sizes is None:
            sizes, errors = size_array(self._size_table), self._size_table.column("error")
            every_row = len(self.rows) == len(sizes)  # rows ascend without repeats: then they are all rows
            self._sizes = sizes if every_row else sizes[self.rows]
            failed = np.flatnonzero(errors.is_valid().to_numpy(zero_copy_only=False))  # unread headers
            self.problems += RowView(errors, failed[np.isin(failed, self.rows, assume_unique=True)])[:]
        return self._sizes


def _usable_texts(texts: pa.ChunkedArray) -> np.ndarray:
    """True for each row whose transcription is not empty nor only white space."""
    if pa.types.is_null(texts.type):
        return np.zeros(len(texts), dtype=bool)
    usable = [pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk)), 0), False)
              .to_numpy(zero_copy_only=False) for chunk in texts.chunks]  # a chunk at a time: no copy of all texts
    return np.concatenate(usable).astype(bool) if usable else np.zeros(0, dtype=bool)


class _LazyList(Sequence):
    """A read-only list whose items are made when asked for; equal to any sequence of the same items."""

    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


class RowView(_LazyList):
    """The values of an Arrow column at `rows`. Values are taken chunk by chunk: a take over the
    whole chunked column would first join its chunks (a copy of the column)."""

    def __init__(self, column: pa.ChunkedArray, rows: np.ndarray):
        self.column, self.rows = column, rows
        self.starts = np.cumsum([0, *(len(chunk) for chunk in column.chunks)])

    def __getitem__(self, index):
        if not isinstance(index, slice):
            return self.column[int(self.rows[index])].as_py()
        rows = self.rows[index]
        chunks = np.searchsorted(self.starts, rows, side="right") - 1
        values = np.empty(len(rows), dtype=object)
        for chunk in np.unique(chunks):
            where = chunks == chunk
            taken = self.column.chunk(int(chunk)).take(pa.array(rows[where] - self.starts[chunk]))
            values[where] = taken.to_numpy(zero_copy_only=False)
        return values.tolist()

    def __iter__(self) -> Iterator:
        for start in range(0, len(self.rows), 65536):
            yield from self[start:start + 65536]


class RowIds(_LazyList):
    """`name:row` for each line, made when asked for."""

    def __init__(self, name: str, rows: np.ndarray):
        self.name, self.rows = name, rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [f"{self.name}:{row}" for row in self.rows[index]]
        return f"{self.name}:{self.rows[index]}"


def split_files(spec: str, key: str, suffix: str) -> list[Path]:
    """The files of a split (`data.train` etc.): a folder of *`suffix`, a single file, or a glob."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob(f"*{suffix}"))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(match) for match in glob.glob(str(path)) if match.endswith(suffix))
    if not files:
        raise DataError(f"{key}: no {suffix} file found at {spec} (a file, a folder of *{suffix} or a glob)")
    return files


def parquet_records(path_text: str, key: str, index_dir: str = "") -> ArrowRecords:
    """A local parquet file (or a folder of them) in the Teklia/IAM-line schema, read through its
    index (`crnn.data.index`: an Arrow copy built once, memory-mapped)."""
    files = split_files(path_text, key, ".parquet")
    root = index_root(index_dir)
    tables = [parquet_index(file, root, f"{key} ({file})" if len(files) > 1 else key).replace_schema_metadata(None)
              for file in files]
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowException as err:
        raise DataError(f"{key}: the parquet files of {path_text} do not share one schema: {err}") from None
    if not table.num_rows:
        raise DataError(f"{key}: {path_text} has no lines (0 rows in {len(files)} parquet file(s)); give "
                        f"a split with lines")
    return ArrowRecords(table, str(path_text), table.select(["width", "height", "error"]), files[0].parent)


def parquet_texts(path_text: str, key: str) -> list[str]:
    """The transcriptions of a parquet file (or folder), without their images; empty ones skipped."""
    import pyarrow.parquet as pq

    texts = []
    for file in split_files(path_text, key, ".parquet"):
        try:
            column = pq.read_table(file, columns=["text"]).column("text")
        except (pa.ArrowException, OSError, KeyError) as err:
            raise DataError(f"{key}: cannot read the 'text' column of parquet {file}: {err}") from None
        texts += column.filter(pa.array(_usable_texts(column))).to_pylist()
    return texts


def hub_records(name: str, split: str, index_dir: str = "") -> ArrowRecords:
    """A split of a Hugging Face hub dataset; fails within seconds, with what to do, when offline."""
    if not any(os.environ.get(var, "") in ("1", "true", "TRUE") for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "huggingface.co", port), timeout=5.0).close()
        except OSError as err:
            raise DataError(
                f"cannot reach the Hugging Face hub at {endpoint} ({err}) to load dataset '{name}' "
                f"(data.source=hf). Offline, train on local data instead: data.source=parquet "
                f"data.train=PATH data.validation=PATH (files in the {name} schema: image, text), "
                f"data.source=folder (line images + gt.tsv), or the synthetic demo: python tools/train.py "
                f"--cfg experiments/synthetic.yaml. If '{name}' is already in your local cache, set "
                f"HF_HUB_OFFLINE=1.") from None
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub raises many types; all mean "cannot get this split"
        raise DataError(f"cannot load split '{split}' of hub dataset '{name}': {err}") from None
    return dataset_records(dataset.cast_column("image", datasets.Image(decode=False)), f"{name}:{split}", index_dir)


def dataset_records(dataset, name: str, index_dir: str = "") -> ArrowRecords:
    """A `datasets.Dataset` (memory-mapped Arrow files in its cache) as records; its lines' sizes
    are indexed once per version of those files."""
    table = dataset.with_format("arrow")[:]
    files = [Path(entry["filename"]) for entry in dataset.cache_files]

    def sources() -> tuple[list, Sequence[str]]:
        images = [source for chunk in table.column("image").chunks for source in image_sources(chunk, None)]
        return images, RowIds(name, np.arange(len(table)))

    if not files:  # a dataset held in memory: nothing to key an index on, its headers read now
        return ArrowRecords(table, name, sizes=pa.table(size_columns(*sources()), names=["width", "height", "error"]))
    identity = {"source": digest(f"{file.resolve()}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in files),
                "rows": len(table)}
    sizes = size_index(index_path(index_root(index_dir), "hub", name), identity, sources, name)
    return ArrowRecords(table, name, sizes=sizes)


class FolderRecords(LineRecords):
    """A folder of line images with `gt.tsv`: `file name<TAB>transcription` per line, UTF-8. Lines
    that cannot be used and images no usable line names (and what is wrong with them) are problems."""

    def __init__(self, folder_text: str, key: str, index_dir: str = ""):
        folder = Path(folder_text).expanduser()
        gt_path = folder / "gt.tsv"
        if not folder.is_dir():
            raise DataError(f"{key}: folder not found: {folder}")
        if not gt_path.is_file():
            raise DataError(f"{key}: {folder} has no gt.tsv (file name<TAB>transcription per line)")
        self.name, self.problems, self.texts, self.ids = str(folder), [], [], []
        self.folder, self.index_dir, self._sizes = folder, index_dir, None
        named: dict[str, int] = {}  # file name -> the gt.tsv line naming it, used or skipped
        self._stamps: list[str] = []  # each used image's name, size and modification time: the index's key
        for number, line in enumerate(_utf8_lines(gt_path), start=1):
            where = f"{gt_path} line {number}"
            name, tab, text = line.partition("\t")
            if not line.strip():
                continue
            if not tab:
                self.problems.append(f"{where}: no TAB between file name and transcription, skipped")
                continue
            named.setdefault(name, number)
            if not text.strip():
                self.problems.append(f"{where}: empty transcription, line skipped")
            elif not (folder / name).is_file():
                self.problems.append(f"{where}: image file {folder / name} not found, skipped")
            else:
                stat = (folder / name).stat()
                self._stamps.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
                self.texts.append(text)
                self.ids.append(name)
        listed = {Path(name).name for name in self.ids}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name in listed:
                continue
            if path.name not in named:
                self.problems.append(f"{path}: image has no entry in gt.tsv, not used")
            try:
                image_size(path, str(path))
            except DataError as err:
                skipped = f" (named by {gt_path} line {named[path.name]}, which was skipped)" if path.name in named else ""
                self.problems.append(f"{err}{skipped}")
        if not self.texts:
            raise DataError(f"{gt_path}: no usable lines ({len(self.problems)} problems: {self.problems[:3]})")

    def image(self, index: int) -> Image.Image:
        path = self.folder / self.ids[index]
        return decode_image(path, str(path))

    def size_array(self) -> np.ndarray:
        """The images' sizes, from the index built once per version of the folder's images."""
        if self._sizes is None:
            identity = {"source": str(self.folder.resolve()), "images": digest(self._stamps)}

            def sources() -> tuple[list, list[str]]:
                paths = [self.folder / name for name in self.ids]
                return paths, [str(path) for path in paths]

            table = size_index(index_path(index_root(self.index_dir), "folder", self.folder.resolve()), identity,
                               sources, self.name, threads=8)
            errors = table.column("error")
            self.problems += errors.filter(errors.is_valid()).to_pylist()
            self._sizes = size_array(table)
        return self._sizes


def _utf8_lines(path: Path) -> list[str]:
    """The lines of a text file that must be UTF-8 (a byte order mark at its start is dropped), split
    at CR and LF only; DataError at the first byte that is not UTF-8: the file is in another encoding."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, start = data.count(b"\n", 0, err.start) + 1, data.rfind(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at byte "
                        f"{err.start - start + 1} of the line); save {path.name} as UTF-8 (e.g. iconv -f "
                        f"latin1 -t utf-8), the one encoding it is read in") from None
    return [line.decode("utf-8") for line in data.splitlines()]


class SyntheticRecords(LineRecords):
    """Handwriting-like lines rendered on the fly (2 to `max_words` words); line i of a split is the
    same on every call."""

    def __init__(self, count: int, seed: int, split: str, height: int, max_words: int):
        self.name, self.problems, self.height = f"synthetic:{split}", [], height
        self.seed = f"{seed}:{split}"
        self.texts = [synthetic.sample_text(random.Random(f"{self.seed}:{i}:text"), 2, max_words) for i in range(count)]
        self.ids = [f"{self.name}:{i}" for i in range(count)]

    def image(self, index: int) -> Image.Image:
        return synthetic.render_line(self.texts[index], random.Random(f"{self.seed}:{index}:image"), self.height)

    def size_array(self) -> np.ndarray:
        # rendering every line to measure it would cost more than it saves: the text's length
        # predicts the rendered width well enough to group batches
        return np.array([(len(text) * self.height * 2 // 5, self.height) for text in self.texts],
                        dtype=np.int64).reshape(-1, 2)


def configured_splits(data_cfg: DataConfig) -> list[str]:
    """The splits the config provides: all three for the hub and synthetic sources, else those with a path."""
    return [split for split in SPLITS if split_sources(data_cfg, split)]


def load_records(data_cfg: DataConfig, split: str, source: str | None = None) -> LineRecords:
    """The records of one split, for any `data.source`, their texts as `data.normalization` says
    and in the order their images show them (`data.direction`); a split listing several sources
    gives them one after the other (`SourceRecords`), or only the one named `source`. Raises
    DataError with the config key."""
    entries = split_sources(data_cfg, split)
    if not entries:
        raise DataError(f"'data.{split}' is not set: data.source={data_cfg.source} needs a path for the {split} split")
    named = [(key, entry, entry.label(entry.source)) for key, entry in entries]
    if source is not None:
        named = [item for item in named if item[2] == source]
        if not named:
            raise DataError(f"no source of data.{split} is named {source!r}; its sources: "
                            f"{', '.join(entry.label(entry.source) for _, entry in entries)}")
    if not isinstance(getattr(data_cfg, split), tuple):
        return _normalized(data_cfg, _source_records(data_cfg, split, *named[0][:2]))
    return SourceRecords([(name, key, _normalized(data_cfg, _source_records(data_cfg, split, key, entry)), entry.weight)
                          for key, entry, name in named])


def _normalized(data_cfg: DataConfig, records: LineRecords) -> LineRecords:
    return normalize_texts(records, data_cfg.normalization, data_cfg.direction)


def _source_records(data_cfg: DataConfig, split: str, key: str, entry: SourceConfig) -> LineRecords:
    if entry.source == "synthetic":
        synth = data_cfg.synthetic
        return SyntheticRecords(getattr(synth, split), synth.seed, split, data_cfg.height, synth.max_words)
    if entry.source == "hf":
        return hub_records(entry.path or data_cfg.name, split, data_cfg.index_dir)
    if entry.source == "parquet":
        return parquet_records(entry.path, key, data_cfg.index_dir)
    if entry.source == "xml":
        xml = data_cfg.xml
        return XmlRecords(split_files(entry.path, key, ".xml"), entry.path, key, (xml.baseline_above, xml.baseline_below),
                          xml.cache_dir, workers=data_cfg.num_workers, image_root=xml.image_root)
    return FolderRecords(entry.path, key, data_cfg.index_dir)
