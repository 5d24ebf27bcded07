"""ResNet encoder for text lines: BasicBlock stages, then the height collapsed into columns."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (no padding) whose stride is taken by subsampling its input first: the same
    function and parameters as `nn.Conv2d(in, out, 1, stride)`, but never oneDNN's strided 1x1
    kernel, whose backward pass in the channels_last layout (`train.memory_format`) writes past its
    workspace when the input has fewer channels than its vector block (oneDNN issue 6035: a
    segfault, or wrong weight gradients, e.g. at 8 input channels on AVX-512)."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int]):
        super().__init__(in_channels, out_channels, 1, bias=False)
        self.subsample = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subsample != (1, 1):
            x = x[:, :, ::self.subsample[0], ::self.subsample[1]]
        return super().forward(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016); `stride` is (height, width)."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int] = (1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != (1, 1) or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                PointwiseConv(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def conv_output_length(lengths: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Output size of a conv/pool along one axis (floor mode), elementwise."""
    return torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1


class ResNetEncoder(nn.Module):
    """`(N, 1, H, W)` images -> `(N, C, H', W')` features.

    stem: conv (kernel, stride) + BN + ReLU [+ 3x3/2 max-pool]; then one stage per entry of
    `channels`/`blocks`/`strides`, whose stride is taken by its first block (`downsample="conv"`)
    or by a max-pool in front of it (`downsample="maxpool"`).
    """

    def __init__(self, in_channels: int, stem_channels: int, stem_kernel: tuple[int, int],
                 stem_stride: tuple[int, int], stem_pool: bool, channels: list[int],
                 blocks: list[int], strides: list[tuple[int, int]], downsample: str = "conv"):
        super().__init__()
        padding = (stem_kernel[0] // 2, stem_kernel[1] // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem_channels, stem_kernel, stem_stride, padding, bias=False),
            nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
        ]
        # (kernel, stride, padding) along the width of every op that changes it
        self.width_ops = [(stem_kernel[1], stem_stride[1], padding[1])]
        if stem_pool:
            layers.append(nn.MaxPool2d(3, 2, 1))
            self.width_ops.append((3, 2, 1))
        previous = stem_channels
        for out_channels, count, stride in zip(channels, blocks, strides, strict=True):
            stride = tuple(stride)
            if downsample == "maxpool" and stride != (1, 1):
                layers.append(nn.MaxPool2d(stride, stride))
                self.width_ops.append((stride[1], stride[1], 0))
                stride = (1, 1)
            for i in range(count):
                layers.append(BasicBlock(previous, out_channels, stride if i == 0 else (1, 1)))
                if i == 0 and stride[1] != 1:
                    self.width_ops.append((3, stride[1], 1))
                previous = out_channels
        self.layers = nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)

    def output_widths(self, widths: torch.Tensor) -> torch.Tensor:
        """Feature columns of each line from its own unpadded image width."""
        for kernel, stride, padding in self.width_ops:
            widths = conv_output_length(widths, kernel, stride, padding)
        return widths
