"""A trained model ready to read lines: config (with data.*/decode.* overrides), vocab, model and
calibration, from a checkpoint or an export bundle. What evaluate, predict, calibrate and export share."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from PIL import Image

from crnn.calibration import Calibration, check_enough, fold_blocks, line_features
from crnn.checkpoint import read_model_file
from crnn.config import Config, config_from_dict, merge_overrides
from crnn.data import Preprocess, Vocab, build_dataset, build_loader, collate, load_records, make_sample
from crnn.data.direction import logical
from crnn.data.xml_pages import XmlPage, crop_lines, line_region, page_image, word_region
from crnn.decoding import (
    BeamDecoder,
    Decoder,
    Hypothesis,
    build_decoders,
    build_language_model,
    char_cuts,
    char_spans,
    word_ranges,
)
from crnn.device import resolve_device
from crnn.engine import evaluate
from crnn.errors import CheckpointError, ConfigError
from crnn.lm import read_texts
from crnn.metrics import ErrorCounts
from crnn.models import build_model
from crnn.outputs import atomic_write_text

OVERRIDABLE_SECTIONS = ("data", "decode")
TUNED_DECODE = "decode.yaml"  # in the run directory, from tools/evaluate.py --tune-lm


@dataclass
class Reading:
    """What `TrainedModel.read` gives for a line (see `reading`)."""

    text: str
    confidence_mean: float | None  # None: too narrow for one frame of the model, nothing read
    confidence_min: float | None
    characters: list[dict]  # {"char", "confidence", "x0", "x1"}, left to right, x in the image's pixels
    nbest: list[dict]  # {"text", "score"}, best first
    words: list[dict] = field(default_factory=list)  # {"text", "confidence", "x0", "x1"}, left to right
    # with a fitted calibration (else None): P(read exactly), expected character errors and CER
    p_exact: float | None = None
    expected_errors: float | None = None
    expected_cer: float | None = None
    width: int = 0  # at data.height, before data.max_width (`squeezed`: wider, so squeezed to it)
    squeezed: bool = False

    def to_dict(self) -> dict:
        confidence = {"mean": self.confidence_mean, "min": self.confidence_min}
        return {"text": self.text, "confidence": None if self.confidence_mean is None else confidence,
                "p_exact": self.p_exact, "expected_cer": self.expected_cer,
                "expected_errors": self.expected_errors,
                "squeezed_from": self.width if self.squeezed else None,
                "words": self.words, "characters": self.characters, "nbest": self.nbest}

    @property
    def line_confidence(self) -> float | None:
        """One number for the line (ALTO `WC`, PAGE `conf`): one minus its expected CER with a
        calibration, else the mean of its characters' confidences."""
        if self.expected_cer is not None:
            return round(min(max(1.0 - self.expected_cer, 0.0), 1.0), 4)
        return self.confidence_mean


def reading(log_probs: torch.Tensor, hypotheses: list[Hypothesis], vocab: Vocab, image_width: int,
            direction: str = "ltr") -> Reading:
    """One line's `Reading` from its log-probs `(T, C)` and its decoder's hypotheses (read left to
    right; in logical order for `direction`, `crnn.data.direction.logical`): each character with its
    confidence (`crnn.decoding.char_spans`) and its cut (`char_cuts`), each word with its
    characters' extent and mean confidence (docs/decoding.md); x in the image's pixels (frame t
    covers t/T to (t+1)/T of its width). The line's confidence: the mean and the minimum over its
    characters (read as empty: the mean posterior of its best path; without a frame: None)."""
    if not len(log_probs):
        return Reading("", None, None, [], [])
    best = hypotheses[0] if hypotheses else Hypothesis("", 0.0)
    spans = char_spans(log_probs, [vocab.index[char] for char in best.text], best.frames)
    pixel = image_width / len(log_probs)  # the width of a frame
    shown = [{"confidence": round(confidence, 4), "x0": round(start * pixel, 1),
              "x1": round(min(end * pixel, image_width), 1)}
             for (confidence, _, _), (start, end) in zip(spans, char_cuts(spans), strict=True)]
    text, order = logical(best.text, direction)
    characters = [{"char": char, **shown[index]} for char, index in zip(text, order, strict=True)]
    words = [{"text": text[first:last], "x0": min(c["x0"] for c in characters[first:last]),
              "x1": max(c["x1"] for c in characters[first:last]),
              "confidence": round(sum(c["confidence"] for c in characters[first:last]) / (last - first), 4)}
             for first, last in word_ranges(text)]
    confidences = [c["confidence"] for c in characters] or [float(log_probs.exp().max(dim=-1).values.mean())]
    nbest = [{"text": logical(h.text, direction)[0], "score": round(h.score, 4)} for h in hypotheses]
    return Reading(text, round(sum(confidences) / len(confidences), 4), round(min(confidences), 4),
                   characters, nbest, words=words)


def on_page(line: Reading, page_x: Callable[[float], float], region: list[tuple[float, float]]) -> None:
    """A reading of a page's line crop in the page's coordinates: its characters' and words' x
    (`page_x` of the crop's pixels), and each word's `polygon`, the line's `region` between its cuts."""
    for item in (*line.characters, *line.words):
        item["x0"], item["x1"] = round(page_x(item["x0"]), 1), round(page_x(item["x1"]), 1)
    for word in line.words:
        word["polygon"] = [[round(x, 1), round(y, 1)] for x, y in word_region(region, word["x0"], word["x1"])]


@dataclass
class TrainedModel:
    """A checkpoint's config (with overrides), vocab and model (eval mode, on `device`)."""

    config: Config
    vocab: Vocab
    model: nn.Module
    device: torch.device
    path: Path  # the checkpoint (in <run>/checkpoints/) or bundle
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
        return build_decoders(names, self.vocab, self.config.decode, self.lm_texts() if "beam_lm" in names else None)

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image], decoder: Decoder) -> list[Reading]:
        """Grayscale PIL line images, one padded batch -> a `Reading` of each. The decoder reads the
        network's log-probs; the confidences, p_exact and expected errors the calibrated ones."""
        preprocess = Preprocess.from_config(self.config.data)
        samples = [make_sample(i, image, "", self.vocab, preprocess, "predict") for i, image in enumerate(images)]
        batch = collate(samples, self.config.data.width_multiple).to(self.device)
        output = self.model(batch.images, batch.widths)
        log_probs, lengths = output.log_probs.float().cpu(), output.lengths.cpu()
        calibrated = self.calibration.scale(log_probs)
        direction = self.config.data.direction
        readings = [reading(calibrated[:length, i], hypotheses, self.vocab, image.width, direction)
                    for i, (image, hypotheses, length) in enumerate(zip(images, decoder.nbest(log_probs, lengths),
                                                                        lengths.tolist(), strict=True))]
        for line, image in zip(readings, images, strict=True):
            line.width = int(preprocess.natural_widths([image.size])[0])
            line.squeezed = line.width > preprocess.max_width
        if self.calibration.fitted:
            p_exact, errors = self.calibration.line_estimates(line_features(calibrated, lengths))
            for line, p, expected in zip(readings, p_exact.tolist(), errors.tolist(), strict=True):
                if line.confidence_mean is None:  # no frame: nothing the calibration could judge
                    continue
                line.p_exact, line.expected_errors = round(p, 4), round(expected, 3)
                line.expected_cer = round(expected / max(len(line.text) * self.calibration.length_ratio, 1.0), 4)
        return readings

    def read_page(self, page: XmlPage, decoder: Decoder, batch_size: int = 16) -> tuple[dict[str, Reading], list[str]]:
        """Every line of an ALTO / PAGE page, cropped as in training: (line id -> its `Reading`,
        problems of the lines that could not be cropped). DataError if the page image cannot be read."""
        xml = self.config.data.xml
        crops = crop_lines(page, page_image(page), (xml.baseline_above, xml.baseline_below), need_text=False)
        readings: dict[str, Reading] = {}
        for start in range(0, len(crops.crops), batch_size):
            chunk = slice(start, start + batch_size)
            readings.update(zip(crops.ids[chunk], self.read(crops.crops[chunk], decoder), strict=True))
        lines = {line.id: line for line in page.lines}
        for index, line_id in enumerate(crops.ids):
            on_page(readings[line_id], functools.partial(crops.page_x, index),
                    line_region(lines[line_id], (xml.baseline_above, xml.baseline_below)))
        return readings, crops.problems


def run_directory(checkpoint: Path) -> Path:
    """The run directory of a checkpoint in <run>/checkpoints/."""
    return checkpoint.resolve().parent.parent


def load_trained_model(path: str | Path, overrides: Sequence[str] = (), device: str = "auto") -> TrainedModel:
    """Config, vocab, weights and calibration from a checkpoint or export bundle; CheckpointError if
    it is neither. `overrides`: data.* / decode.* keys only (the model comes from the file); a
    checkpoint's run's tuned LM settings (<run>/decode.yaml) apply unless `overrides` set them
    (a bundle carries them in its config). `device`: a tool's --device (auto, cpu, cuda or cuda:N)."""
    path = Path(path)
    torch_device = resolve_device(device, key="--device")
    stored = read_model_file(path)
    for override in overrides:
        if override.split(".", 1)[0] not in OVERRIDABLE_SECTIONS:
            raise ConfigError(f"override '{override}': only data.* and decode.* keys can be changed "
                              f"here; the model and its training settings come from the checkpoint")
    tuned_file, tuned = run_directory(path) / TUNED_DECODE, {}
    if not stored.is_bundle and tuned_file.is_file():
        tuned = yaml.safe_load(tuned_file.read_text(encoding="utf-8")) or {}
    tuned_overrides = [f"decode.{key}={value}" for key, value in (tuned.get("decode") or {}).items()]
    config = config_from_dict(merge_overrides(stored.config, [*tuned_overrides, *overrides]),
                              f"{path} (its config + overrides)")
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
class Emissions:
    """A split's log-probs, read once and kept on the CPU to be decoded again (LM tuning, calibration)."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # log_probs (T, N, C), lengths (N,)
    references: list[str]
    where: str = ""  # "<split> split of <records>", for messages and the record

    @property
    def log_probs(self) -> list[torch.Tensor]:
        """Each line's log-probs `(T_i, C)`, in the order of the references."""
        return [log_probs[:length, i].clone() for log_probs, lengths in self.batches
                for i, length in enumerate(lengths.tolist())]


def labelled_lines(trained: TrainedModel, split: str, check: bool = True, folds: int = 0,
                   source: str | None = None) -> Emissions:
    """One float32 forward pass over a labelled split of `trained`'s data (all its sources, or the
    one named `source`); with `check`, DataError first if it has too few lines to fit a calibration
    on (or to cross-fit one over `folds` folds)."""
    data = trained.config.data
    records = load_records(data, split, source)
    if check:
        check_enough(len(records), f"data.{split}")
        if folds:
            fold_blocks(len(records), folds, f"data.{split}")
    loader = build_loader(data, build_dataset(data, records, trained.vocab, train=False), train=False)
    return collect_emissions(trained, loader, f"{split} split of {records.name}")


def collect_emissions(trained: TrainedModel, loader, where: str = "") -> Emissions:
    """One float32 forward pass over `loader`: every batch's log-probs and the lines' references."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        batches.append((log_probs.float().cpu(), lengths.cpu()))
        return [""] * len(lengths)

    result = evaluate(trained.model, loader, trained.device, {"keep": keep}, keep_predictions=True,
                      desc="forward pass")
    return Emissions(batches, [reference for _, reference, _ in result.predictions["keep"]], where)


def tune_language_model(trained: TrainedModel, emissions: Emissions, lm_weights: Sequence[float],
                        word_scores: Sequence[float]) -> list[dict]:
    """beam_lm's CER and WER for every (decode.lm_weight, decode.word_score) pair, best CER first
    (ties: lower WER). The LM is built once; only the weights change."""
    decode = trained.config.decode
    lm = build_language_model(trained.vocab, decode, trained.lm_texts())
    rows = []
    for lm_weight in lm_weights:
        for word_score in word_scores:
            decoder = BeamDecoder(trained.vocab, decode.beam_size, decode.beam_threshold, lm=lm, lm_weight=lm_weight,
                                  word_score=word_score)
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
