r"""Build the character n-gram language model of beam_lm (Kneser-Ney) from training transcriptions.

    python tools/build_lm.py runs/base/train_texts.txt --out runs/base/lm.arpa
    python tools/build_lm.py ../shared/data/copiste-h64/train.parquet --order 6 --out copiste.arpa
    python tools/evaluate.py --ckpt runs/base/checkpoints/best.pt --decoders beam_lm --lm runs/base/lm.arpa

Inputs: text files (one transcription per line, UTF-8; tools/train.py writes <run>/train_texts.txt)
or parquet files in the Teklia/IAM-line schema (column `text`), read in the model's Unicode form
(--normalization, as its data.normalization; white space collapsed, as in training) and in the
order its lines' images show them (--direction, as its data.direction). The output is a standard ARPA
file (log10), read by evaluate/predict through flashlight's KenLM (orders up to 6).

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

from crnn.config import NORMALIZATIONS
from crnn.data.records import prepared
from crnn.errors import DataError, tool_main
from crnn.lm import KENLM_MAX_ORDER, NgramLM, read_texts, text_to_tokens
from crnn.outputs import atomic_write_text, check_output_file


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+", type=Path, help="train_texts.txt or *.parquet (column text)")
    parser.add_argument("--out", type=Path, help="ARPA file to write")
    parser.add_argument("--order", type=int, default=6, choices=range(1, KENLM_MAX_ORDER + 1), metavar="N",
                        help=f"n-gram order, 1 to {KENLM_MAX_ORDER} (default 6)")
    parser.add_argument("--normalization", default="NFC", choices=NORMALIZATIONS,
                        help="the Unicode form of the model's texts (its data.normalization; default NFC)")
    parser.add_argument("--direction", default="ltr", choices=("ltr", "rtl", "auto"),
                        help="the model's data.direction: texts are turned to the order their images show")
    parser.add_argument("--tokens-out", type=Path,
                        help="also write the texts as space-separated LM tokens, one line each (for lmplz)")
    args = parser.parse_args(argv)
    if not args.out and not args.tokens_out:
        parser.error("nothing to do: give --out and/or --tokens-out")
    for option, path in (("--out", args.out), ("--tokens-out", args.tokens_out)):
        if path is not None:
            check_output_file(path, option)
    texts = [prepared(text, args.normalization, args.direction)
             for path in args.texts for text in read_texts(path)]
    texts = [text for text in texts if text]
    if not texts:
        raise DataError(f"no transcriptions in {', '.join(map(str, args.texts))}")
    if args.tokens_out:
        atomic_write_text(args.tokens_out, "".join(" ".join(text_to_tokens(text)) + "\n" for text in texts))
    if args.out:
        lm = NgramLM.estimate(texts, args.order)
        lm.write_arpa(args.out)
        print(f"{args.out}: order {args.order}, {len(lm.log_probs)} n-grams from {len(texts)} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
