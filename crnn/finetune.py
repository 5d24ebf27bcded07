"""Start a new run from a trained model: fine-tuning on a new hand.

    python tools/train.py --cfg experiments/finetune.yaml train.init_from=runs/base/checkpoints/best.pt \
        data.source=folder data.train=mine/train data.validation=mine/val

- `train.init_from`: a checkpoint (`best.pt`/`last.pt` of any run) or an export bundle. The run is
  new (its own directory, optimizer, schedule, epochs); its model keys (`model.*`) and
  `data.height` come from the starting model unless the YAML or the command line sets them, and
  setting one of its architecture keys to another value is an error naming the key. The run's
  config.yaml records the starting file and the SHA-256 of its weights (`train.init_sha256`; set
  by hand, it is checked).
- `train.init_vocab`: `union` (default) keeps every character of the starting model in the same
  output rows and adds the training data's new characters as new rows, which start improbable
  (zero weights, a bias far below the old ones') so they do not disturb the old ones; `new` makes
  the alphabet exactly the training data's, keeping the rows of the characters both share; `keep`
  keeps the starting alphabet, and characters outside it follow the rule of `crnn.data.samples`.
  Both CTC heads (BiLSTM and shortcut) are resized alike (`CRNN.CLASS_ROWS`).
- `train.freeze_encoder_steps=N`: the encoder learns nothing for the first N optimizer steps (its
  learning rate is 0, `crnn.optim`) and its BatchNorm statistics are held (`crnn.engine`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from crnn.config import Config, ModelConfig, config_from_dict, load_config, raw_value
from crnn.data import Vocab
from crnn.errors import ConfigError
from crnn.export import read_model_file

# model keys that decide the network's structure or its weights' shapes (not dropout or loss weights)
ARCHITECTURE_KEYS = ("name", "stem_channels", "stem_kernel", "stem_stride", "stem_pool", "channels", "blocks",
                     "strides", "downsample", "column_pool", "frames", "lstm_layers", "lstm_hidden", "shortcut",
                     "shortcut_kernel")


@dataclass
class StartingPoint:
    """A trained model to start from: its config, alphabet and weights."""

    path: Path
    config: Config
    vocab: Vocab
    weights: dict[str, torch.Tensor]
    sha256: str  # of the weights' file


def read_starting_point(path_text: str) -> StartingPoint:
    """`train.init_from`: CheckpointError naming the file if it is missing, damaged or not ours."""
    path = Path(path_text).expanduser()
    stored = read_model_file(path, "train.init_from")
    digest = hashlib.sha256(stored.weights_file.read_bytes()).hexdigest()
    return StartingPoint(path, config_from_dict(stored.config, f"train.init_from {path}"), stored.vocab,
                         stored.weights, digest)


def starting_layer(point: StartingPoint) -> dict:
    """What the starting model decides unless the YAML or the command line says otherwise."""
    plain = point.config.to_dict()
    return {"model": plain["model"], "data": {"height": plain["data"]["height"]},
            "train": {"init_sha256": point.sha256}}


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """`load_config`, with the starting model's keys underneath when `train.init_from` is set;
    ConfigError naming an architecture key that the YAML or command line sets differently, or a
    `train.init_sha256` that does not match the file."""
    init_from = raw_value(path, overrides, "train.init_from")
    if not init_from:
        return load_config(path, overrides)
    point = read_starting_point(str(init_from))
    cfg = load_config(path, overrides, base=starting_layer(point))
    if cfg.train.init_sha256 != point.sha256:
        raise ConfigError(f"train.init_sha256: {point.path} is not the file this run started from (its weights' "
                          f"SHA-256 is {point.sha256[:16]}..., the config expects {cfg.train.init_sha256[:16]}...)")
    check_architecture(cfg.model, point)
    if cfg.data.height != point.config.data.height:
        raise ConfigError(f"'data.height' is {cfg.data.height} in the YAML or on the command line, but the model of "
                          f"train.init_from ({point.path}) was trained at {point.config.data.height}; remove it")
    return cfg


def check_architecture(model: ModelConfig, point: StartingPoint) -> None:
    for key in ARCHITECTURE_KEYS:
        mine, theirs = getattr(model, key), getattr(point.config.model, key)
        if mine != theirs:
            raise ConfigError(f"'model.{key}' is {mine!r} in the YAML or on the command line, but the model of "
                              f"train.init_from ({point.path}) has {theirs!r}: it cannot start from those weights. "
                              f"Remove model.{key} (its value then comes from the starting model)")


def initial_vocab(point: StartingPoint, texts: list[str], mode: str) -> tuple[Vocab, str, str]:
    """The run's alphabet for `train.init_vocab`, and the characters added and dropped."""
    seen = Vocab.from_texts(texts)
    if mode == "keep":
        vocab = point.vocab
    elif mode == "new":
        vocab = seen
    else:
        vocab = Vocab(point.vocab.chars + [char for char in seen.chars if char not in point.vocab.index])
    added = "".join(char for char in vocab.chars if char not in point.vocab.index)
    dropped = "".join(char for char in point.vocab.chars if char not in vocab.index)
    return vocab, added, dropped


def starting_weights(point: StartingPoint, vocab: Vocab, class_rows: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The starting weights with their per-class rows (`class_rows`) laid out for `vocab`: a
    character's learned row where the starting model has one, else zeros and a bias below every
    learned one (the new class starts improbable); the blank keeps row 0."""
    rows = [0] + [point.vocab.index.get(char, -1) for char in vocab.chars]  # old row of each new class
    weights = dict(point.weights)
    for name in class_rows:
        if name not in weights:
            continue
        old = weights[name]
        new = torch.zeros((len(rows), *old.shape[1:]), dtype=old.dtype)
        if name.endswith("bias"):
            new.fill_(float(old.min()) - 10.0)
        for row, old_row in enumerate(rows):
            if old_row >= 0:
                new[row] = old[old_row]
        weights[name] = new
    return weights
