"""A trained checkpoint, ready to decode: config (with data.*/decode.* overrides), vocab and
model. What tools/evaluate.py and tools/predict.py share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from crnn.checkpoint import load_checkpoint
from crnn.config import Config, config_from_dict, merge_overrides
from crnn.data import Preprocess, Vocab, collate, make_sample
from crnn.data.xml_pages import XmlPage, crop_lines, page_image
from crnn.decoding import Decoder, build_decoders
from crnn.distributed import resolve_device
from crnn.errors import CheckpointError, ConfigError
from crnn.lm import read_texts
from crnn.models import build_model

OVERRIDABLE_SECTIONS = ("data", "decode")


def config_with_overrides(config_dict: dict, overrides: Sequence[str], source: str) -> Config:
    """A checkpoint's config with `data.*` / `decode.*` overrides applied (the model is fixed)."""
    for override in overrides:
        if override.split(".", 1)[0] not in OVERRIDABLE_SECTIONS:
            raise ConfigError(f"override '{override}': only data.* and decode.* keys can be changed "
                              f"here; the model and its training settings come from the checkpoint")
    return config_from_dict(merge_overrides(config_dict, list(overrides)), f"{source} (its config + overrides)")


def inference_device(name: str) -> torch.device:
    """`--device`: auto (CUDA if present), cpu, cuda or cuda:N."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return resolve_device(name)


@dataclass
class TrainedModel:
    """A checkpoint's config (with overrides), vocab and model (eval mode, on `device`)."""

    config: Config
    vocab: Vocab
    model: nn.Module
    device: torch.device
    path: Path  # the checkpoint, in <run>/checkpoints/

    @property
    def train_texts_path(self) -> Path:
        """Where tools/train.py wrote the training transcriptions: <run>/train_texts.txt."""
        return self.path.resolve().parent.parent / "train_texts.txt"

    def decoders(self, names: Sequence[str]) -> dict[str, Decoder]:
        """`build_decoders`, with beam_lm's LM from decode.lm_path or else <run>/train_texts.txt."""
        lm_texts = None
        if "beam_lm" in names and not self.config.decode.lm_path:
            if not self.train_texts_path.is_file():
                raise ConfigError(
                    f"the beam_lm decoder needs a character language model: pass --lm FILE (or "
                    f"decode.lm_path=FILE), or keep the run's {self.train_texts_path} (written by "
                    f"tools/train.py). Build a FILE with: python tools/build_lm.py TRAIN_TEXTS.txt|"
                    f"TRAIN.parquet --out lm.arpa")
            lm_texts = read_texts(self.train_texts_path)
        return build_decoders(names, self.vocab, self.config.decode, lm_texts)

    @torch.no_grad()
    def transcribe(self, images: Sequence[Image.Image], decoder: Decoder) -> list[str]:
        """Grayscale PIL line images -> texts, run as one padded batch `(N, 1, H, W)`."""
        data = self.config.data
        preprocess = Preprocess.from_config(data)
        samples = [make_sample(i, image, "", self.vocab, preprocess, "predict") for i, image in enumerate(images)]
        batch = collate(samples, data.width_multiple).to(self.device)
        output = self.model(batch.images, batch.widths)
        return decoder(output.log_probs, output.lengths)


    def transcribe_page(self, page: XmlPage, decoder: Decoder, batch_size: int = 16) -> tuple[dict[str, str], list[str]]:
        """Every line of an ALTO / PAGE page, cropped as in training: (line id -> text, problems
        of the lines that could not be cropped). DataError if the page image cannot be read."""
        xml = self.config.data.xml
        crops = crop_lines(page, page_image(page), (xml.baseline_above, xml.baseline_below), need_text=False)
        texts: dict[str, str] = {}
        for start in range(0, len(crops.crops), batch_size):
            chunk = slice(start, start + batch_size)
            texts.update(zip(crops.ids[chunk], self.transcribe(crops.crops[chunk], decoder), strict=True))
        return texts, crops.problems


def load_trained_model(path: str | Path, overrides: Sequence[str] = (), device: str = "auto") -> TrainedModel:
    """Config, vocab and weights from a crnn checkpoint; CheckpointError if it is not one."""
    path = Path(path)
    state = load_checkpoint(path)
    missing = [key for key in ("model", "config", "vocab") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: a crnn checkpoint without {', '.join(missing)}; use a "
                              f"checkpoint written by tools/train.py (checkpoints/best.pt or last.pt)")
    config = config_with_overrides(state["config"], overrides, str(path))
    vocab = Vocab(state["vocab"])
    model = build_model(config.model, len(vocab))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the model of its own config "
                              f"({str(err).splitlines()[0]})") from None
    torch_device = inference_device(device)
    return TrainedModel(config, vocab, model.to(torch_device).eval(), torch_device, path)
