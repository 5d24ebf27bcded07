"""Transcribe line images, or every line of ALTO / PAGE XML pages, with a trained checkpoint.

    python tools/predict.py --ckpt runs/base/checkpoints/best.pt line1.png line2.jpg
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt lines/ --batch-size 32
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt lines/ --decoder beam_lm --device cuda
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt pages/*.xml --out transcribed/
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt pages/ --out transcribed/

Images: prints `path<TAB>text` per image. XML pages (files ending in .xml, or a folder holding
some; ALTO v2-v4 or PAGE, as
a transcription platform exports a segmentation): every text line is cropped as in training
(`crnn.data.xml_pages`), transcribed, and the page is written to --out DIR under its own name with
the recognised text filled in (ALTO: one `String` per line; PAGE: the line's `TextEquiv`), ready
to import back; `page.xml:LINE_ID<TAB>text` is printed per line. A line that cannot be cropped
(no or a degenerate region, outside the page) keeps its former text and is reported on stderr.

A directory stands for its image files (PNG, JPEG, WebP, TIFF, BMP, GIF; sorted by name, not
recursive). Images in any mode (RGB, RGBA, 16-bit, palette) are converted to grayscale and
resized as in training (the checkpoint's data.height, data.resize, data.width, data.max_width).
An image that cannot be read is reported on stderr as `error: <path>: <why>` and skipped; the
others are still transcribed and the exit status is then 2.

beam_lm's language model: --lm FILE (ARPA or KenLM binary, e.g. from tools/build_lm.py), else
the checkpoint's decode.lm_path, else estimated from <run>/train_texts.txt next to the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from crnn.data.images import decode_image
from crnn.data.sources import IMAGE_SUFFIXES
from crnn.data.xml_pages import read_page, write_page
from crnn.decoding import DECODER_NAMES, Decoder
from crnn.errors import CrnnError, DataError
from crnn.inference import TrainedModel, load_trained_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint, e.g. runs/base/checkpoints/best.pt")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_DIR_OR_XML")
    parser.add_argument("--out", type=Path, help="folder for the transcribed XML pages (needed with XML inputs)")
    parser.add_argument("--decoder", default="greedy", choices=DECODER_NAMES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--lm", help="language model file for --decoder beam_lm")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def split_inputs(inputs: list[Path]) -> tuple[list[Path], list[Path]]:
    """(XML pages, line images or their folders): a folder holding XML files stands for its pages
    (its images are then page images, not lines)."""
    pages, lines = [], []
    for item in inputs:
        found = sorted(item.glob("*.xml")) if item.is_dir() else []
        if found:
            pages += found
        elif item.suffix.lower() == ".xml":
            pages.append(item)
        else:
            lines.append(item)
    return pages, lines


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, directories as their image files sorted by name; DataError if none."""
    paths = []
    for item in inputs:
        if item.is_dir():
            images = sorted(path for path in item.iterdir()
                            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(f"{item}: no image files in this directory "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(images)
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    return paths


def read_image(path: Path) -> Image.Image:
    """A grayscale line image; DataError saying why not (empty file, not an image, ...)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not an image")
    return decode_image(path, str(path))


def transcribe_all(trained: TrainedModel, decoder: Decoder, paths: list[Path], batch_size: int) -> int:
    """Print `path<TAB>text` per readable image, a batch at a time; returns how many were not."""
    unreadable = 0
    for start in range(0, len(paths), batch_size):
        readable, images = [], []
        for path in paths[start: start + batch_size]:
            try:
                images.append(read_image(path))
                readable.append(path)
            except DataError as err:
                print(f"error: {err}", file=sys.stderr)
                unreadable += 1
        if images:
            for path, text in zip(readable, trained.transcribe(images, decoder), strict=True):
                print(f"{path}\t{text}", flush=True)
    return unreadable


def transcribe_pages(trained: TrainedModel, decoder: Decoder, pages: list[Path], out: Path, batch_size: int) -> int:
    """Write each XML page to `out` with its lines transcribed; returns how many pages failed."""
    failed = 0
    for path in pages:
        try:
            page = read_page(path)
            texts, problems = trained.transcribe_page(page, decoder, batch_size)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        for line_id, text in texts.items():
            print(f"{path}:{line_id}\t{text}", flush=True)
        written = write_page(page, texts, out / path.name)
        print(f"{path}: {written} of {len(page.lines)} line(s) transcribed -> {out / path.name}", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pages, lines = split_inputs(args.inputs)
        if pages and args.out is None:
            raise CrnnError("XML pages need --out DIR, the folder the transcribed pages are written to")
        paths = expand_inputs(lines)
        overrides = [f"decode.lm_path={args.lm}"] if args.lm else []
        trained = load_trained_model(args.ckpt, overrides, args.device)
        decoder = trained.decoders([args.decoder])[args.decoder]
        unreadable = transcribe_all(trained, decoder, paths, args.batch_size)
        unreadable += transcribe_pages(trained, decoder, pages, args.out, args.batch_size) if pages else 0
    except CrnnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
