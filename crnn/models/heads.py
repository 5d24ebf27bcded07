"""Sequence heads on the encoder's column features `(T, N, C)`: BiLSTM + linear, the shortcut, and
the training-only attention decoder."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def reversal_index(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """`(T, N)` index that reverses each line within its own length and leaves its padding in
    place; applying it twice gives the identity."""
    time = torch.arange(frames, device=lengths.device)[:, None]
    return torch.where(time < lengths[None, :], lengths[None, :] - 1 - time, time)


class BiLSTM(nn.Module):
    """A stacked bidirectional LSTM over `(T, N, C)` whose output for a line ignores the padding
    after it: the forward direction reaches the padding only after the line, and the backward
    direction reads each line reversed within its own length, so it starts on the line's last
    column rather than on padding.

    (Packed sequences would do the same, but on the CPU their backward pass is many times slower.)
    """

    def __init__(self, in_channels: int, hidden: int, layers: int, dropout: float = 0.0):
        super().__init__()
        sizes = [in_channels] + [2 * hidden] * (layers - 1)
        self.forward_layers = nn.ModuleList(nn.LSTM(size, hidden) for size in sizes)
        self.backward_layers = nn.ModuleList(nn.LSTM(size, hidden) for size in sizes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)`, lengths `(N,)` -> `(T, N, 2 * hidden)`."""
        index = reversal_index(lengths.to(features.device), features.shape[0])[..., None]
        for layer, (forward, backward) in enumerate(zip(self.forward_layers, self.backward_layers, strict=True)):
            if layer:
                features = self.dropout(features)
            ahead, _ = forward(features)
            reversed_features = features.gather(0, index.expand_as(features))
            behind, _ = backward(reversed_features)
            behind = behind.gather(0, index.expand_as(behind))
            features = torch.cat([ahead, behind], dim=-1)
        return features


class BiLSTMHead(nn.Module):
    """BiLSTM over the columns, then dropout and a linear layer to the classes.

    A line's output does not depend on the padding after it (see BiLSTM). With `layers=0` it is a
    per-column linear classifier.
    """

    def __init__(self, in_channels: int, hidden: int, layers: int, num_classes: int,
                 dropout: float = 0.0, output_dropout: float = 0.0):
        super().__init__()
        self.lstm = None
        if layers > 0:
            self.lstm = BiLSTM(in_channels, hidden, layers, dropout)
            in_channels = 2 * hidden
        self.out_channels = in_channels  # of `encode`'s features
        self.dropout = nn.Dropout(output_dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)`, lengths `(N,)` -> what the classifier reads `(T, N, out_channels)`."""
        return features if self.lstm is None else self.lstm(features, lengths)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """`encode`'s features -> logits `(T, N, classes)`."""
        return self.classifier(self.dropout(features))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)`, lengths `(N,)` -> logits `(T, N, classes)`."""
        return self.classify(self.encode(features, lengths))


class ShortcutHead(nn.Module):
    """Retsinas et al. 2022: a 1xK conv straight from the encoder columns to the classes, trained
    with its own CTC loss so the encoder learns character evidence early."""

    def __init__(self, in_channels: int, num_classes: int, kernel: int = 3, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv1d(in_channels, num_classes, kernel, padding=kernel // 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)` -> logits `(T, N, classes)`."""
        return self.conv(self.dropout(features).permute(1, 2, 0)).permute(2, 0, 1)


def sinusoids(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """`(length, dim)` sinusoidal position encodings (Vaswani et al. 2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)[:, : dim // 2]
    return table


class AttentionDecoder(nn.Module):
    """A Transformer decoder taught the text from the sequence head's features, for training only
    (joint CTC-attention training, Kim et al. 2017; the training-only attention heads of recent
    OCR recipes): its cross-entropy reaches the shared BiLSTM and encoder, whose features must then
    serve an autoregressive reader as well as CTC. The blank class (0) is its start and end token.

    `targets` `(N, L)`: each line's classes, right-padded with 0. The decoder reads `[0, c1 .. cL]`
    (teacher forcing, causal) and is taught `[c1 .. cL, 0]`; positions after a line's end token
    see only earlier ones, so they need no mask (`labels` marks them ignored).
    """

    IGNORE = -100  # label of positions after a line's end token (cross-entropy's ignore_index)

    def __init__(self, in_channels: int, num_classes: int, dim: int, layers: int, heads: int,
                 dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.memory = nn.Linear(in_channels, dim)
        self.embed = nn.Embedding(num_classes, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)`, lengths `(N,)` (valid frames), targets `(N, L)` -> logits
        `(L + 1, N, classes)`."""
        device = features.device
        inputs = nn.functional.pad(targets.to(device), (1, 0)).T  # (L + 1, N): the start token, then the text
        steps = inputs.shape[0]
        queries = self.embed(inputs) * math.sqrt(self.dim) + sinusoids(steps, self.dim, device)[:, None]
        padding = torch.arange(features.shape[0], device=device)[None] >= lengths.to(device)[:, None]  # (N, T)
        causal = nn.Transformer.generate_square_subsequent_mask(steps, device=device)
        hidden = self.layers(queries, self.memory(features), tgt_mask=causal, tgt_is_causal=True,
                             memory_key_padding_mask=padding)
        return self.classifier(hidden)

    @classmethod
    def labels(cls, targets: torch.Tensor) -> torch.Tensor:
        """What the decoder is taught at each of its `L + 1` positions, `(N, L + 1)`: the text, the
        end token (0), then IGNORE."""
        lengths = (targets != 0).sum(1, keepdim=True)
        labels = nn.functional.pad(targets, (0, 1))
        position = torch.arange(labels.shape[1], device=targets.device)[None]
        return labels.masked_fill(position > lengths, cls.IGNORE)
