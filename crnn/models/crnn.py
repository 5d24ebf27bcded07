"""The CRNN: ResNet encoder -> column pooling -> BiLSTM head (+ optional CTC shortcut head)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from crnn.config import ModelConfig
from crnn.models.encoder import ResNetEncoder
from crnn.models.heads import AttentionDecoder, BiLSTMHead, ShortcutHead
from crnn.models.registry import register_model


class CRNNOutput(NamedTuple):
    log_probs: torch.Tensor  # (T, N, classes), float32
    lengths: torch.Tensor  # (N,) valid frames per line, on the images' device
    shortcut_log_probs: torch.Tensor | None  # (T, N, classes) or None
    attention_logits: torch.Tensor | None = None  # (L + 1, N, classes): the attention decoder's, in training


class CRNN(nn.Module):
    """`(N, 1, H, W)` ink images + their unpadded widths `(N,)` -> per-frame class log-probs.

    Columns are pooled over the height (`column_pool` max or avg), or, with `frames` > 0, the
    feature map is average-pooled to exactly `frames` columns (for fixed-width inputs). With
    `upsample` > 1 each column becomes that many frames, each its own linear map of the column (a
    transposed convolution of kernel and stride `upsample`), before the BiLSTM and the shortcut head.
    """

    # the parameters with one row (dim 0) per class: what a new alphabet resizes (crnn/finetune.py)
    CLASS_ROWS = ("head.classifier.weight", "head.classifier.bias", "shortcut.conv.weight", "shortcut.conv.bias",
                  "attention.embed.weight", "attention.classifier.weight", "attention.classifier.bias")
    # the parameters' name prefixes of parts used in training only, which a run may add or drop when
    # it starts from another model's weights (crnn.finetune)
    TRAINING_ONLY = ("attention.",)

    def __init__(self, encoder: ResNetEncoder, head: BiLSTMHead, shortcut: ShortcutHead | None,
                 column_pool: str = "max", frames: int = 0, span_mask: float = 0.0, span_length: int = 4,
                 attention: AttentionDecoder | None = None, upsample: int = 1):
        super().__init__()
        self.encoder, self.head, self.shortcut, self.attention = encoder, head, shortcut, attention
        self.column_pool, self.frames = column_pool, frames
        self.span_mask, self.span_length = span_mask, span_length
        channels = encoder.out_channels
        self.upsample = nn.ConvTranspose1d(channels, channels, upsample, stride=upsample) if upsample > 1 else None

    def output_lengths(self, widths: torch.Tensor) -> torch.Tensor:
        lengths = torch.full_like(widths, self.frames) if self.frames else self.encoder.output_widths(widths)
        return lengths * self.upsample.stride[0] if self.upsample is not None else lengths

    def columns(self, features: torch.Tensor) -> torch.Tensor:
        """`(N, C, H', W')` -> `(T, N, C)`."""
        if self.frames:
            columns = F.adaptive_avg_pool2d(features, (1, self.frames)).squeeze(2)
        elif self.column_pool == "max":
            columns = features.amax(dim=2)
        else:
            columns = features.mean(dim=2)
        if self.upsample is not None:  # (N, C, W') -> (N, C, W' * upsample)
            columns = self.upsample(columns)
        return columns.permute(2, 0, 1)

    def forward(self, images: torch.Tensor, widths: torch.Tensor, with_shortcut: bool | None = None,
                targets: torch.Tensor | None = None) -> CRNNOutput:
        """The shortcut head runs in training mode, or when `with_shortcut=True`; the attention
        decoder in training mode when given the `targets` it is taught, `(N, L)` classes
        right-padded with 0 (`Batch.padded_targets`).

        `widths` may be on any device: they are moved to the images' here, the one place, so the
        lengths and everything derived from them (the BiLSTM's reversal index) live there too."""
        widths = widths.to(images.device, non_blocking=True)
        columns = self.columns(self.encoder(images))
        lengths = self.output_lengths(widths).clamp(max=columns.shape[0])
        sequence = mask_spans(columns, lengths, self.span_mask, self.span_length) if self.training else columns
        features = self.head.encode(sequence, lengths)
        log_probs = self.head.classify(features).float().log_softmax(-1)
        shortcut_log_probs = attention_logits = None
        if self.shortcut is not None and (self.training if with_shortcut is None else with_shortcut):
            shortcut_log_probs = self.shortcut(columns).float().log_softmax(-1)
        if self.attention is not None and self.training and targets is not None:
            attention_logits = self.attention(features, lengths, targets)
        return CRNNOutput(log_probs, lengths, shortcut_log_probs, attention_logits)


def mask_spans(columns: torch.Tensor, lengths: torch.Tensor, share: float, span: int) -> torch.Tensor:
    """`columns` `(T, N, C)` with spans of `span` frames set to zero, about `share` of each line's
    `lengths` frames (spans may overlap), so that the sequence head learns to read a character
    from its context (span masking, as in HTR-VT). `share` 0 returns `columns` as they are."""
    count = torch.round(lengths.float() * share / span).long()  # spans per line
    spans = int(count.max()) if share > 0 and len(lengths) else 0
    if spans == 0:
        return columns
    device = columns.device
    room = (lengths - span + 1).clamp(min=1).to(device)
    starts = (torch.rand(len(lengths), spans, device=device) * room[:, None]).long()  # (N, spans)
    used = torch.arange(spans, device=device)[None] < count.to(device)[:, None]
    frames = torch.arange(columns.shape[0], device=device)[:, None, None]  # (T, 1, 1)
    hit = (frames >= starts) & (frames < starts + span) & used  # (T, N, spans)
    return columns.masked_fill(hit.any(-1)[..., None], 0.0)


@register_model("crnn")
def build_crnn(cfg: ModelConfig, num_classes: int) -> CRNN:
    encoder = ResNetEncoder(
        1, cfg.stem_channels, tuple(cfg.stem_kernel), tuple(cfg.stem_stride), cfg.stem_pool,
        cfg.channels, cfg.blocks, [tuple(s) for s in cfg.strides], cfg.downsample,
    )
    head = BiLSTMHead(encoder.out_channels, cfg.lstm_hidden, cfg.lstm_layers, num_classes,
                      cfg.lstm_dropout, cfg.head_dropout)
    shortcut = None
    if cfg.shortcut:
        shortcut = ShortcutHead(encoder.out_channels, num_classes, cfg.shortcut_kernel, cfg.shortcut_dropout)
    attention = None
    if cfg.attention_layers:
        attention = AttentionDecoder(head.out_channels, num_classes, cfg.attention_dim, cfg.attention_layers,
                                     cfg.attention_heads)
    return CRNN(encoder, head, shortcut, cfg.column_pool, cfg.frames, cfg.span_mask, cfg.span_length, attention,
                cfg.upsample)
