r"""Fit a model's calibration on a labelled split: a temperature on its log-probs and a line model
of how likely each line is read exactly and how many errors it holds (crnn/calibration.py).
tools/train.py fits one on the validation split at the end of a run; fit one here on any labelled
data (e.g. a few transcribed pages of a new collection), so that predict's confidences and
estimated CER speak for that collection.

    python tools/calibrate.py --ckpt runs/copiste/checkpoints/best.pt
    python tools/calibrate.py --ckpt bundle/ --split validation data.source=xml data.validation=pages/new/
    python tools/calibrate.py --ckpt runs/copiste/checkpoints/best.pt --out calibrated.pt \
        data.source=folder data.validation=lines/new

A split that lists several sources (docs/data.md) is fitted on all of them, or on the one
`--source NAME` names.

The calibration is stored in the checkpoint (rewritten atomically, everything else in it
unchanged) or the bundle (its calibration.json), or with --out in a copy of either; where it
goes is checked before any work. The split needs at least 50 labelled lines; lines holding
characters outside the model's vocabulary are left out of the temperature's fit, with a warning
(a CTC target cannot hold them).

How well it holds on lines it was not fitted on: `--folds 5` cuts the split into 5 blocks of
consecutive lines, fits on four and measures on the fifth, each in turn, and reports the measures
of evaluate.py (estimated against true CER, ECE of p_exact and of the character confidences,
AUROC, errors in the least confident fifth) over every line (`--json FILE` writes them, NaN as
null); the calibration stored is still the one fitted on all lines. Each fit needs 50 lines and
each fold one: a --folds the split's lines do not allow is refused before the forward pass.

    python tools/calibrate.py --ckpt runs/copiste/checkpoints/best.pt --folds 5 --json crossfit.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from crnn.calibration import cross_fitted_report, describe_report, fit_calibration
from crnn.checkpoint import is_bundle, store_calibration
from crnn.config import SPLITS
from crnn.errors import CrnnError, tool_main
from crnn.inference import labelled_lines, load_trained_model
from crnn.outputs import atomic_write_text, check_output_dir, check_output_file, json_text


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint or export bundle")
    parser.add_argument("--split", default="validation", choices=SPLITS, help="the labelled split (default validation)")
    parser.add_argument("--source", help="of a split that lists several sources, only the one of this name "
                                         "(default: all of them)")
    parser.add_argument("--out", type=Path, help="write a copy of --ckpt with the calibration here instead")
    parser.add_argument("--folds", type=int, default=0,
                        help="also measure the calibration on lines it was not fitted on: cross-fitting over this "
                             "many blocks of the split (e.g. 5; 0: no measure)")
    parser.add_argument("--json", type=Path, help="with --folds: write the cross-fitted measures here")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("overrides", nargs="*", help="data.* overrides pointing at the labelled data")
    args = parser.parse_args(argv)
    bundle, target = is_bundle(args.ckpt), args.out or args.ckpt
    if args.out is not None and args.out.exists():
        raise CrnnError(f"--out {args.out}: already exists; give a new path")
    written = "--out" if args.out else "--ckpt (written in place: give --out NEW_PATH for a calibrated copy)"
    (check_output_dir if bundle else check_output_file)(target, written)
    if args.folds == 1 or args.folds < 0:
        raise CrnnError(f"--folds {args.folds}: give 0 (no cross-fitting) or at least 2 folds")
    if args.json is not None:
        if not args.folds:
            raise CrnnError("--json writes the cross-fitted measures: give --folds too (e.g. --folds 5)")
        check_output_file(args.json, "--json")
    trained = load_trained_model(args.ckpt, args.overrides, args.device)
    before = trained.calibration
    lines = labelled_lines(trained, args.split, folds=args.folds, source=args.source)
    log_probs, references = lines.log_probs, lines.references
    unknown = trained.vocab.unknown_in(references)
    if unknown:
        held = sum(1 for reference in references if not unknown.isdisjoint(reference))
        print(f"warning: {held} line(s) of the {lines.where} hold characters not in the model's vocabulary "
              f"({''.join(sorted(unknown))!r}): left out of the temperature's fit (a CTC target cannot hold "
              f"them); their errors still count in the line model", file=sys.stderr)
    if args.folds:
        report = cross_fitted_report(log_probs, references, trained.vocab, args.folds, f"data.{args.split}",
                                     progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"cross-fitted over {args.folds} folds of the {lines.where} (temperatures "
              f"{', '.join(f'{t:.3f}' for t in report['temperatures'])}), measured on {report['lines']} lines:")
        print("\n".join(describe_report(report)))
        if args.json is not None:
            atomic_write_text(args.json, json_text(report, indent=2) + "\n")
    calibration = fit_calibration(log_probs, references, trained.vocab, lines.where)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if bundle else shutil.copyfile)(args.ckpt, args.out)
    store_calibration(target, calibration.to_dict(), "--out")
    previous = f" (it had temperature {before.temperature:.3f} from {before.lines} lines)" if before.fitted else ""
    print(f"{target}: calibration fitted on {calibration.lines} lines of the {calibration.fitted_on}: temperature "
          f"{calibration.temperature:.3f}, reference/read length {calibration.length_ratio:.3f}{previous}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
