"""Export a trained model as a self-contained bundle: safetensors weights, config, vocab, the
character LM, and an ONNX model with dynamic batch and width (see crnn/export.py for the files).

    python tools/export.py --ckpt runs/base/checkpoints/best.pt --out bundle/
    python tools/predict.py --ckpt bundle/ line.png            # predict and evaluate take a bundle
    python tools/evaluate.py --ckpt bundle/ --decoders greedy,beam_lm data.source=parquet data.test=test.parquet

The ONNX model's log-probs are checked against PyTorch's on export (onnxruntime, CPU): the largest
difference is printed and written to bundle.json; above 1e-4 the export fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crnn.errors import tool_main
from crnn.export import export_bundle
from crnn.inference import load_trained_model


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint, e.g. runs/base/checkpoints/best.pt")
    parser.add_argument("--out", required=True, type=Path, help="the bundle's folder")
    args = parser.parse_args(argv)
    trained = load_trained_model(args.ckpt, device="cpu")
    lm_texts = trained.lm_texts() if trained.train_texts_path.is_file() or trained.config.decode.lm_path else None
    manifest = export_bundle(trained, args.out, lm_texts)
    print(f"{args.out}: {', '.join(manifest['files'].values())}; ONNX log-probs within "
          f"{manifest['onnx_max_abs_log_prob_difference']:.1e} of PyTorch's", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
