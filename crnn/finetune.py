"""Start a new run from a trained model: fine-tuning on a new hand.

    python tools/train.py --cfg experiments/finetune.yaml train.init_from=runs/base/checkpoints/best.pt \
        data.source=folder data.train=mine/train data.validation=mine/val

- `train.init_from`: a checkpoint (`best.pt`/`last.pt` of any run) or an export bundle. The run is
  new (its own directory, optimizer, schedule, epochs); its model keys (`model.*`) and
  `data.height` come from the starting model unless the YAML or the command line sets them, and
  setting one of its architecture keys to another value is an error naming the key. The run's
  config.yaml records the starting file and the SHA-256 of its weights (`train.init_sha256`; set
  by hand, it is checked). That config and the starting model are read once, by
  `crnn.config.load_run_config`; this module lays the model out for the new run.
- `train.init_vocab`: `union` (default) keeps every character of the starting model in the same
  output rows and adds the training data's new characters as new rows, which start improbable
  (zero weights, a bias far below the old ones') so they do not disturb the old ones; `new` makes
  the alphabet exactly the training data's, keeping the rows of the characters both share; `keep`
  keeps the starting alphabet, and characters outside it follow the rule of `crnn.data.samples`.
  Both CTC heads (BiLSTM and shortcut) and the attention decoder's classes are resized alike
  (`CRNN.CLASS_ROWS`). The training-only attention decoder (`model.attention_layers`) may be added
  or dropped: a new one starts from random weights.
- `train.freeze_encoder_steps=N`: the encoder learns nothing for the first N optimizer steps (its
  learning rate is 0, `crnn.optim`) and its BatchNorm statistics are held (`crnn.engine`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crnn.checkpoint import ModelFile
from crnn.data import Vocab


def initial_vocab(start: ModelFile, texts: list[str], mode: str) -> tuple[Vocab, str, str]:
    """The run's alphabet for `train.init_vocab`, and the characters added and dropped."""
    seen, old = Vocab.from_texts(texts), Vocab(start.chars)
    if mode == "keep":
        vocab = old
    elif mode == "new":
        vocab = seen
    else:
        vocab = Vocab(old.chars + [char for char in seen.chars if char not in old.index])
    added = "".join(char for char in vocab.chars if char not in old.index)
    dropped = "".join(char for char in old.chars if char not in vocab.index)
    return vocab, added, dropped


def starting_weights(start: ModelFile, vocab: Vocab, model: nn.Module) -> dict[str, torch.Tensor]:
    """The starting weights for `model` (built for `vocab`), with their per-class rows (the model's
    `CLASS_ROWS`) laid out for `vocab`: a character's learned row where the starting model has one,
    else zeros and a bias below every learned one (the new class starts improbable); the blank keeps
    row 0. Parts used in training only (the model's `TRAINING_ONLY` prefixes: the attention decoder)
    may differ between the two: `model`'s own fresh weights stand where the starting model has none
    of that shape, and the starting model's are dropped where `model` has none."""
    old_rows = Vocab(start.chars).index
    rows = [0] + [old_rows.get(char, -1) for char in vocab.chars]  # old row of each new class
    weights = dict(start.weights)
    for name in model.CLASS_ROWS:
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
    fresh = model.state_dict()
    for name in [name for name in weights if name.startswith(model.TRAINING_ONLY) and name not in fresh]:
        del weights[name]
    for name, value in fresh.items():
        if name.startswith(model.TRAINING_ONLY) and (name not in weights or weights[name].shape != value.shape):
            weights[name] = value
    return weights
