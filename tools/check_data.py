r"""List every problem in a dataset before a long run starts.

    python tools/check_data.py --cfg experiments/base.yaml
    python tools/check_data.py --cfg experiments/base.yaml data.source=folder data.train=lines/train \
        data.validation=lines/val --splits train,validation
    python tools/check_data.py --cfg experiments/base.yaml data.source=xml data.train=pages/train --splits train

Checks each split: gt.tsv lines that are empty, whitespace-only, not UTF-8 or without a TAB;
entries whose image is missing; images with no gt.tsv entry; images that do not decode (unreadable,
truncated, zero-size, over the pixel limit); lines whose text needs more CTC frames than their
width gives; characters of validation/test lines missing from the training vocabulary; for XML
pages, malformed files, missing page images, lines without text, without a region or with a
degenerate one, or reaching outside their page.
Prints one line per problem (file, line or row, what is wrong) and exits with 1 if there are any.
"""

from __future__ import annotations

import argparse
import sys

from crnn.config import load_config
from crnn.data import Vocab, load_records
from crnn.data.check import check_records
from crnn.data.sources import configured_splits
from crnn.errors import tool_main


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="experiment YAML")
    parser.add_argument("--splits", help="comma-separated splits (default: every split the config provides)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    if args.splits:
        splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    else:
        splits = configured_splits(cfg.data)
    records = {split: load_records(cfg.data, split) for split in splits}
    vocab = Vocab.from_texts(records["train"].texts) if "train" in records else None
    total = 0
    for split, split_records in records.items():
        purpose = "train" if split == "train" else "evaluate"
        problems = check_records(split_records, cfg.data, cfg.model, vocab, purpose, show_progress=True)
        for problem in problems:
            print(f"{split}\t{problem}")
        print(f"{split}: {len(split_records)} usable lines, {len(problems)} problem(s)", file=sys.stderr)
        total += len(problems)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
