"""Sequence heads on the encoder's column features `(T, N, C)`: BiLSTM + linear, and the shortcut."""

from __future__ import annotations

import torch
import torch.nn as nn


def reversal_index(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """`(T, N)` index that reverses each line within its own length and leaves its padding in
    place; applying it twice gives the identity."""
    time = torch.arange(frames, device=lengths.device)[:, None]
    return torch.where(time < lengths[None, :], lengths[None, :] - 1 - time, time)


class BiLSTM(nn.Module):
    """A stacked bidirectional LSTM over `(T, N, C)` whose output for a line ignores the padding
    after it: the backward direction reads each line reversed within its own length, so it starts
    on the line's last column. (Packed sequences would too, but their CPU backward is many times slower.)"""

    def __init__(self, in_channels: int, hidden: int, layers: int, dropout: float = 0.0):
        super().__init__()
        sizes = [in_channels] + [2 * hidden] * (layers - 1)
        self.forward_layers = nn.ModuleList(nn.LSTM(size, hidden) for size in sizes)
        self.backward_layers = nn.ModuleList(nn.LSTM(size, hidden) for size in sizes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)`, lengths `(N,)` -> `(T, N, 2 * hidden)`."""
        index = reversal_index(lengths.to(features.device), features.shape[0])[..., None]
        for layer, forward in enumerate(self.forward_layers):
            if layer:
                features = self.dropout(features)
            ahead, _ = forward(features)
            behind, _ = self.backward_layers[layer](features.gather(0, index.expand_as(features)))
            behind = behind.gather(0, index.expand_as(behind))  # back in the line's order
            features = torch.cat([ahead, behind], dim=-1)
        return features


class BiLSTMHead(nn.Module):
    """BiLSTM over the columns, then dropout and a linear layer to the classes; with `layers=0`, a
    per-column linear classifier."""

    def __init__(self, in_channels: int, hidden: int, layers: int, num_classes: int,
                 dropout: float = 0.0, output_dropout: float = 0.0):
        super().__init__()
        self.lstm = None
        if layers > 0:
            self.lstm = BiLSTM(in_channels, hidden, layers, dropout)
            in_channels = 2 * hidden
        self.dropout = nn.Dropout(output_dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)`, lengths `(N,)` -> logits `(T, N, classes)`."""
        if self.lstm is not None:
            features = self.lstm(features, lengths)
        return self.classifier(self.dropout(features))


class ShortcutHead(nn.Module):
    """Retsinas et al. 2022: a 1x3 conv straight from the encoder columns to the classes, trained
    with its own CTC loss so the encoder learns character evidence early."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv1d(in_channels, num_classes, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)` -> logits `(T, N, classes)`."""
        return self.conv(self.dropout(features).permute(1, 2, 0)).permute(2, 0, 1)
