"""The export bundle: a trained model in files other tools read, for deployment (its files:
docs/export.md). model.onnx takes `images` float32 `(N, 1, H, W)` (ink `(255 - pixel) / 255`,
right-padded with zeros) and `widths` int64 `(N,)`, and gives `log_probs` float32 `(T, N, classes)`
(CTC, blank 0) and `lengths` int64 `(N,)`, batch and width dynamic.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from crnn.checkpoint import BUNDLE_FORMAT, BUNDLE_VERSION, CALIBRATION_FILE, MANIFEST
from crnn.config import config_yaml
from crnn.errors import CrnnError
from crnn.lm import NgramLM
from crnn.outputs import atomic_write, atomic_write_text

ONNX_TOLERANCE = 1e-4  # max |log-prob difference| between ONNX and PyTorch on valid frames
OPSET = 17


class ExportError(CrnnError):
    """The model could not be exported faithfully."""


class _Network(nn.Module):
    """The CRNN as ONNX sees it: (images, widths) -> (log_probs, lengths)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(images, widths)
        return output.log_probs, output.lengths


def export_onnx(model: nn.Module, path: Path, height: int) -> float:
    """Write `model` (eval mode, CPU) as ONNX with dynamic batch and width; returns the largest
    |log-prob| difference to PyTorch over the valid frames of a check batch of other widths than
    the traced one. ExportError above ONNX_TOLERANCE."""
    import onnxruntime

    network = _Network(model).eval()  # export restores the mode it finds: keep it eval
    traced = (torch.rand(2, 1, height, 256), torch.tensor([256, 192]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on LSTMs and data-dependent shapes
        torch.onnx.export(network, traced, str(path), dynamo=False, opset_version=OPSET,
                          input_names=["images", "widths"], output_names=["log_probs", "lengths"],
                          dynamic_axes={"images": {0: "lines", 3: "width"}, "widths": {0: "lines"},
                                        "log_probs": {0: "frames", 1: "lines"}, "lengths": {0: "lines"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, widths = torch.rand(3, 1, height, 448), torch.tensor([448, 300, 97])
    log_probs, lengths = session.run(None, {"images": images.numpy(), "widths": widths.numpy()})
    with torch.no_grad():
        expected = model(images, widths)
    if lengths.tolist() != expected.lengths.tolist():
        raise ExportError(f"the ONNX model's frame counts {lengths.tolist()} differ from PyTorch's "
                          f"{expected.lengths.tolist()}")
    difference = max(float((torch.from_numpy(log_probs[:length, i]) - expected.log_probs[:length, i]).abs().max())
                     for i, length in enumerate(lengths.tolist()))
    if difference > ONNX_TOLERANCE:
        raise ExportError(f"the ONNX model's log-probs differ from PyTorch's by up to {difference:.2e} "
                          f"(tolerance {ONNX_TOLERANCE:g})")
    return difference


def export_bundle(trained, out: Path, lm_texts: Sequence[str] | None) -> dict:
    """Write the bundle of `trained` (a `crnn.inference.TrainedModel`) to `out`; returns the manifest.
    `lm_texts`: the training texts for lm.arpa (else decode.lm_path's file is copied, if any)."""
    from safetensors.torch import save  # not save_file: it writes the file 0600, whatever the umask

    out.mkdir(parents=True, exist_ok=True)
    model = trained.model.cpu().eval()
    config = trained.config
    files = {"weights": "model.safetensors", "config": "config.yaml", "vocab": "vocab.json", "onnx": "model.onnx"}
    weights = save({name: tensor.contiguous() for name, tensor in model.state_dict().items()})
    atomic_write(out / files["weights"], lambda stream: stream.write(weights))
    atomic_write_text(out / files["vocab"], json.dumps({"blank": 0, "chars": trained.vocab.chars}, ensure_ascii=False))
    if config.decode.lm_path:  # an ARPA file or a KenLM binary: its suffix kept
        files["language_model"] = "lm" + (Path(config.decode.lm_path).suffix or ".arpa")
        shutil.copyfile(config.decode.lm_path, out / files["language_model"])
    elif lm_texts:
        files["language_model"] = "lm.arpa"
        NgramLM.estimate(lm_texts, config.decode.lm_order).write_arpa(out / "lm.arpa")
    if trained.calibration.fitted:
        files["calibration"] = CALIBRATION_FILE
        atomic_write_text(out / CALIBRATION_FILE, json.dumps(trained.calibration.to_dict(), indent=2))
    # the LM file's path is kept relative to the bundle; crnn.checkpoint.read_bundle resolves it
    lm_file = files.get("language_model", "")
    saved = dataclasses.replace(config, decode=dataclasses.replace(config.decode, lm_path=lm_file))
    atomic_write_text(out / files["config"], config_yaml(saved))
    difference = export_onnx(model, out / files["onnx"], config.data.height)
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "files": files, "opset": OPSET,
                "onnx_max_abs_log_prob_difference": difference, "onnx_tolerance": ONNX_TOLERANCE,
                "source_checkpoint": str(trained.path)}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
