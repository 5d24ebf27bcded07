"""Start a new run from a trained model: fine-tuning on a new hand.

    python tools/train.py --cfg experiments/finetune.yaml train.init_from=runs/base/checkpoints/best.pt \
        data.source=folder data.train=mine/train data.validation=mine/val

What the keys do: docs/finetune.md. `load_run_config` reads `train.init_from` once and lays its
model keys, `data.height`, `data.normalization` and `data.direction` under the YAML;
`initial_vocab` and `starting_weights` carry out `train.init_vocab` on both CTC heads
(`CRNN.CLASS_ROWS`); `train.freeze_encoder_steps` lives in crnn.optim (LR 0) and crnn.trainer
(BatchNorm held).
"""

from __future__ import annotations

import unicodedata
from operator import attrgetter
from pathlib import Path

import torch
import torch.nn as nn

from crnn.checkpoint import ModelFile, read_model_file
from crnn.config import Config, DataConfig, architecture_changes, config_from_dict, load_config, raw_value
from crnn.data import Vocab
from crnn.errors import ConfigError


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, ModelFile | None]:
    """A training run's config, and the model `train.init_from` names (None without one)."""
    init_from = raw_value(path, overrides, "train.init_from")
    if not init_from:
        return load_config(path, overrides), None
    start = read_model_file(Path(str(init_from)), "train.init_from")
    theirs = config_from_dict(start.config, f"train.init_from {start.path}")
    data = {"height": theirs.data.height, "normalization": theirs.data.normalization, "direction": theirs.data.direction}
    base = {"model": theirs.to_dict()["model"], "data": data}
    cfg = load_config(path, overrides, base=base)
    changed = architecture_changes(cfg.model, theirs.model)
    if cfg.data.height != theirs.data.height:
        changed.append("data.height")
    if changed:
        key = changed[0]
        value = attrgetter(key)  # of the dotted key, in a Config
        raise ConfigError(f"'{key}' is {value(cfg)!r} in the YAML or on the command line, but the model of "
                          f"train.init_from ({start.path}) has {value(theirs)!r}: it cannot start from those "
                          f"weights. Remove {key} (its value then comes from the starting model)")
    return cfg, start


def normalization_change(start: ModelFile, data_cfg: DataConfig) -> str:
    """What a `data.normalization` other than the starting model's does to its alphabet ("" if the
    same): the starting characters the new form changes are in no text it trains on."""
    theirs = config_from_dict(start.config, str(start.path)).data.normalization
    if theirs == data_cfg.normalization:
        return ""
    form = data_cfg.normalization
    changed = [char for char in start.chars if form != "none" and unicodedata.normalize(form, char) != char]
    return (f"data.normalization={data_cfg.normalization}, but train.init_from's model read {theirs} text: "
            f"{len(changed)} of its characters change in {data_cfg.normalization} ({''.join(changed)!r}) and "
            f"no text holds them any more; their classes keep what they learned, new ones start from zero")


def initial_vocab(start: ModelFile, texts: list[str], mode: str) -> tuple[Vocab, str, str]:
    """The run's alphabet for `train.init_vocab`, and the characters added and dropped."""
    seen, old = Vocab.from_texts(texts), Vocab(start.chars)
    union = Vocab(old.chars + [char for char in seen.chars if char not in old.index])
    vocab = {"union": union, "new": seen, "keep": old}[mode]
    added = "".join(char for char in vocab.chars if char not in old.index)
    dropped = "".join(char for char in old.chars if char not in vocab.index)
    return vocab, added, dropped


def starting_weights(start: ModelFile, vocab: Vocab, model: nn.Module) -> dict[str, torch.Tensor]:
    """The starting weights for `model` (built for `vocab`), its `CLASS_ROWS` laid out for `vocab`: a
    character's learned row where the starting model has one, else zeros and a bias below every
    learned one (a new class starts improbable); the blank keeps row 0."""
    old_rows = Vocab(start.chars).index
    rows = torch.tensor([0] + [old_rows.get(char, -1) for char in vocab.chars])  # old row of each new class
    known = rows >= 0
    weights = dict(start.weights)
    for name in model.CLASS_ROWS:
        if name not in weights:
            continue
        old = weights[name]
        new = torch.zeros((len(rows), *old.shape[1:]), dtype=old.dtype)
        if name.endswith("bias"):
            new.fill_(float(old.min()) - 10.0)
        new[known] = old[rows[known]]
        weights[name] = new
    return weights
