r"""Compare configs side by side: speed on the same lines, or accuracy under the same time budget.

Speed (all configs in one process, same lines, median of timed passes after warm-up):
    python tools/benchmark.py --cfg experiments/base.yaml --cfg experiments/reference_seed.yaml \
        --cfg experiments/reference_bestpractice.yaml --device cpu --amp bf16 --json speed.json
    python tools/benchmark.py --cfg experiments/base.yaml --device cuda --lines 512 --batch-size 32

The real training loop (DataLoader workers, decode cache, augmentation on the device, the step), on
real lines, against the model-only step on the same batches:
    python tools/benchmark.py --cfg experiments/base.yaml --loop --steps 100 --warmup 10 \
        --data ../shared/data/copiste-h64/train.parquet,../shared/data/copiste-h64/validation.parquet \
        data.height=128 data.num_workers=12 --json loop.json
    (--warm-epoch first runs a whole untimed epoch, so that the decode cache is full)

Decoders on a trained checkpoint's log-probs (the forward pass once, then each decoder alone), per
number of worker processes:
    python tools/benchmark.py --decoding runs/copiste/checkpoints/best.pt --workers 1,2 \
        data.source=parquet data.validation=../shared/data/copiste-h64/validation.parquet

Accuracy per compute (each config trains for the same minutes on the same data):
    python tools/benchmark.py --cfg experiments/base.yaml --cfg experiments/reference_seed.yaml \
        --cfg experiments/reference_bestpractice.yaml --budget-minutes 30 \
        --data ../shared/data/copiste-h64/train.parquet,../shared/data/copiste-h64/validation.parquet
A session with a wall-clock limit: `--stop-after-minutes 9 --output runs/referee` pauses (checkpoint)
after 9 minutes; the same command again continues each run with its planned steps, and reports the
finished configs from their run directories.

Start-up time and memory at scale: the --data training parquet repeated to each --scale line count
(written once under --output), then tools/train.py on it for --steps steps, twice (the data's index
built, then reused; `data.index_dir` under --output), its processes' memory sampled every 0.25 s:
    python tools/benchmark.py --startup --cfg experiments/copiste.yaml --scale 100000,1000000 --steps 20 \
        --data ../shared/data/copiste-h64/train.parquet,../shared/data/copiste-h64/validation.parquet \
        --output /tmp/startup data.cache_mb=0 --json startup.json     # --ranks 2: under torchrun (gloo)

`--data TRAIN,VALIDATION` takes parquet files or gt.tsv folders; more `key=value` overrides apply to
every config (e.g. data.num_workers=1) in --loop and --budget-minutes modes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from crnn.benchmark import budget_row, decoding_rows, loop_row, make_lines, speed_row, startup_table
from crnn.config import AMP_MODES
from crnn.device import AMP_NAMES, BF16_MIN_SPEEDUP, resolve_amp, resolve_device
from crnn.errors import CrnnError, tool_main
from crnn.outputs import check_output_dir, check_output_file
from crnn.runlog import setup_console_logging

SPEED_COLUMNS = [("config", "config", "{}"), ("params_m", "params (M)", "{:.2f}"),
                 ("gflops_per_line", "GFLOPs/line", "{:.1f}"), ("mean_width", "mean width", "{:.0f}"),
                 ("train_fp32_lines_per_s", "train fp32", "{:.1f}"), ("train_{amp}_lines_per_s", "train {amp}", "{:.1f}"),
                 ("infer_fp32_greedy_lines_per_s", "greedy fp32", "{:.1f}"),
                 ("infer_fp32_beam_lines_per_s", "beam fp32", "{:.1f}"),
                 ("infer_{amp}_greedy_lines_per_s", "greedy {amp}", "{:.1f}"),
                 ("train_memory_mb", "train MB", "{:.0f}")]
LOOP_COLUMNS = [("config", "config", "{}"), ("precision", "precision", "{}"), ("steps", "steps", "{}"),
                ("loop_lines_per_s", "loop lines/s", "{:.1f}"),
                ("model_lines_per_s", "model lines/s", "{:.1f}"), ("data_wait_fraction", "data wait", "{:.1%}"),
                ("padding_fraction", "padding", "{:.1%}"), ("distinct_shapes", "shapes", "{}")]
DECODING_COLUMNS = [("decoder", "decoder", "{}"), ("workers", "workers", "{}"), ("lines", "lines", "{}"),
                    ("lines_per_s", "lines/s", "{:.1f}"), ("cer", "CER", "{:.4f}")]
STARTUP_COLUMNS = [("run", "run", "{}"), ("ranks", "ranks", "{}"), ("index", "index", "{}"),
                   ("first_step_s", "start to first step (s)", "{}"),
                   ("rank_private_mb", "private MB per rank", "{}"), ("worker_private_mb", "private MB per worker", "{}"),
                   ("rank_mapped_files_mb", "mapped files MB per rank", "{}"),
                   ("rank_shared_memory_mb", "shared memory MB per rank", "{}")]
BUDGET_COLUMNS = [("config", "config", "{}"), ("minutes", "minutes", "{:g}"), ("status", "status", "{}"),
                  ("steps", "steps", "{}"), ("planned_steps", "planned", "{}"),
                  ("epochs", "epochs", "{}"), ("best_val_cer", "best val CER", "{:.4f}"),
                  ("best_val_wer", "best val WER", "{:.4f}")]


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], amp: str = "") -> None:
    columns = [(key.format(amp=amp), title.format(amp=amp), fmt) for key, title, fmt in columns]
    columns = list({c[0]: c for c in columns if any(c[0] in row for row in rows)}.values())  # once each
    print("| " + " | ".join(title for _, title, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns) + " |")


def amp_override(args: argparse.Namespace) -> list[str]:
    """`--amp` as the override it means for the configs that --loop and --budget-minutes train."""
    return [] if args.amp is None else [f"train.amp={args.amp}"]


def data_overrides(data: str) -> list[str]:
    train, _, validation = data.partition(",")
    if not validation:
        raise CrnnError("--data must be TRAIN,VALIDATION (two parquet files or two gt.tsv folders)")
    source = "folder" if Path(train).is_dir() else "parquet"
    return [f"data.source={source}", f"data.train={train}", f"data.validation={validation}"]


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", action="append", help="a config to compare (repeat)")
    parser.add_argument("--decoding", metavar="CKPT", help="time the decoders on this checkpoint instead")
    parser.add_argument("--workers", default="1,2", help="--decoding: decoder worker processes to compare")
    parser.add_argument("--split", default="validation", help="--decoding: the split (default validation)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--amp", choices=AMP_MODES,
                        help="the precision timed next to fp32, as train.amp means it (default auto: bf16 on GPUs "
                             "that have it, fp16 on other GPUs; on a CPU, bf16 where its kernels train at least "
                             f"{BF16_MIN_SPEEDUP}x faster than fp32, else fp32 alone); with --loop and "
                             "--budget-minutes, every config's train.amp (default: the config's own)")
    parser.add_argument("--lines", type=int, default=0, help="lines per timed pass (default 32 CPU, 256 GPU)")
    parser.add_argument("--batch-size", type=int, default=0, help="default 8 on CPU, 32 on GPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (the median is reported)")
    parser.add_argument("--warmup", type=int, help="untimed passes first (speed: 1) or steps (--loop: 10)")
    parser.add_argument("--loop", action="store_true", help="time the real training loop on --data instead")
    parser.add_argument("--steps", type=int, default=50, help="timed steps of --loop (default 50)")
    parser.add_argument("--warm-epoch", action="store_true", help="--loop: one whole untimed epoch first")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--budget-minutes", type=float, help="train each config this long instead")
    parser.add_argument("--startup", action="store_true", help="measure start-up time and memory at --scale lines")
    parser.add_argument("--scale", default="100000,1000000", help="--startup: training line counts")
    parser.add_argument("--ranks", type=int, default=1, help="--startup: processes under torchrun (1: plain)")
    parser.add_argument("--data", help="TRAIN,VALIDATION for --loop and --budget-minutes")
    parser.add_argument("--output", default=f"runs/benchmark-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="run directories of --budget-minutes (the same again continues its runs)")
    parser.add_argument("--stop-after-minutes", type=float, default=0.0,
                        help="--budget-minutes: pause (checkpoint) after this much wall-clock time; "
                             "the same command with the same --output continues")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides for every config (--loop, --budget-minutes; data.*/decode.* for --decoding)")
    args = parser.parse_args(argv)
    if not args.cfg and not args.decoding:
        parser.error("give --cfg CONFIG (repeat to compare) or --decoding CKPT")
    if args.json:
        check_output_file(args.json, "--json")
    if args.budget_minutes or args.startup:
        check_output_dir(args.output, "--output")
    setup_console_logging()
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


def run(args: argparse.Namespace) -> list[dict]:
    if args.decoding:
        workers = [int(value) for value in args.workers.split(",") if value.strip()]
        rows = decoding_rows(args.decoding, args.overrides, args.split, workers)
        print_table(rows, DECODING_COLUMNS)
        return rows
    if args.loop:
        if not args.data:
            raise CrnnError("--loop needs --data TRAIN,VALIDATION")
        overrides = [*data_overrides(args.data), f"train.device={args.device}", *amp_override(args), *args.overrides]
        warmup = 10 if args.warmup is None else args.warmup
        rows = [loop_row(cfg, overrides, args.steps, warmup, args.warm_epoch) for cfg in args.cfg]
        print_table(rows, LOOP_COLUMNS)
        return rows
    if args.startup:
        return startup_rows(args)
    if args.budget_minutes:
        if not args.data:
            raise CrnnError("--budget-minutes needs --data TRAIN,VALIDATION")
        overrides = [*data_overrides(args.data), *amp_override(args), *args.overrides]
        deadline = time.time() + 60 * args.stop_after_minutes if args.stop_after_minutes > 0 else None
        rows = [budget_row(cfg, overrides, args.budget_minutes, Path(args.output), deadline) for cfg in args.cfg]
        print_table(rows, BUDGET_COLUMNS)
        unfinished = [row["config"] for row in rows if row["status"] != "done"]
        if unfinished:
            print(f"not finished: {', '.join(unfinished)} (--stop-after-minutes); run the same command with "
                  f"--output {args.output} to continue", file=sys.stderr)
        return rows
    device = resolve_device(args.device, key="--device")
    cuda = device.type == "cuda"
    amp = args.amp or "auto"
    precision = AMP_NAMES[resolve_amp(amp, device, key="--amp")]
    lines = make_lines(args.lines or (256 if cuda else 32))
    batch_size = args.batch_size or (32 if cuda else 8)
    torch.backends.cudnn.benchmark = True
    warmup = 1 if args.warmup is None else args.warmup
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{os.cpu_count()} CPU cores'}), "
          f"{torch.get_num_threads()} threads, {len(lines.texts)} lines, batch {batch_size}, "
          f"median of {args.repeats} after {warmup} warm-up; precision timed: fp32"
          f"{'' if precision == 'fp32' else ' and ' + precision} (--amp {amp})", file=sys.stderr)
    rows = [speed_row(cfg, lines, device, batch_size, args.repeats, warmup, amp) for cfg in args.cfg]
    print_table(rows, SPEED_COLUMNS, precision)
    return rows


def startup_rows(args: argparse.Namespace) -> list[dict]:
    if not args.data:
        raise CrnnError("--startup needs --data TRAIN,VALIDATION (a parquet training split to repeat)")
    scales = [int(value) for value in args.scale.split(",") if value.strip()]
    rows = startup_table(args.cfg[0], args.data, scales, args.overrides, args.steps, args.ranks, Path(args.output))
    print_table(rows, STARTUP_COLUMNS)
    return rows


if __name__ == "__main__":
    sys.exit(main())
