"""A trained checkpoint, ready to decode: config (with data.*/decode.* overrides), vocab and
model. What tools/evaluate.py and tools/predict.py share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from PIL import Image

from crnn.calibration import Calibration, check_enough, line_features
from crnn.checkpoint import read_model_file
from crnn.config import Config, config_from_dict, merge_overrides
from crnn.data import Preprocess, Vocab, build_dataset, build_loader, collate, load_records, make_sample
from crnn.data.transforms import resized_size
from crnn.data.xml_pages import XmlPage, crop_lines, page_image
from crnn.decoding import BeamDecoder, Decoder, build_decoders, build_language_model
from crnn.device import resolve_device
from crnn.engine import evaluate
from crnn.errors import CheckpointError, ConfigError
from crnn.lm import read_texts
from crnn.metrics import ErrorCounts
from crnn.models import build_model
from crnn.outputs import atomic_write_text

OVERRIDABLE_SECTIONS = ("data", "decode")
TUNED_DECODE = "decode.yaml"  # in the run directory, from tools/evaluate.py --tune-lm


def config_with_overrides(config_dict: dict, overrides: Sequence[str], source: str) -> Config:
    """A checkpoint's config with `data.*` / `decode.*` overrides applied (the model is fixed)."""
    for override in overrides:
        if override.split(".", 1)[0] not in OVERRIDABLE_SECTIONS:
            raise ConfigError(f"override '{override}': only data.* and decode.* keys can be changed "
                              f"here; the model and its training settings come from the checkpoint")
    return config_from_dict(merge_overrides(config_dict, list(overrides)), f"{source} (its config + overrides)")


@dataclass
class TrainedModel:
    """A checkpoint's config (with overrides), vocab and model (eval mode, on `device`)."""

    config: Config
    vocab: Vocab
    model: nn.Module
    device: torch.device
    path: Path  # the checkpoint, in <run>/checkpoints/
    calibration: Calibration = field(default_factory=Calibration)  # the identity if none was fitted

    @property
    def train_texts_path(self) -> Path:
        """Where tools/train.py wrote the training transcriptions: <run>/train_texts.txt."""
        return run_directory(self.path) / "train_texts.txt"

    def lm_texts(self) -> list[str] | None:
        """The training texts beam_lm's LM is estimated from (None with decode.lm_path)."""
        if self.config.decode.lm_path:
            return None
        if not self.train_texts_path.is_file():
            raise ConfigError(
                f"the beam_lm decoder needs a character language model: pass --lm FILE (or "
                f"decode.lm_path=FILE), or keep the run's {self.train_texts_path} (written by "
                f"tools/train.py). Build a FILE with: python tools/build_lm.py TRAIN_TEXTS.txt|"
                f"TRAIN.parquet --out lm.arpa")
        return read_texts(self.train_texts_path)

    def decoders(self, names: Sequence[str]) -> dict[str, Decoder]:
        """`build_decoders`, with beam_lm's LM from decode.lm_path or else <run>/train_texts.txt."""
        lm_texts = self.lm_texts() if "beam_lm" in names else None
        return build_decoders(names, self.vocab, self.config.decode, lm_texts)

    @torch.no_grad()
    def forward(self, images: Sequence[Image.Image]):
        """Grayscale PIL line images, run as one padded batch `(N, 1, H, W)`: the model's output."""
        data = self.config.data
        preprocess = Preprocess.from_config(data)
        samples = [make_sample(i, image, "", self.vocab, preprocess, "predict") for i, image in enumerate(images)]
        batch = collate(samples, data.width_multiple).to(self.device)
        return self.model(batch.images, batch.widths), batch.images.shape[-1]

    def read(self, images: Sequence[Image.Image], decoder: Decoder) -> list[Reading]:
        """Grayscale PIL line images -> what the model reads in each, how sure it is and where
        each character sits (`Reading`); the decoder's n best readings (its `decode.nbest`). The
        decoder reads the network's log-probs; the confidences come from the calibrated ones, and
        with a fitted calibration each line gets its p_exact and expected errors."""
        output, _ = self.forward(images)
        log_probs, lengths = output.log_probs.float().cpu(), output.lengths.cpu()
        readings = []
        for i, (image, hypotheses) in enumerate(zip(images, decoder.nbest(log_probs, lengths), strict=True)):
            calibrated = self.calibration.scale(log_probs[: int(lengths[i]), i])
            line = reading(calibrated, hypotheses, self.vocab, self.content_width(image), image.width)
            if self.calibration.fitted:
                p_exact, errors = self.calibration.line_estimates(line_features(calibrated).unsqueeze(0))
                line.p_exact, line.expected_errors = round(float(p_exact[0]), 4), round(float(errors[0]), 3)
                line.expected_cer = round(float(errors[0]) / max(len(line.text) * self.calibration.length_ratio, 1.0), 4)
            readings.append(line)
        return readings

    def content_width(self, image: Image.Image) -> tuple[int, int]:
        """(columns the line's ink spans after preprocessing, columns of the ink tensor)."""
        data = self.config.data
        content = resized_size(*image.size, data.height, data.resize, data.width, data.max_width)[0]
        return content, (content if data.resize == "keep_aspect" else data.width)

    def read_page(self, page: XmlPage, decoder: Decoder, batch_size: int = 16) -> tuple[dict[str, Reading], list[str]]:
        """Every line of an ALTO / PAGE page, cropped as in training: (line id -> its `Reading`,
        problems of the lines that could not be cropped). DataError if the page image cannot be read."""
        xml = self.config.data.xml
        crops = crop_lines(page, page_image(page), (xml.baseline_above, xml.baseline_below), need_text=False)
        readings: dict[str, Reading] = {}
        for start in range(0, len(crops.crops), batch_size):
            chunk = slice(start, start + batch_size)
            readings.update(zip(crops.ids[chunk], self.read(crops.crops[chunk], decoder), strict=True))
        return readings, crops.problems


@dataclass
class Reading:
    """What `TrainedModel.read` gives for a line (see `reading`)."""

    text: str
    confidence_mean: float
    confidence_min: float
    characters: list[dict]  # {"char", "confidence", "x0", "x1"}, left to right
    nbest: list[dict]  # {"text", "score"}, best first
    # with a fitted calibration: the probability the line is read exactly, its expected character
    # errors and expected CER (None without one)
    p_exact: float | None = None
    expected_errors: float | None = None
    expected_cer: float | None = None

    def to_dict(self) -> dict:
        return {"text": self.text, "confidence": {"mean": self.confidence_mean, "min": self.confidence_min},
                "p_exact": self.p_exact, "expected_cer": self.expected_cer, "expected_errors": self.expected_errors,
                "characters": self.characters, "nbest": self.nbest}

    @property
    def line_confidence(self) -> float:
        """One number for the line, for ALTO `WC` and PAGE `conf`: one minus its expected CER with
        a calibration, else the mean of its characters' confidences."""
        if self.expected_cer is not None:
            return round(min(max(1.0 - self.expected_cer, 0.0), 1.0), 4)
        return self.confidence_mean


def reading(log_probs: torch.Tensor, hypotheses: list, vocab: Vocab, widths: tuple[int, int],
            image_width: int) -> Reading:
    """One line's `Reading` from its log-probs `(T, C)` and its decoder's hypotheses.

    A character's confidence is its posterior probability at its strongest frame among the run of
    frames around the one the decoder emitted it at where it stays the most probable class; its
    span is that run of frames, in the input image's pixels (frame t covers columns t*s to
    (t+1)*s of the preprocessed line, s = its width / its frames, scaled back to the image). The
    line's confidence is the mean and the minimum over its characters; a line read as empty gets
    the mean posterior of the best path over its frames instead.
    """
    best = hypotheses[0] if hypotheses else None
    posteriors, argmax = log_probs.exp(), log_probs.argmax(dim=-1)
    content, canvas = widths
    frames = max(len(log_probs), 1)
    per_frame, to_image = canvas / frames, image_width / max(content, 1)
    characters = []
    for char, frame in zip(best.text if best else "", best.frames if best else (), strict=True):
        label = vocab.index[char]
        first, last = frame, frame
        while first > 0 and argmax[first - 1] == label:
            first -= 1
        while last + 1 < len(argmax) and argmax[last + 1] == label:
            last += 1
        x0, x1 = (min(first * per_frame, content) * to_image, min((last + 1) * per_frame, content) * to_image)
        characters.append({"char": char, "confidence": round(float(posteriors[first:last + 1, label].max()), 4),
                           "x0": round(x0, 1), "x1": round(x1, 1)})
    confidences = [c["confidence"] for c in characters] or [float(posteriors.max(dim=-1).values.mean())]
    return Reading(best.text if best else "", round(sum(confidences) / len(confidences), 4), round(min(confidences), 4),
                   characters, [{"text": h.text, "score": round(h.score, 4)} for h in hypotheses])


def run_directory(checkpoint: Path) -> Path:
    """The run directory of a checkpoint in <run>/checkpoints/."""
    return checkpoint.resolve().parent.parent


def tuned_overrides(checkpoint: Path) -> list[str]:
    """decode.* overrides that `tools/evaluate.py --tune-lm` chose for this run (<run>/decode.yaml)."""
    path = run_directory(checkpoint) / TUNED_DECODE
    if not path.is_file():
        return []
    tuned = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return [f"decode.{key}={value}" for key, value in (tuned.get("decode") or {}).items()]


def load_trained_model(path: str | Path, overrides: Sequence[str] = (), device: str = "auto") -> TrainedModel:
    """Config, vocab and weights from a crnn checkpoint or export bundle
    (`crnn.checkpoint.read_model_file`); CheckpointError if it is neither. A checkpoint's run's
    tuned LM settings (<run>/decode.yaml) apply unless `overrides` set them otherwise (a bundle
    carries them in its config). `device`: a tool's --device (auto, cpu, cuda or cuda:N)."""
    path = Path(path)
    torch_device = resolve_device(device, key="--device")
    stored = read_model_file(path)
    tuned = [] if stored.is_bundle else tuned_overrides(path)
    config = config_with_overrides(stored.config, [*tuned, *overrides], str(path))
    vocab = Vocab(stored.chars)
    model = build_model(config.model, len(vocab))
    try:
        model.load_state_dict(stored.weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the model of its own config "
                              f"({str(err).splitlines()[0]})") from None
    return TrainedModel(config, vocab, model.to(torch_device).eval(), torch_device, path,
                        Calibration.from_dict(stored.calibration))


@dataclass
class LabelledLines:
    """A labelled split read once by the model: each line's log-probs `(T_i, C)` and reference."""

    log_probs: list[torch.Tensor]
    references: list[str]
    where: str  # "<split> split of <records>", for messages and the record


def labelled_lines(trained: TrainedModel, split: str) -> LabelledLines:
    """One forward pass over a labelled split of `trained`'s config's data; DataError if it has
    fewer than MIN_LINES usable lines."""
    data = trained.config.data
    records = load_records(data, split)
    check_enough(len(records), f"data.{split}")
    loader = build_loader(data, build_dataset(data, records, trained.vocab, train=False), train=False)
    emissions = collect_emissions(trained, loader)
    return LabelledLines(emissions.lines(), emissions.references, f"{split} split of {records.name}")


@dataclass
class Emissions:
    """A split's log-probs, kept on the CPU to be decoded again and again (LM tuning)."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # log_probs (T, N, C), lengths (N,)
    references: list[str]

    def lines(self) -> list[torch.Tensor]:
        """Each line's log-probs `(T_i, C)`, in the order of the references."""
        return [log_probs[:length, i].clone() for log_probs, lengths in self.batches
                for i, length in enumerate(lengths.tolist())]


def collect_emissions(trained: TrainedModel, loader) -> Emissions:
    """One forward pass over `loader`: every batch's log-probs and the lines' references."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        batches.append((log_probs.float().cpu(), lengths.cpu()))
        return [""] * len(lengths)

    result = evaluate(trained.model, loader, trained.device, {"keep": keep}, keep_predictions=True,
                      desc="forward pass")
    return Emissions(batches, [reference for _, reference, _ in result.predictions["keep"]])


def tune_language_model(trained: TrainedModel, emissions: Emissions, lm_weights: Sequence[float],
                        word_scores: Sequence[float]) -> list[dict]:
    """beam_lm's CER and WER for every (decode.lm_weight, decode.word_score) pair, best CER first
    (ties: lower WER). The LM is built once; only the weights change."""
    decode = trained.config.decode
    lm, to_natural_log = build_language_model(trained.vocab, decode, trained.lm_texts())
    rows = []
    for lm_weight in lm_weights:
        for word_score in word_scores:
            decoder = BeamDecoder(trained.vocab, decode.beam_size, decode.beam_threshold, decode.beam_size_token,
                                  lm=lm, lm_weight=lm_weight * to_natural_log, word_score=word_score)
            counts = ErrorCounts()
            counts.update(emissions.references, [text for log_probs, lengths in emissions.batches
                                                 for text in decoder(log_probs, lengths)])
            rows.append({"lm_weight": lm_weight, "word_score": word_score, "cer": counts.cer, "wer": counts.wer})
    return sorted(rows, key=lambda row: (row["cer"], row["wer"]))


def save_tuned(trained: TrainedModel, best: dict) -> Path:
    """Write the chosen pair to <run>/decode.yaml, where evaluate and predict pick it up."""
    path = run_directory(trained.path) / TUNED_DECODE
    tuned = {"decode": {"lm_weight": best["lm_weight"], "word_score": best["word_score"]}}
    atomic_write_text(path, "# chosen by tools/evaluate.py --tune-lm (validation CER "
                            f"{best['cer']:.4f}); command-line decode.* overrides win\n" + yaml.safe_dump(tuned))
    return path
