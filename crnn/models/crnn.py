"""The CRNN: ResNet encoder -> column max-pool -> BiLSTM head (+ the CTC shortcut head)."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn as nn

from crnn.config import ModelConfig
from crnn.models.encoder import ResNetEncoder
from crnn.models.heads import BiLSTMHead, ShortcutHead


class CRNNOutput(NamedTuple):
    log_probs: torch.Tensor  # (T, N, classes), float32
    lengths: torch.Tensor  # (N,) valid frames per line, on the images' device
    shortcut_log_probs: torch.Tensor | None  # (T, N, classes) or None


class CRNN(nn.Module):
    """`(N, 1, H, W)` ink images + their unpadded widths `(N,)` -> per-frame class log-probs; the
    encoder's columns are max-pooled over the height."""

    # the parameters with one row (dim 0) per class: what a new alphabet resizes (crnn/finetune.py)
    CLASS_ROWS = ("head.classifier.weight", "head.classifier.bias",
                  "shortcut.conv.weight", "shortcut.conv.bias")

    def __init__(self, encoder: ResNetEncoder, head: BiLSTMHead, shortcut: ShortcutHead | None):
        super().__init__()
        self.encoder, self.head, self.shortcut = encoder, head, shortcut

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes the weights of earlier versions, whose encoder blocks named their projection
        `shortcut` (torchvision's BasicBlock names it `downsample`)."""
        state_dict = {re.sub(r"^(encoder\.layers\.\d+)\.shortcut\.", r"\1.downsample.", name): value
                      for name, value in state_dict.items()}
        return super().load_state_dict(state_dict, strict, assign)

    def output_lengths(self, widths: torch.Tensor) -> torch.Tensor:
        """Frames of each line from its unpadded width, on `widths`' device."""
        for kernel, stride, padding in self.encoder.width_ops:  # each one's output size, floor mode
            widths = torch.div(widths + 2 * padding - kernel, stride, rounding_mode="floor") + 1
        return widths

    def forward(self, images: torch.Tensor, widths: torch.Tensor,
                with_shortcut: bool | None = None) -> CRNNOutput:
        """The shortcut head runs in training mode, or when `with_shortcut=True`. `widths` may be on any
        device: they move to the images' here, the one place, so the lengths live there too."""
        widths = widths.to(images.device, non_blocking=True)
        columns = self.encoder(images).amax(dim=2).permute(2, 0, 1)  # (T, N, C)
        lengths = self.output_lengths(widths).clamp(max=columns.shape[0])
        log_probs = self.head(columns, lengths).float().log_softmax(-1)
        shortcut_log_probs = None
        if self.shortcut is not None and (self.training if with_shortcut is None else with_shortcut):
            shortcut_log_probs = self.shortcut(columns).float().log_softmax(-1)
        return CRNNOutput(log_probs, lengths, shortcut_log_probs)


def build_model(cfg: ModelConfig, num_classes: int) -> CRNN:
    """The CRNN of `cfg` for `num_classes` classes (blank included)."""
    encoder = ResNetEncoder(cfg.stem_channels, cfg.stem_stride, cfg.channels, cfg.blocks, cfg.strides)
    head = BiLSTMHead(encoder.out_channels, cfg.lstm_hidden, cfg.lstm_layers, num_classes,
                      cfg.lstm_dropout, cfg.head_dropout)
    shortcut = ShortcutHead(encoder.out_channels, num_classes, cfg.shortcut_dropout) if cfg.shortcut else None
    return CRNN(encoder, head, shortcut)
