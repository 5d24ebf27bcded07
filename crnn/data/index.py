"""Line indexes: Arrow IPC files in `index_root()`, built once per data file, reused by later runs and ranks.

What each kind of source's index holds: docs/data.md. The schema's metadata holds the identity of the
source (paths, sizes and modification times): a changed source gets a new index. A last, empty batch
holds the CRC-32 of the bytes before it: a damaged index, wherever the damage, is rebuilt. One process
builds it under a file lock while the others wait.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from crnn.data.images import image_size
from crnn.errors import DataError
from crnn.outputs import atomic_write, lock_file

log = logging.getLogger(__name__)

INDEX_VERSION = 2
METADATA_KEY = b"crnn.index"
SIZE_FIELDS = [pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("error", pa.string())]
BATCH_ROWS = 4096  # rows per record batch of an index (and per parquet read)
HEADER_BYTES = 65536  # what is read of an image file to find its size


def index_root(configured: str = "") -> Path:
    """The index folder: `data.index_dir`, else $CRNN_INDEX_DIR, else the user's cache folder."""
    configured = configured or os.environ.get("CRNN_INDEX_DIR", "")
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "crnn" / "index"


def index_path(root: Path, kind: str, source: Path | str) -> Path:
    """Where the index of `source` lives: one file per source path (a changed source replaces it)."""
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return root / f"{kind}-{Path(str(source)).name[:40]}-{digest}.arrow"


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG or WebP image from its first bytes; None for another format
    or a header this does not understand (then PIL reads it)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return tuple(value & 0x3FFF for value in struct.unpack("<HH", data[26:30]))
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


# JPEG start-of-frame markers (baseline, progressive, ...): not DHT (C4), JPG (C8) or DAC (CC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _SOF_MARKERS:
            return struct.unpack(">HH", data[at + 5:at + 9])[::-1]  # (height, width) in the frame header
        standalone = marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7  # markers without a length
        at += 2 if standalone else 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return None


def line_size(source: bytes | memoryview | Path, where: str) -> tuple[int, int, str | None]:
    """(width, height, None) of an image (bytes or a file), or (0, 0, why) when its header cannot
    be read (the line is then left out when it is decoded, and counted there)."""
    try:
        if isinstance(source, (bytes, memoryview)):
            head = source
        else:
            with open(source, "rb") as stream:
                head = stream.read(HEADER_BYTES)
        size = header_size(head)
        if size is None or min(size) <= 0:
            size = image_size(bytes(source) if isinstance(source, memoryview) else source, where)
        return int(size[0]), int(size[1]), None
    except FileNotFoundError:
        return 0, 0, f"{where}: image file {source} not found"
    except OSError as err:
        return 0, 0, f"{where}: unreadable image ({type(err).__name__}: {err})"
    except DataError as err:
        return 0, 0, str(err)


def size_columns(sources: list[bytes | memoryview | Path], wheres: list[str], threads: int = 1) -> list[pa.Array]:
    """The `width`, `height` and `error` columns of these images; files are read by `threads`
    threads (reading is I/O; the header parse is microseconds)."""
    if threads > 1 and len(sources) > 64:
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(line_size, sources, wheres))
    else:
        sizes = list(map(line_size, sources, wheres))
    widths, heights, errors = zip(*sizes, strict=True) if sizes else ((), (), ())
    return [pa.array(widths, pa.int32()), pa.array(heights, pa.int32()), pa.array(errors, pa.string())]


def stored_table(path: Path, identity: dict, schema: pa.Schema,
                 batches: Callable[[], Iterable[pa.RecordBatch]], what: str) -> pa.Table:
    """The index at `path` for `identity`, memory-mapped; built first if missing, stale or damaged."""
    identity = {"version": INDEX_VERSION, **identity}
    table = _open_index(path, identity, what)
    if table is not None:
        log.info("%s: index reused (%s)", what, path)
        return table
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with lock_file(path.with_name(path.name + ".lock")):  # one builder; the others wait, then read its index
            table = _open_index(path, identity, what, quiet=True)
            if table is not None:
                log.info("%s: index reused (%s), built by another process while this one waited", what, path)
            else:
                started = time.monotonic()
                # atomic_write's temporary files of this index, left by a killed build
                for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
                    stale.unlink(missing_ok=True)

                def write(stream) -> None:
                    stream = _Checksummed(stream)
                    with pa.ipc.new_file(stream, schema.with_metadata({METADATA_KEY: json.dumps(identity)})) as writer:
                        for batch in batches():
                            writer.write_batch(batch)
                        checksum = {"crc32": str(stream.crc), "bytes": str(stream.size)}
                        writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema), custom_metadata=checksum)

                atomic_write(path, write)
                pa.default_memory_pool().release_unused()  # the buffers of the source read to build it
                log.info("%s: index built in %.1f s (%s)", what, time.monotonic() - started, path)
                table = _open_index(path, identity, what)
    except OSError as err:
        log.warning("%s: cannot write its index in %s (%s); reading it without one, so every start "
                    "reads it again (set data.index_dir to a writable folder)", what, path.parent, err)
        return pa.Table.from_batches(list(batches()), schema=schema)
    if table is None:
        raise DataError(f"{what}: the index just written to {path} does not read back")
    return table


def _open_index(path: Path, identity: dict, what: str, quiet: bool = False) -> pa.Table | None:
    if not path.is_file():
        return None
    try:
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(source)
        stored = json.loads((reader.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        if stored != identity:
            if not quiet:
                log.info("%s: its index was built from another version of the data; building it again", what)
            return None
        check = reader.get_batch_with_custom_metadata(reader.num_record_batches - 1).custom_metadata or {}
        source.seek(0)  # the checksum covers the bytes before that last batch
        if zlib.crc32(source.read_buffer(int(check[b"bytes"]))) != int(check[b"crc32"]):
            raise ValueError("its content does not match its checksum")
        table = reader.read_all()
        table.validate()
        return table
    except (pa.ArrowException, OSError, ValueError, KeyError, IndexError) as err:
        if not quiet:
            log.warning("%s: index %s is damaged (%s); building it again", what, path, err)
        return None


class _Checksummed:
    """A binary stream that keeps the CRC-32 and the count of the bytes written through it."""

    closed = False

    def __init__(self, stream):
        self.stream, self.crc, self.size = stream, 0, 0

    def write(self, data) -> int:
        self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def check_columns(columns: list[str], name: str) -> None:
    """DataError unless `columns` hold those of the Teklia/IAM-line schema."""
    missing = {"image", "text"} - set(columns)
    if missing:
        raise DataError(f"{name}: missing column(s) {sorted(missing)}; expected the Teklia/IAM-line schema "
                        f"with columns 'image' and 'text', found {columns}")


def parquet_index(file: Path, root: Path, name: str) -> pa.Table:
    """A parquet file in the Teklia/IAM-line schema as a memory-mapped Arrow table with its lines'
    sizes (`SIZE_FIELDS`) beside `image` and `text`."""
    import pyarrow.parquet as pq

    try:
        # without pre-buffering, reading the file batch by batch holds a few batches, not the whole file
        parquet = pq.ParquetFile(file, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{name}: cannot read parquet {file}: {err}") from None
    check_columns(parquet.schema_arrow.names, name)
    source = parquet.schema_arrow
    image_type = source.field("image").type
    if not (_binary(image_type) or pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0):
        raise DataError(f"{name}: column 'image' of {file} holds {image_type}; expected images: datasets' "
                        f"Image() (a struct of bytes and path) or the image files' bytes (binary)")
    schema = pa.schema([source.field("image"), source.field("text"), *SIZE_FIELDS])

    def batches() -> Iterator[pa.RecordBatch]:
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=["image", "text"], use_threads=False):
                images = batch.column("image")
                sources = image_sources(images, file.parent)
                wheres = [f"{name}:{row + i}" for i in range(len(batch))]
                yield pa.RecordBatch.from_arrays([images, batch.column("text"),
                                                  *size_columns(sources, wheres)], schema=schema)
                row += len(batch)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{name}: cannot read parquet {file} (row {row}): {err}") from None

    stat = file.stat()
    identity = {"source": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return stored_table(index_path(root, "parquet", file.resolve()), identity, schema, batches, name)


def size_index(path: Path, identity: dict, sources: Callable[[], tuple[list, list[str]]], what: str,
               threads: int = 1) -> pa.Table:
    """A table of `SIZE_FIELDS`, one row per line of `sources()` (images as bytes or files, and
    where each is named in errors), kept at `path` for `identity`."""
    schema = pa.schema(SIZE_FIELDS)

    def batches() -> Iterator[pa.RecordBatch]:
        images, wheres = sources()
        for start in range(0, len(images), BATCH_ROWS * 16):
            chunk = slice(start, start + BATCH_ROWS * 16)
            yield pa.RecordBatch.from_arrays(size_columns(images[chunk], wheres[chunk], threads), schema=schema)

    return stored_table(path, identity, schema, batches, what)


def image_sources(images: pa.StructArray | pa.BinaryArray, base_dir: Path | None) -> list[memoryview | Path]:
    """Each Teklia/IAM-line `image` cell ({bytes, path}, or the image's bytes alone) as its bytes (a
    view into the Arrow buffer, not a copy) or the file to read (relative paths from `base_dir`);
    b"" when neither."""
    data = images if _binary(images.type) else images.field("bytes")
    if data.null_count == len(data):
        views = [b""] * len(data)
    else:
        _, offsets, values = data.buffers()
        wide = pa.types.is_large_binary(data.type)
        ends = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32)[data.offset:data.offset + len(data) + 1].tolist()
        buffer = memoryview(values).cast("B") if values is not None else memoryview(b"")  # unsigned bytes
        valid = data.is_valid().to_numpy(zero_copy_only=False)
        views = [buffer[start:end] if ok else b"" for start, end, ok in zip(ends, ends[1:], valid, strict=False)]
    if data is images or all(len(view) for view in views):
        return views
    paths = images.field("path").to_pylist()
    for row, view in enumerate(views):
        if not len(view) and paths[row]:
            views[row] = (base_dir or Path()) / paths[row]  # `/` keeps an absolute path as it is
    return views


def _binary(arrow_type: pa.DataType) -> bool:
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def digest(parts: Iterable[str]) -> str:
    """A short digest of many strings (e.g. each file's name, size and modification time)."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode("utf-8", "surrogateescape"))
        hasher.update(b"\0")
    return hasher.hexdigest()


def size_array(table: pa.Table) -> np.ndarray:
    """`(N, 2)` int32 widths and heights of an index table."""
    return np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], axis=1)
