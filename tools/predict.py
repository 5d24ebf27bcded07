"""Transcribe line images, or every line of ALTO / PAGE XML pages, with a trained checkpoint.

    python tools/predict.py --ckpt runs/base/checkpoints/best.pt line1.png line2.jpg
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt lines/ --batch-size 32
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt lines/ --decoder beam_lm --device cuda
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt pages/*.xml --out transcribed/
    python tools/predict.py --ckpt runs/base/checkpoints/best.pt pages/ --out transcribed/

Images: prints `path<TAB>text` per image. A directory stands for its image files (PNG, JPEG,
WebP, TIFF, BMP, GIF; sorted by name, not recursive); any mode is converted to grayscale and
scaled as in training. An image that cannot be read is reported on stderr as `error: <path>:
<why>` and skipped; the others are still transcribed and the exit status is then 2.

XML pages (files ending in .xml, or a folder holding some; ALTO v2-v4 or PAGE): every text line
is cropped as in training, transcribed, and the page written to --out DIR under its own name with
the text filled in: ALTO, one `String` per word (HPOS, VPOS, WIDTH, HEIGHT, WC) with `SP` between
them; PAGE, a `Word` per word (Coords, TextEquiv conf) and the line's `TextEquiv`; with --glyphs
also a `Glyph` per character (ALTO v4, PAGE); a word's region is the line's polygon between its
cuts (docs/data.md);
`page.xml:LINE_ID<TAB>text` is printed per line. A line that cannot be cropped keeps its former
text and is reported on stderr. Input pages are never overwritten, except with --in-place, which
first copies each to NAME.xml.bak (NAME.xml.bak.1, ... if that exists). A page image named in the
XML must lie in the XML's folder (or --image-root DIR).

--json prints one JSON object per line instead (strict JSON: no NaN): {"path", "text",
"confidence": {"mean", "min"}, "p_exact", "expected_cer", "expected_errors", "squeezed_from",
"words": [{"text", "confidence", "x0", "x1"}, ...], "characters": [{"char", "confidence", "x0",
"x1"}, ...]} and, with --nbest K (beam decoders), "nbest": [{"text", "score"}, ...] best first.
A character's confidence is its calibrated posterior at its strongest frame in the run of frames
where CTC places it; x0..x1 is its cut (to the middle of the gaps beside it), in the input
image's pixels; a word spans its characters' cuts, with their mean confidence (docs/decoding.md).
The line's confidence is the mean and the minimum over its characters.
With the model's calibration (fitted at the end of training, or by tools/calibrate.py): p_exact,
the probability that the line is read exactly, and its expected character errors and CER (null
without one). ALTO pages get the line's confidence as the String's WC (one minus its expected CER,
else the mean character confidence) and each character's as CC (0 sure .. 9 unsure); PAGE pages
as the TextEquiv's conf.

A line wider than data.max_width once scaled to data.height is squeezed to it, and reads worse:
a warning names it and its scaled width, and "squeezed_from" is that width (else null). A line
too narrow to give the model one frame is read as "" with a warning; its confidence, p_exact and
expected errors are null.

--summary ends with the estimated CER of the lines read and a 95% interval, without any ground
truth (with --json a last line {"summary": {"lines", "estimated_cer", "interval": [low, high],
"squeezed", "too_narrow"}}). Squeezed lines and lines without a frame are left out of it (the
calibration never saw their like) and counted ("lines": those in the estimate; with none, the
estimate is null); if no line could be read at all it is an error (exit 2).
--review N lists the N lines with the most expected errors, the ones to check first (with --json
a line {"review": [...]}). Both need a calibrated model.

beam_lm's language model: --lm FILE (ARPA or KenLM binary, e.g. from tools/build_lm.py), else
the checkpoint's decode.lm_path, else estimated from <run>/train_texts.txt next to the checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from crnn.calibration import MIN_LINES, Calibration
from crnn.config import DataConfig
from crnn.data.images import IMAGE_SUFFIXES, decode_image
from crnn.data.xml_pages import GlyphBox, LineConfidence, WordBox, read_page, write_page
from crnn.decoding import DECODER_NAMES, Decoder, word_ranges
from crnn.errors import ConfigError, CrnnError, DataError, tool_main
from crnn.inference import Reading, TrainedModel, load_trained_model
from crnn.outputs import check_output_dir, check_output_file, json_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint, e.g. runs/base/checkpoints/best.pt")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_DIR_OR_XML")
    parser.add_argument("--out", type=Path, help="folder for the transcribed XML pages (needed with XML inputs)")
    parser.add_argument("--in-place", action="store_true",
                        help="write the transcriptions into the input XML pages (each backed up as NAME.xml.bak)")
    parser.add_argument("--image-root", type=Path,
                        help="the folder page images must lie in (default: each XML file's own folder)")
    parser.add_argument("--glyphs", action="store_true", help="XML pages: a Glyph per character in each word")
    parser.add_argument("--decoder", default="greedy", choices=DECODER_NAMES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--lm", help="language model file for --decoder beam_lm")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line: text, confidence, characters with their spans")
    parser.add_argument("--nbest", type=int, default=0, help="with --json: the K best readings and their scores")
    parser.add_argument("--workers", type=int, help="beam search processes (decode.workers; default: one per core)")
    parser.add_argument("--summary", action="store_true",
                        help="at the end, the estimated CER of all the lines read, with an interval (no ground truth)")
    parser.add_argument("--review", type=int, default=0, metavar="N",
                        help="at the end, the N lines with the most expected errors: where a person should look first")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.review < 0:
        parser.error("--review N needs N >= 1")
    if args.nbest and (args.nbest < 1 or not args.json or args.decoder == "greedy"):
        parser.error("--nbest K needs K >= 1, --json and --decoder beam or beam_lm (greedy has one reading)")
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


def page_targets(pages: list[Path], out: Path | None, in_place: bool) -> dict[Path, Path]:
    """Where each XML page is written: `out`/its name, or itself with --in-place. CrnnError, before
    any work, for an --out that is not a usable folder or where a page would overwrite an input
    page (or another page of the same name)."""
    if in_place and out is not None:
        raise CrnnError("give --out DIR or --in-place, not both")
    if not pages:
        if in_place:
            raise CrnnError("--in-place writes into XML pages, and no input is an XML page")
        return {}
    if in_place:
        return {page: check_output_file(page, "--in-place") for page in pages}
    if out is None:
        raise CrnnError("XML pages need --out DIR, the folder the transcribed pages are written to (or "
                        "--in-place to write into the input pages, each backed up first)")
    check_output_dir(out, "--out")
    targets: dict[Path, Path] = {}
    for page in pages:
        target = out / page.name
        if target.exists() and target.samefile(page):
            raise CrnnError(f"--out {out}: the transcribed page would overwrite its input {page}; give "
                            f"another --out, or --in-place to write into the input pages (each backed up "
                            f"as {page.name}.bak)")
        if target in targets.values():
            raise CrnnError(f"--out {out}: two input pages are named {page.name}; the second would overwrite "
                            f"the first's transcription")
        targets[page] = target
    return targets


def backup(page: Path) -> Path:
    """Copy `page` to NAME.bak (or NAME.bak.1, .2, ...: an existing backup is never replaced)."""
    target, number = page.with_name(page.name + ".bak"), 0
    while target.exists():
        number += 1
        target = page.with_name(f"{page.name}.bak.{number}")
    shutil.copy2(page, target)
    return target


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


class Printer:
    """Prints each line's reading as it comes (text or JSON) and keeps what --summary and --review
    need of it."""

    def __init__(self, args: argparse.Namespace, calibration: Calibration, data: DataConfig):
        self.as_json, self.nbest = args.json, bool(args.nbest)
        self.calibration, self.data = calibration, data
        self.lines: list[tuple[str, Reading]] = []

    def __call__(self, name: str, reading: Reading) -> None:
        self.lines.append((name, reading))
        size = f"{name}: {reading.width} px wide at data.height {self.data.height}"
        if reading.squeezed:
            print(f"warning: {size}, over data.max_width {self.data.max_width}: squeezed to "
                  f"{self.data.max_width} px, which reads it worse (not in --summary's estimate); "
                  f"cut it into shorter lines", file=sys.stderr)
        if reading.confidence_mean is None:
            print(f"warning: {size}, too narrow for one frame of the model: nothing read", file=sys.stderr)
        if not self.as_json:
            print(f"{name}\t{reading.text}", flush=True)
            return
        fields = reading.to_dict()
        if not self.nbest:
            del fields["nbest"]
        print(json_text({"path": name, **fields}, ensure_ascii=False), flush=True)

    def review(self, count: int) -> None:
        """The `count` lines with the most expected character errors, most first."""
        judged = [line for line in self.lines if line[1].expected_errors is not None]
        ranked = sorted(judged, key=lambda line: -line[1].expected_errors)[:count]
        if self.as_json:
            print(json_text({"review": [{"path": name, "expected_errors": r.expected_errors,
                                          "expected_cer": r.expected_cer, "p_exact": r.p_exact, "text": r.text}
                                         for name, r in ranked]}, ensure_ascii=False))
            return
        print(f"review: the {len(ranked)} line(s) with the most expected errors (expected errors, expected CER, "
              f"path, text):", file=sys.stderr)
        for name, r in ranked:
            print(f"{r.expected_errors:8.2f}  {r.expected_cer:7.1%}  {name}\t{r.text}", file=sys.stderr)

    def summary(self) -> None:
        """The estimated CER of the lines read, with its interval, without any ground truth; lines
        squeezed to data.max_width or without a frame are left out of it and counted. CrnnError if
        no line was read."""
        if not self.lines:
            raise CrnnError("--summary: no line was read, so there is no estimate")
        estimated = [r for _, r in self.lines if not r.squeezed and r.expected_errors is not None]
        squeezed = sum(r.squeezed for _, r in self.lines)
        narrow = len(self.lines) - len(estimated) - squeezed
        errors, read = [r.expected_errors for r in estimated], [len(r.text) for r in estimated]
        estimate, (low, high) = self.calibration.estimate_cer(errors, read)
        if self.as_json:
            found = {"estimated_cer": None, "interval": None}
            if estimated:
                found = {"estimated_cer": round(estimate, 4), "interval": [round(low, 4), round(high, 4)]}
            print(json_text({"summary": {"lines": len(estimated), **found, "squeezed": squeezed,
                                          "too_narrow": narrow}}))
            return
        said = (f"estimated CER {estimate:.1%} ({low:.1%} to {high:.1%}, 95% interval)" if estimated
                else "no estimate")
        if squeezed:
            said += f"; {squeezed} line(s) squeezed to data.max_width are not in the estimate"
        if narrow:
            said += f"; {narrow} line(s) too narrow for one frame are not in it"
        print(f"summary: {len(estimated)} line(s), {said}", file=sys.stderr)


def transcribe_all(trained: TrainedModel, decoder: Decoder, paths: list[Path], args: argparse.Namespace,
                   show: Printer) -> int:
    """Print what each readable image reads, a batch at a time; returns how many were not readable."""
    unreadable, batch_size = 0, args.batch_size
    for start in range(0, len(paths), batch_size):
        readable, images = [], []
        for path in paths[start: start + batch_size]:
            try:
                images.append(decode_image(path, str(path)))
                readable.append(path)
            except DataError as err:
                print(f"error: {err}", file=sys.stderr)
                unreadable += 1
        if images:
            for path, line_reading in zip(readable, trained.read(images, decoder), strict=True):
                show(str(path), line_reading)
    return unreadable


def word_boxes(line: Reading) -> list[WordBox]:
    """A reading's words (in page coordinates) with their characters, as write_page takes them."""
    return [WordBox(word["text"], word["x0"], word["x1"], word["confidence"],
                    [GlyphBox(c["char"], c["x0"], c["x1"], c["confidence"]) for c in line.characters[first:last]])
            for word, (first, last) in zip(line.words, word_ranges(line.text), strict=True)]


def transcribe_pages(trained: TrainedModel, decoder: Decoder, targets: dict[Path, Path],
                     args: argparse.Namespace, show: Printer) -> int:
    """Write each XML page to its target with its lines transcribed; returns how many pages failed."""
    failed = 0
    for path, target in targets.items():
        try:
            page = read_page(path, args.image_root)
            readings, problems = trained.read_page(page, decoder, args.batch_size)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        for line_id, line_reading in readings.items():
            show(f"{path}:{line_id}", line_reading)
        saved = f", the original kept as {backup(path)}" if target == path else ""
        confidences = {line_id: LineConfidence(r.line_confidence, [c["confidence"] for c in r.characters])
                       for line_id, r in readings.items() if r.line_confidence is not None}
        words = {line_id: word_boxes(r) for line_id, r in readings.items()}
        xml = trained.config.data.xml
        written = write_page(page, {line_id: r.text for line_id, r in readings.items()}, target, confidences,
                             words, args.glyphs, (xml.baseline_above, xml.baseline_below))
        print(f"{path}: {written} of {len(page.lines)} line(s) transcribed -> {target}{saved}", file=sys.stderr)
    return failed


@tool_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pages, lines = split_inputs(args.inputs)
    targets = page_targets(pages, args.out, args.in_place)
    paths = expand_inputs(lines)
    overrides = [f"decode.lm_path={args.lm}"] if args.lm else []
    overrides += [f"decode.nbest={args.nbest}"] if args.nbest else []
    overrides += [f"decode.workers={args.workers}"] if args.workers is not None else []
    trained = load_trained_model(args.ckpt, overrides, args.device)
    if args.nbest > trained.config.decode.beam_size:
        raise ConfigError(f"--nbest {args.nbest} needs decode.beam_size >= {args.nbest} (it is "
                          f"{trained.config.decode.beam_size}); add decode.beam_size={args.nbest}")
    if (args.summary or args.review) and not trained.calibration.fitted:
        raise CrnnError(f"--summary and --review need a calibrated model, and {args.ckpt} has no calibration: fit one "
                        f"with python tools/calibrate.py --ckpt {args.ckpt} (on a labelled split of at least "
                        f"{MIN_LINES} lines)")
    decoder = trained.decoders([args.decoder])[args.decoder]
    show = Printer(args, trained.calibration, trained.config.data)
    unreadable = transcribe_all(trained, decoder, paths, args, show)
    unreadable += transcribe_pages(trained, decoder, targets, args, show) if targets else 0
    if args.review:
        show.review(args.review)
    if args.summary:
        show.summary()
    return 2 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
