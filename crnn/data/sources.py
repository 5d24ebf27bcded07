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
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image

from crnn.config import SPLITS, DataConfig
from crnn.data.images import IMAGE_SUFFIXES, decode_image, image_size
from crnn.data.records import LineRecords
from crnn.data.xml_pages import XmlRecords
from crnn.errors import DataError


def _check_text(text: object, where: str, problems: list[str]) -> str | None:
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: empty transcription, line skipped")
        return None
    return text


class ArrowRecords(LineRecords):
    """Rows of a pyarrow table in the Teklia/IAM-line schema: `image` {bytes, path} and `text`."""

    def __init__(self, table, name: str, base_dir: Path | None = None):
        missing = {"image", "text"} - set(table.column_names)
        if missing:
            raise DataError(
                f"{name}: missing column(s) {sorted(missing)}; expected the Teklia/IAM-line schema "
                f"with columns 'image' and 'text', found {table.column_names}"
            )
        self.name, self.base_dir, self.problems = name, base_dir, []
        self.images = table.column("image")
        self.rows, self.texts, self.ids = [], [], []
        for row, text in enumerate(table.column("text").to_pylist()):
            if _check_text(text, f"{name} row {row}", self.problems) is not None:
                self.rows.append(row)
                self.texts.append(text)
                self.ids.append(f"{name}:{row}")

    def _source(self, index: int) -> bytes | Path:
        cell = self.images[self.rows[index]].as_py()
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"]
        if isinstance(cell, dict) and cell.get("path"):
            path = Path(cell["path"])
            return path if path.is_absolute() or self.base_dir is None else self.base_dir / path
        raise DataError(f"{self.ids[index]}: the image cell holds neither bytes nor a path")

    def image(self, index: int) -> Image.Image:
        return decode_image(self._source(index), self.ids[index])

    def sizes(self) -> list[tuple[int, int]]:
        sizes = []
        for index in range(len(self)):
            try:
                sizes.append(image_size(self._source(index), self.ids[index]))
            except DataError as err:  # decoding will fail again later and be counted there
                self.problems.append(str(err))
                sizes.append((0, 0))
        return sizes


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


def parquet_records(path_text: str, key: str) -> ArrowRecords:
    """A local parquet file (or a folder of them) in the Teklia/IAM-line schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(path_text, key)
    try:
        table = pa.concat_tables([pq.read_table(file) for file in files])
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{key}: cannot read parquet {path_text}: {err}") from None
    return ArrowRecords(table, str(path_text), base_dir=files[0].parent)


def _hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, endpoint
    except OSError as err:
        return False, f"{endpoint} ({err})"


def hub_records(name: str, split: str) -> ArrowRecords:
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
    return ArrowRecords(dataset.with_format("arrow")[:], f"{name}:{split}")


class FolderRecords(LineRecords):
    """A folder of line images with `gt.tsv`: `file name<TAB>transcription` per line, UTF-8."""

    def __init__(self, folder_text: str, key: str):
        folder = Path(folder_text).expanduser()
        gt_path = folder / "gt.tsv"
        if not folder.is_dir():
            raise DataError(f"{key}: folder not found: {folder}")
        if not gt_path.is_file():
            raise DataError(f"{key}: {folder} has no gt.tsv (file name<TAB>transcription per line)")
        self.name, self.problems, self.paths, self.texts, self.ids = str(folder), [], [], [], []
        self._named: dict[str, int] = {}  # file name -> the gt.tsv line naming it, used or skipped
        for number, raw in enumerate(gt_path.read_bytes().splitlines(), start=1):
            self._add_line(gt_path, number, raw)
        listed = {path.name for path in self.paths}
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
        if not path.is_file():
            self.problems.append(f"{where}: image file {path} not found, skipped")
            return
        self.paths.append(path)
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

    def image(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], str(self.paths[index]))

    def sizes(self) -> list[tuple[int, int]]:
        sizes = []
        for path in self.paths:
            try:
                sizes.append(image_size(path, str(path)))
            except DataError as err:
                self.problems.append(str(err))
                sizes.append((0, 0))
        return sizes


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
        return hub_records(data_cfg.name, split)
    path = getattr(data_cfg, split)
    if not path:
        raise DataError(f"'{key}' is not set: data.source={data_cfg.source} needs a path for the {split} split")
    if data_cfg.source == "parquet":
        return parquet_records(path, key)
    if data_cfg.source == "xml":
        xml = data_cfg.xml
        return XmlRecords(path, key, (xml.baseline_above, xml.baseline_below), xml.cache_dir,
                          workers=data_cfg.num_workers, image_root=xml.image_root)
    return FolderRecords(path, key)
