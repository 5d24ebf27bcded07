"""Sequence heads on the encoder's column features `(T, N, C)`: BiLSTM + linear, and the shortcut."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class BiLSTMHead(nn.Module):
    """BiLSTM over the columns, then dropout and a linear layer to the classes.

    Padded columns are packed away, so a line's output does not depend on its batch neighbours.
    With `layers=0` it is a per-column linear classifier.
    """

    def __init__(self, in_channels: int, hidden: int, layers: int, num_classes: int,
                 dropout: float = 0.0, output_dropout: float = 0.0):
        super().__init__()
        self.lstm = None
        if layers > 0:
            self.lstm = nn.LSTM(in_channels, hidden, layers, dropout=dropout if layers > 1 else 0.0,
                                bidirectional=True)
            in_channels = 2 * hidden
        self.dropout = nn.Dropout(output_dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features `(T, N, C)`, lengths `(N,)` on the CPU -> logits `(T, N, classes)`."""
        if self.lstm is not None:
            packed = pack_padded_sequence(features, lengths.cpu(), enforce_sorted=False)
            packed, _ = self.lstm(packed)
            features, _ = pad_packed_sequence(packed, total_length=features.shape[0])
        return self.classifier(self.dropout(features))


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
