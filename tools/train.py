r"""Train a CRNN.

Single GPU or CPU:
    python tools/train.py --cfg experiments/base.yaml
    python tools/train.py --cfg experiments/synthetic.yaml train.epochs=5 data.batch_size=8
Several GPUs on one machine (DistributedDataParallel, NCCL; gloo on CPU):
    torchrun --standalone --nproc_per_node=4 tools/train.py --cfg experiments/base.yaml
One process over all visible GPUs (nn.DataParallel, legacy):
    python tools/train.py --cfg experiments/base.yaml train.data_parallel=true
Continue an interrupted run:
    python tools/train.py --cfg experiments/base.yaml train.resume=auto
Fine-tune a trained model on your own lines (a new run; model keys from the checkpoint):
    python tools/train.py --cfg experiments/finetune.yaml train.init_from=runs/base/checkpoints/best.pt \
        data.source=folder data.train=mine/train data.validation=mine/val
Watch it:
    tensorboard --logdir runs
SIGTERM or Ctrl-C: the current step finishes, a checkpoint is written, the exit code is 128 + the
signal number (143, 130); `train.resume=auto` continues from there.
A job with a wall-clock limit: `train.stop_after_minutes=N` does the same after N minutes (exit code
142, as for SIGALRM).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from crnn.errors import tool_main
from crnn.finetune import load_run_config
from crnn.runlog import setup_console_logging
from crnn.trainer import fit


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="experiment YAML, e.g. experiments/base.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_console_logging(logging.INFO if rank == 0 else logging.WARNING)
    cfg, start = load_run_config(args.cfg, args.overrides)  # the starting model of train.init_from, if any
    state = fit(cfg, start)
    # stopped by SIGTERM/SIGINT (or train.stop_after_minutes, as SIGALRM) after writing a checkpoint:
    # the shell's code for that signal
    return 128 + state.stopped_by if state.stopped_by else 0


if __name__ == "__main__":
    sys.exit(main())
