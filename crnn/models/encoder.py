"""ResNet encoder for text lines: a stem, then stages of torchvision's BasicBlock."""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, conv1x1

STEM_KERNEL = 7


class ResNetEncoder(nn.Module):
    """`(N, 1, H, W)` images -> `(N, C, H', W')` features: a 7x7 stem (`stem_stride`), then per stage
    a max-pool of its stride and its BasicBlocks (He et al. 2016)."""

    def __init__(self, stem_channels: int, stem_stride: tuple[int, int], channels: list[int],
                 blocks: list[int], strides: list[tuple[int, int]]):
        super().__init__()
        padding = STEM_KERNEL // 2
        layers: list[nn.Module] = [
            nn.Conv2d(1, stem_channels, STEM_KERNEL, stem_stride, padding, bias=False),
            nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
        ]
        # (kernel, stride, padding) along the width of every op that changes it (CRNN.output_lengths)
        self.width_ops = [(STEM_KERNEL, stem_stride[1], padding)]
        previous = stem_channels
        for out_channels, count, stride in zip(channels, blocks, strides, strict=True):
            if tuple(stride) != (1, 1):
                layers.append(nn.MaxPool2d(stride, stride))
                self.width_ops.append((stride[1], stride[1], 0))
            for _ in range(count):
                block = BasicBlock(previous, out_channels)
                if previous != out_channels:  # made after the block: the random draws keep their order
                    block.downsample = nn.Sequential(conv1x1(previous, out_channels),
                                                     nn.BatchNorm2d(out_channels))
                layers.append(block)
                previous = out_channels
        self.layers = nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
