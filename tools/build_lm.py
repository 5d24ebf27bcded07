r"""Build the character n-gram language model of beam_lm from training transcriptions.

    python tools/build_lm.py runs/base/train_texts.txt --out runs/base/lm.arpa
    python tools/build_lm.py ../shared/data/copiste-h64/train.parquet --order 6 \
        --smoothing kneser_ney --out copiste.arpa
    python tools/evaluate.py --ckpt runs/base/checkpoints/best.pt --decoders beam_lm --lm runs/base/lm.arpa

Inputs: text files (one transcription per line, UTF-8; tools/train.py writes <run>/train_texts.txt)
or parquet files in the Teklia/IAM-line schema (column `text`). The output is a standard ARPA
file (log10), read by evaluate/predict through flashlight's KenLM (or by crnn.lm.NgramLM).

The LM's words are characters: a space is `|` (the beam search's word boundary); `|` itself,
other whitespace and unprintable characters are `<U+XXXX>`. To build the LM with KenLM instead,
write the texts in that form (--tokens-out) and run lmplz on it:

    python tools/build_lm.py runs/base/train_texts.txt --tokens-out chars.txt
    lmplz -o 6 --discount_fallback < chars.txt > lm.arpa
    build_binary lm.arpa lm.bin        # optional: a KenLM binary loads faster
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crnn.config import LM_SMOOTHINGS
from crnn.errors import DataError, tool_main
from crnn.lm import NgramLM, read_texts, text_to_tokens
from crnn.outputs import check_output_file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+", type=Path, help="train_texts.txt or *.parquet (column text)")
    parser.add_argument("--out", type=Path, help="ARPA file to write")
    parser.add_argument("--order", type=int, default=6, help="n-gram order (default 6)")
    parser.add_argument("--smoothing", default="kneser_ney", choices=LM_SMOOTHINGS)
    parser.add_argument("--add-k", type=float, default=0.1, help="k of --smoothing add_k (default 0.1)")
    parser.add_argument("--tokens-out", type=Path,
                        help="also write the texts as space-separated LM tokens, one line each (for lmplz)")
    args = parser.parse_args(argv)
    if not args.out and not args.tokens_out:
        parser.error("nothing to do: give --out and/or --tokens-out")
    return args


@tool_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for option, path in (("--out", args.out), ("--tokens-out", args.tokens_out)):
        if path is not None:
            check_output_file(path, option)
    texts = [text for path in args.texts for text in read_texts(path)]
    if not texts:
        raise DataError(f"no transcriptions in {', '.join(map(str, args.texts))}")
    if args.tokens_out:
        args.tokens_out.write_text("".join(" ".join(text_to_tokens(text)) + "\n" for text in texts),
                                   encoding="utf-8")
    if args.out:
        lm = NgramLM.estimate(texts, args.order, args.smoothing, args.add_k)
        lm.write_arpa(args.out)
        print(f"{args.out}: order {args.order} {args.smoothing}, {len(lm.log_probs)} n-grams from "
              f"{len(texts)} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
