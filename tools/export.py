"""Export a trained model as a self-contained bundle: safetensors weights, config, vocab, the
character LM, and an ONNX model with dynamic batch and width (see crnn/export.py for the files).

    python tools/export.py --ckpt runs/base/checkpoints/best.pt --out bundle/
    python tools/predict.py --ckpt bundle/ line.png            # predict and evaluate take a bundle
    python tools/evaluate.py --ckpt bundle/ --decoders greedy,beam_lm data.source=parquet data.test=test.parquet

The ONNX model's log-probs are checked against PyTorch's on export (onnxruntime, CPU): the largest
difference is printed and written to bundle.json; above 1e-4 the export fails.

--out is a new or empty folder, or an existing bundle with --force. The bundle is written in a
folder beside --out and renamed into place once complete, so --out never holds a mix of two
bundles or a partial one; a folder holding anything but a bundle is never written into.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crnn.checkpoint import bundle_files, is_bundle
from crnn.errors import CrnnError, tool_main
from crnn.export import export_bundle
from crnn.inference import load_trained_model
from crnn.outputs import check_output_dir, replace_folder


def check_out(out: Path, force: bool) -> None:
    """--out, before any work: a new or empty folder, or a bundle to replace with --force."""
    check_output_dir(out, "--out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_bundle(out):
        raise CrnnError(f"--out {out}: a folder that holds other files and no bundle; give a new or empty folder")
    if not force:
        raise CrnnError(f"--out {out}: already holds a bundle; add --force to replace it")
    foreign = sorted(path.name for path in out.iterdir() if path.name not in bundle_files(out))
    if foreign:
        raise CrnnError(f"--out {out}: holds files that are not part of its bundle ({', '.join(foreign)}); "
                        f"move them away first, or give another --out")


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint, e.g. runs/base/checkpoints/best.pt")
    parser.add_argument("--out", required=True, type=Path, help="the bundle's folder (new or empty)")
    parser.add_argument("--force", action="store_true", help="replace the bundle --out already holds")
    args = parser.parse_args(argv)
    check_out(args.out, args.force)
    trained = load_trained_model(args.ckpt, device="cpu")
    lm_texts = trained.lm_texts() if trained.train_texts_path.is_file() or trained.config.decode.lm_path else None
    manifest = {}
    replace_folder(args.out, lambda folder: manifest.update(export_bundle(trained, folder, lm_texts)))
    print(f"{args.out}: {', '.join(manifest['files'].values())}; ONNX log-probs within "
          f"{manifest['onnx_max_abs_log_prob_difference']:.1e} of PyTorch's", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
