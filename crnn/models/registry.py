"""Model registry: `model.name` in the config picks a builder, no `eval`, no import strings."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from crnn.config import ModelConfig
from crnn.errors import ConfigError

MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {}


def register_model(name: str):
    def register(builder: Callable[[ModelConfig, int], nn.Module]):
        if name in MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        MODELS[name] = builder
        return builder

    return register


def check_model_name(name: str) -> None:
    """ConfigError unless `model.name` is registered."""
    if name not in MODELS:
        raise ConfigError(f"'model.name' is '{name}'; registered models: {', '.join(sorted(MODELS))}")


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build `cfg.name` for `num_classes` classes (blank included)."""
    check_model_name(cfg.name)
    return MODELS[cfg.name](cfg, num_classes)
