r"""Fit a model's calibration on a labelled split: a temperature on its log-probs and a line model
of how likely each line is read exactly and how many errors it holds (crnn/calibration.py).
tools/train.py fits one on the validation split at the end of every run; fit one again here on
any labelled data, e.g. a few transcribed pages of a new collection, so that predict's
confidences and estimated CER speak for that collection.

    python tools/calibrate.py --ckpt runs/copiste/checkpoints/best.pt
    python tools/calibrate.py --ckpt bundle/ --split validation data.source=xml data.validation=pages/new/
    python tools/calibrate.py --ckpt runs/copiste/checkpoints/best.pt --out calibrated.pt \
        data.source=folder data.validation=lines/new

The calibration is stored in the checkpoint (rewritten atomically; the weights and everything else
in it unchanged) or the bundle (its calibration.json), or with --out in a copy of either. The split
needs at least 50 labelled lines.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from crnn.checkpoint import is_bundle, store_calibration
from crnn.config import SPLITS
from crnn.errors import CrnnError, tool_main
from crnn.inference import calibrate, load_trained_model
from crnn.outputs import check_output_dir, check_output_file


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint or export bundle")
    parser.add_argument("--split", default="validation", choices=SPLITS, help="the labelled split (default validation)")
    parser.add_argument("--out", type=Path, help="write a copy of --ckpt with the calibration here instead")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("overrides", nargs="*", help="data.* overrides pointing at the labelled data")
    args = parser.parse_args(argv)
    bundle = is_bundle(args.ckpt)
    if args.out is not None:
        if args.out.exists():
            raise CrnnError(f"--out {args.out}: already exists; give a new path")
        (check_output_dir if bundle else check_output_file)(args.out, "--out")
    trained = load_trained_model(args.ckpt, args.overrides, args.device)
    before = trained.calibration
    calibration = calibrate(trained, args.split)
    target = args.out or args.ckpt
    if args.out is not None:
        (shutil.copytree if bundle else shutil.copyfile)(args.ckpt, args.out)
    store_calibration(target, calibration.to_dict())
    previous = f" (it had temperature {before.temperature:.3f} from {before.lines} lines)" if before.fitted else ""
    print(f"{target}: calibration fitted on {calibration.lines} lines of the {calibration.fitted_on}: temperature "
          f"{calibration.temperature:.3f}, reference/read length {calibration.length_ratio:.3f}{previous}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
