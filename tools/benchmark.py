r"""Measure the speed of configs: on fixed batches, in the real training loop, of the decoders, at start-up.

Speed on fixed batches (every config in one process on the same synthetic lines; parameters,
GFLOPs per line, training and inference lines/s in fp32 and --amp, training memory):
    python tools/benchmark.py --cfg experiments/copiste.yaml --cfg experiments/copiste_2h.yaml \
        --device cpu --amp bf16 --beam --json speed.json
    python tools/benchmark.py --cfg experiments/base.yaml --device cuda --lines 512 --batch-size 32

The real training loop (crnn.trainer.train: DataLoader workers, decode cache, augmentation, the
step) for --steps steps after --warmup untimed ones, against the model step alone on the same batches:
    python tools/benchmark.py --loop --cfg experiments/copiste.yaml --steps 100 --warmup 10 data.num_workers=2
    python tools/benchmark.py --loop --cfg experiments/synthetic.yaml --steps 50 --json loop.json

Decoders on a trained checkpoint's log-probs (the forward pass once, then each decoder alone), per
number of decoder worker processes:
    python tools/benchmark.py --decoding runs/copiste/checkpoints/best.pt --workers 1,2

Word boxes on synthetic lines, where the renderer knows each word's ink (greedy and beam: CER, the
share of the true words found with an IoU of 0.5 or more along the line, all and read exactly,
the median IoU, read lines/s; docs/decoding.md):
    python tools/benchmark.py --words runs/copiste/checkpoints/best.pt --lines 300

Right to left: a small network trained on rendered Hebrew lines (numbers and Latin words inside)
and on the same lines in Latin letters, left to right; CER on held-out lines in logical order:
    python tools/benchmark.py --direction /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf --lines 600 \
        --steps 30 --output /tmp/direction      # --steps: epochs here

Start-up time and memory at scale: the config's parquet training split repeated to each --scale
line count (written once under --output), tools/train.py run on it for --steps steps, twice (the
data's index built, then reused), its processes' memory sampled every 0.25 s:
    python tools/benchmark.py --startup --cfg experiments/copiste.yaml --scale 100000,1000000 --steps 20 \
        --output /tmp/startup data.cache_mb=0 --json startup.json     # --ranks 2: under torchrun

`key=value` overrides apply to every config in --loop and --startup (data.* and decode.* of the
checkpoint in --decoding and --words).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from crnn.benchmark import (
    decoding_rows,
    direction_rows,
    loop_row,
    make_lines,
    speed_row,
    startup_table,
    word_rows,
)
from crnn.config import AMP_MODES
from crnn.device import AMP_NAMES, resolve_amp, resolve_device
from crnn.errors import tool_main
from crnn.outputs import check_output_dir, check_output_file
from crnn.runlog import setup_console_logging


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    """The rows as a Markdown table, one column per key (lines/s columns named so)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(key.replace("_lines_per_s", " lines/s").replace("_", " ") for key in keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(cell(row[key]) if key in row else "-" for key in keys) + " |")


def integers(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value.strip()]


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", action="append", help="a config to measure (repeat to compare)")
    parser.add_argument("--device", help="cpu, cuda or auto (the default; --loop: the config's train.device)")
    parser.add_argument("--amp", choices=AMP_MODES, help="the precision timed next to fp32, as train.amp means it "
                        "(default auto; --loop: the config's train.amp, which it replaces)")
    parser.add_argument("--lines", type=int, default=0,
                        help="speed: lines per timed pass (default 32 CPU, 256 GPU); --words: lines (default 300)")
    parser.add_argument("--batch-size", type=int, default=0, help="speed: default 8 on CPU, 32 on GPU")
    parser.add_argument("--repeats", type=int, default=3, help="speed: timed passes (the median is reported)")
    parser.add_argument("--beam", action="store_true", help="speed: time beam-search inference too")
    parser.add_argument("--warmup", type=int, help="untimed passes (speed, default 1) or steps (--loop, default 5)")
    parser.add_argument("--loop", action="store_true", help="time the real training loop")
    parser.add_argument("--steps", type=int, default=50, help="--loop: timed steps; --startup: steps a run takes")
    parser.add_argument("--decoding", metavar="CKPT", help="time the decoders on this checkpoint")
    parser.add_argument("--workers", default="1,2", help="--decoding: decoder worker processes to compare")
    parser.add_argument("--split", default="validation", help="--decoding: the split (default validation)")
    parser.add_argument("--words", metavar="CKPT", help="word boxes of this checkpoint on synthetic lines")
    parser.add_argument("--direction", metavar="FONT", help="right-to-left against left-to-right lines drawn "
                        "with this TrueType font (with Hebrew); --lines, --steps as epochs, --output")
    parser.add_argument("--startup", action="store_true", help="measure start-up time and memory at --scale lines")
    parser.add_argument("--scale", default="100000,1000000", help="--startup: training line counts")
    parser.add_argument("--ranks", type=int, default=1, help="--startup: processes under torchrun (1: plain)")
    parser.add_argument("--output", default="runs/benchmark-startup", help="--startup: files and run directories")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (--loop, --startup, --decoding)")
    args = parser.parse_args(argv)
    if not args.cfg and not args.decoding and not args.words and not args.direction:
        parser.error("give --cfg CONFIG (repeat to compare), --decoding CKPT, --words CKPT or --direction FONT")
    if args.json:
        check_output_file(args.json, "--json")
    if args.startup:
        check_output_dir(args.output, "--output")
    setup_console_logging()
    if args.direction:
        check_output_dir(args.output, "--output")
        rows = direction_rows(args.direction, args.lines or 600, args.steps, Path(args.output))
    elif args.words:
        rows = word_rows(args.words, args.overrides, args.lines or 300)
    elif args.decoding:
        rows = decoding_rows(args.decoding, args.overrides, args.split, integers(args.workers))
    elif args.loop:
        warmup = 5 if args.warmup is None else args.warmup
        given = [f"train.{key}={value}" for key, value in (("device", args.device), ("amp", args.amp)) if value]
        rows = [loop_row(cfg, [*given, *args.overrides], args.steps, warmup) for cfg in args.cfg]
    elif args.startup:
        rows = startup_table(args.cfg[0], integers(args.scale), args.overrides, args.steps, args.ranks,
                             Path(args.output))
    else:
        rows = speed_rows(args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


def speed_rows(args: argparse.Namespace) -> list[dict]:
    device, amp = resolve_device(args.device or "auto", key="--device"), args.amp or "auto"
    cuda = device.type == "cuda"
    precision = AMP_NAMES[resolve_amp(amp, device, key="--amp")]
    lines = make_lines(args.lines or (256 if cuda else 32))
    batch_size = args.batch_size or (32 if cuda else 8)
    warmup = 1 if args.warmup is None else args.warmup
    torch.backends.cudnn.benchmark = True
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{os.cpu_count()} CPU cores'}), "
          f"{torch.get_num_threads()} threads, {len(lines)} lines, batch {batch_size}, median of "
          f"{args.repeats} after {warmup} warm-up; fp32{'' if precision == 'fp32' else ' and ' + precision}",
          file=sys.stderr)
    return [speed_row(cfg, lines, device, batch_size, args.repeats, warmup, amp, args.beam) for cfg in args.cfg]


if __name__ == "__main__":
    sys.exit(main())
