"""Line records from the data sources: hub dataset, parquet files, image folder, synthetic, and
page XML (ALTO / PAGE, in xml_pages.py).

Every source gives the same `LineRecords` interface: texts known up front (for the vocab and for
checks), image sizes known up front (to group batches by width), images decoded on demand (in the
DataLoader workers). Entries that cannot be used (empty text, malformed `gt.tsv` line, missing
image) are left out and described in `problems`, so that one bad line never stops a long run.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from stat import S_ISREG
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from crnn.config import SPLITS, DataConfig
from crnn.data.images import IMAGE_SUFFIXES, decode_image, image_size
from crnn.data.index import (
    column_sources,
    digest,
    index_path,
    index_root,
    parquet_index,
    size_array,
    size_columns,
    size_index,
)
from crnn.data.records import LineRecords
from crnn.data.xml_pages import XmlRecords
from crnn.errors import DataError


def _check_text(text: object, where: str, problems: list[str]) -> str | None:
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: empty transcription, line skipped")
        return None
    return text


class ArrowRecords(LineRecords):
    """Rows of an Arrow table in the Teklia/IAM-line schema: `image` {bytes, path} and `text`.

    The table may be memory-mapped (an index, `crnn.data.index`): texts, ids and images are read
    from it when asked for, and the records hold per line only its row number, so that their
    memory does not grow with the images (nor with Python objects per line). Each line's size comes
    from `sizes` (a table of `width`, `height`, `error` per row), from those columns of `table`
    itself (a parquet index), or is read from the image headers when first asked for."""

    def __init__(self, table: pa.Table, name: str, base_dir: Path | None = None, sizes: pa.Table | None = None):
        missing = {"image", "text"} - set(table.column_names)
        if missing:
            raise DataError(
                f"{name}: missing column(s) {sorted(missing)}; expected the Teklia/IAM-line schema "
                f"with columns 'image' and 'text', found {table.column_names}"
            )
        texts = table.column("text")
        if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) or pa.types.is_null(texts.type)):
            raise DataError(f"{name}: column 'text' holds {texts.type}, not text (the Teklia/IAM-line schema has strings)")
        self.name, self.base_dir, self.problems = name, base_dir, []
        self.images = table.column("image")
        if sizes is None and "width" in table.column_names:
            sizes = table.select(["width", "height", "error"])
        self._size_table = sizes
        usable = _usable_texts(texts)
        self.rows = np.flatnonzero(usable)
        self.problems += [f"{name} row {row}: empty transcription, line skipped" for row in np.flatnonzero(~usable)]
        self.texts = RowView(texts, self.rows)
        self.ids = RowIds(name, self.rows)
        self._sizes: np.ndarray | None = None

    def _source(self, index: int) -> bytes | Path:
        cell = self.images[int(self.rows[index])].as_py()
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"]
        if isinstance(cell, dict) and cell.get("path"):
            path = Path(cell["path"])
            return path if path.is_absolute() or self.base_dir is None else self.base_dir / path
        raise DataError(f"{self.ids[index]}: the image cell holds neither bytes nor a path")

    def image(self, index: int) -> Image.Image:
        return decode_image(self._source(index), self.ids[index])

    def size_array(self) -> np.ndarray:
        if self._sizes is None:
            rows = self.rows
            if self._size_table is None:  # no index: every row's header read now
                sources = column_sources(self.images, self.base_dir)
                wheres = RowIds(self.name, np.arange(len(sources)))
                self._size_table = pa.table(size_columns(sources, wheres), names=["width", "height", "error"])
            sizes = size_array(self._size_table)
            every_row = len(rows) == len(sizes)  # rows ascend without repeats: then they are all rows
            self._sizes = sizes if every_row else sizes[rows]
            errors = self._size_table.column("error")
            if errors.null_count < len(errors):  # decoding will fail again later and be counted there
                failed = np.flatnonzero(errors.is_valid().to_numpy(zero_copy_only=False))
                used = np.zeros(len(sizes), dtype=bool)
                used[rows] = True
                self.problems += RowView(errors, failed[used[failed]])[:]
        return self._sizes

    def sizes(self) -> list[tuple[int, int]]:
        return [(int(width), int(height)) for width, height in self.size_array()]


def _usable_texts(texts: pa.ChunkedArray) -> np.ndarray:
    """True for each row whose transcription is not empty nor only white space."""
    if pa.types.is_null(texts.type):
        return np.zeros(len(texts), dtype=bool)
    usable = [pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk)), 0), False)
              .to_numpy(zero_copy_only=False) for chunk in texts.chunks]  # a chunk at a time: no copy of all texts
    return np.concatenate(usable).astype(bool) if usable else np.zeros(0, dtype=bool)


class RowView(Sequence):
    """The values of an Arrow column at `rows`, read when asked for (a list's interface). Values are
    taken chunk by chunk: a take over the whole chunked column would first join its chunks (a copy
    of the column)."""

    def __init__(self, column: pa.ChunkedArray, rows: np.ndarray):
        self.column, self.rows = column, rows
        self.starts = np.cumsum([0, *(len(chunk) for chunk in column.chunks)])

    def __len__(self) -> int:
        return len(self.rows)

    def _values(self, rows: np.ndarray) -> list:
        """The values at `rows` (ascending or not), in their order."""
        chunks = np.searchsorted(self.starts, rows, side="right") - 1
        values: list = [None] * len(rows)
        for chunk in np.unique(chunks):
            where = np.flatnonzero(chunks == chunk)
            local = pa.array(rows[where] - self.starts[chunk])
            for at, value in zip(where.tolist(), self.column.chunk(int(chunk)).take(local).to_pylist(), strict=True):
                values[at] = value
        return values

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._values(self.rows[index])
        row = int(self.rows[index])
        chunk = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.column.chunk(chunk)[row - int(self.starts[chunk])].as_py()

    def __iter__(self) -> Iterator:
        for start in range(0, len(self.rows), 65536):
            yield from self[start:start + 65536]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RowView({len(self)} rows)"


class RowIds(Sequence):
    """`name:row` for each line, made when asked for."""

    def __init__(self, name: str, rows: np.ndarray):
        self.name, self.rows = name, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [f"{self.name}:{row}" for row in self.rows[index]]
        return f"{self.name}:{self.rows[index]}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


def _parquet_files(path_text: str, key: str) -> list[Path]:
    path = Path(path_text).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(f"{key}: no *.parquet files in folder {path}")
        return files
    if not path.is_file():
        raise DataError(f"{key}: parquet file not found: {path}")
    return [path]


def parquet_records(path_text: str, key: str, index_dir: str = "") -> ArrowRecords:
    """A local parquet file (or a folder of them) in the Teklia/IAM-line schema, read through its
    index (`crnn.data.index`: an Arrow copy built once, memory-mapped)."""
    files = _parquet_files(path_text, key)
    root = index_root(index_dir)
    tables = [parquet_index(file, root, f"{key} ({file})" if len(files) > 1 else key).replace_schema_metadata(None)
              for file in files]
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowException as err:
        raise DataError(f"{key}: the parquet files of {path_text} do not share one schema: {err}") from None
    return ArrowRecords(table, str(path_text), base_dir=files[0].parent)


def parquet_texts(path_text: str, key: str) -> list[str]:
    """The transcriptions of a parquet file (or folder), without their images; empty ones skipped."""
    import pyarrow.parquet as pq

    texts = []
    for file in _parquet_files(path_text, key):
        try:
            column = pq.read_table(file, columns=["text"]).column("text")
        except (pa.ArrowException, OSError, KeyError) as err:
            raise DataError(f"{key}: cannot read the 'text' column of parquet {file}: {err}") from None
        texts += column.filter(pa.array(_usable_texts(column))).to_pylist()
    return texts


def _hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, endpoint
    except OSError as err:
        return False, f"{endpoint} ({err})"


def hub_records(name: str, split: str, index_dir: str = "") -> ArrowRecords:
    """A split of a Hugging Face hub dataset; fails within seconds, with what to do, when offline."""
    offline = any(os.environ.get(var, "") in ("1", "true", "TRUE") for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:
        reachable, endpoint = _hub_reachable()
        if not reachable:
            raise DataError(
                f"cannot reach the Hugging Face hub at {endpoint} to load dataset '{name}' "
                f"(data.source=hf). Offline, train on local data instead: "
                f"data.source=parquet data.train=PATH data.validation=PATH (files in the {name} "
                f"schema: image, text), data.source=folder (line images + gt.tsv), or the synthetic "
                f"demo: python tools/train.py --cfg experiments/synthetic.yaml. If '{name}' is "
                f"already in your local cache, set HF_HUB_OFFLINE=1."
            )
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub raises many types; all mean "cannot get this split"
        raise DataError(f"cannot load split '{split}' of hub dataset '{name}': {err}") from None
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset_records(dataset, f"{name}:{split}", index_dir)


def dataset_records(dataset, name: str, index_dir: str = "") -> ArrowRecords:
    """A `datasets.Dataset` (memory-mapped Arrow files in its cache) as records; its lines' sizes
    are indexed once per version of those files."""
    table = dataset.with_format("arrow")[:]
    files = [Path(entry["filename"]) for entry in dataset.cache_files]
    if not files:  # a dataset held in memory: nothing to key an index on
        return ArrowRecords(table, name)
    identity = {"source": digest(f"{file.resolve()}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in files),
                "rows": len(table)}

    def sources() -> tuple[list, Sequence[str]]:
        return column_sources(table.column("image"), None), RowIds(name, np.arange(len(table)))

    sizes = size_index(index_path(index_root(index_dir), "hub", name), identity, sources, name)
    return ArrowRecords(table, name, sizes=sizes)


class FolderRecords(LineRecords):
    """A folder of line images with `gt.tsv`: `file name<TAB>transcription` per line, UTF-8."""

    def __init__(self, folder_text: str, key: str, index_dir: str = ""):
        folder = Path(folder_text).expanduser()
        gt_path = folder / "gt.tsv"
        if not folder.is_dir():
            raise DataError(f"{key}: folder not found: {folder}")
        if not gt_path.is_file():
            raise DataError(f"{key}: {folder} has no gt.tsv (file name<TAB>transcription per line)")
        self.name, self.problems, self.texts, self.ids = str(folder), [], [], []
        self.folder, self.index_dir = folder, index_dir
        self._named: dict[str, int] = {}  # file name -> the gt.tsv line naming it, used or skipped
        self._stamps: list[str] = []  # each used image's name, size and modification time: the index's key
        self._sizes: np.ndarray | None = None
        for number, raw in enumerate(gt_path.read_bytes().splitlines(), start=1):
            self._add_line(gt_path, number, raw)
        listed = {Path(name).name for name in self.ids}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.name not in listed:
                self._unused_image(path, gt_path)
        if not self.texts:
            raise DataError(f"{gt_path}: no usable lines ({len(self.problems)} problems: {self.problems[:3]})")

    def _add_line(self, gt_path: Path, number: int, raw: bytes) -> None:
        where = f"{gt_path} line {number}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            self.problems.append(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start}), skipped")
            return
        if not line.strip():
            return
        name, tab, text = line.partition("\t")
        if not tab:
            self.problems.append(f"{where}: no TAB between file name and transcription, skipped")
            return
        self._named.setdefault(name, number)
        if _check_text(text, where, self.problems) is None:
            return
        path = gt_path.parent / name
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            self.problems.append(f"{where}: image file {path} not found, skipped")
            return
        self._stamps.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
        self.texts.append(text)
        self.ids.append(name)

    def _unused_image(self, path: Path, gt_path: Path) -> None:
        """An image of the folder no usable gt.tsv line names: said so, and what is wrong with the
        file itself (empty, unreadable) if anything."""
        try:
            image_size(path, str(path))
            damaged = ""
        except DataError as err:
            damaged = str(err)
        if path.name not in self._named:
            self.problems.append(f"{path}: image has no entry in gt.tsv, not used")
        if damaged:
            named = f" (named by {gt_path} line {self._named[path.name]}, which was skipped)" \
                if path.name in self._named else ""
            self.problems.append(f"{damaged}{named}")

    def path(self, index: int) -> Path:
        return self.folder / self.ids[index]

    def image(self, index: int) -> Image.Image:
        path = self.path(index)
        return decode_image(path, str(path))

    def size_array(self) -> np.ndarray:
        """The images' sizes, from the index (built once per version of the folder's images, their
        headers read by 8 threads)."""
        if self._sizes is not None:
            return self._sizes
        identity = {"source": str(self.folder.resolve()), "images": digest(self._stamps)}

        def sources() -> tuple[list, list[str]]:
            paths = [self.path(index) for index in range(len(self))]
            return paths, [str(path) for path in paths]

        table = size_index(index_path(index_root(self.index_dir), "folder", self.folder.resolve()), identity,
                           sources, self.name, threads=8)
        errors = table.column("error")
        self.problems += [error for error in errors.filter(errors.is_valid()).to_pylist()]
        self._sizes = size_array(table)
        return self._sizes

    def sizes(self) -> list[tuple[int, int]]:
        return [(int(width), int(height)) for width, height in self.size_array()]


class SyntheticRecords(LineRecords):
    """Handwriting-like lines rendered on the fly; line i of a split is the same on every call."""

    def __init__(self, count: int, seed: int, split: str, height: int, min_words: int, max_words: int):
        from crnn.data import synthetic

        self.name, self.problems, self.height = f"synthetic:{split}", [], height
        self.seed = f"{seed}:{split}"
        self.texts = [
            synthetic.sample_text(random.Random(f"{self.seed}:{i}:text"), min_words, max_words)
            for i in range(count)
        ]
        self.ids = [f"{self.name}:{i}" for i in range(count)]

    def image(self, index: int) -> Image.Image:
        from crnn.data import synthetic

        rng = random.Random(f"{self.seed}:{index}:image")
        return synthetic.render_line(self.texts[index], rng, self.height)

    def sizes(self) -> list[tuple[int, int]]:
        # Rendering every line just to measure it would cost more than it saves: text length
        # predicts the rendered width well enough to group batches.
        return [(len(text) * self.height * 2 // 5, self.height) for text in self.texts]



def configured_splits(data_cfg: DataConfig) -> list[str]:
    """The splits the config provides: all three for the hub and synthetic sources, else those with a path."""
    if data_cfg.source in ("hf", "synthetic"):
        return list(SPLITS)
    return [split for split in SPLITS if getattr(data_cfg, split)]


def load_records(data_cfg: DataConfig, split: str) -> LineRecords:
    """The records of one split, for any `data.source`. Raises DataError with the config key."""
    key = f"data.{split}"
    if data_cfg.source == "synthetic":
        synth = data_cfg.synthetic
        return SyntheticRecords(
            getattr(synth, split), synth.seed, split, data_cfg.height, synth.min_words, synth.max_words
        )
    if data_cfg.source == "hf":
        return hub_records(data_cfg.name, split, data_cfg.index_dir)
    path = getattr(data_cfg, split)
    if not path:
        raise DataError(f"'{key}' is not set: data.source={data_cfg.source} needs a path for the {split} split")
    if data_cfg.source == "parquet":
        return parquet_records(path, key, data_cfg.index_dir)
    if data_cfg.source == "xml":
        xml = data_cfg.xml
        return XmlRecords(path, key, (xml.baseline_above, xml.baseline_below), xml.cache_dir,
                          workers=data_cfg.num_workers, image_root=xml.image_root)
    return FolderRecords(path, key, data_cfg.index_dir)
