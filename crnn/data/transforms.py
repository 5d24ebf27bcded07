"""Line preprocessing (grayscale, fixed height, aspect kept) and train-only augmentation.

Images become float tensors `(1, H, W)` of *ink* in [0, 1]: paper is 0, so right-padding a batch
with zeros looks like more blank paper. Augmentation works on these tensors with torch ops and
draws all its randomness from a `torch.Generator`, so a sample's augmentation depends only on its
seed (reproducible across DataLoader workers and across resumes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from crnn.config import AugmentConfig


def resize_line(image: Image.Image, height: int, mode: str = "keep_aspect", width: int = 0,
                max_width: int = 4000) -> torch.Tensor:
    """Grayscale PIL line -> ink tensor `(1, height, W)`.

    keep_aspect: W follows the aspect ratio (capped at max_width); squash: W = width;
    fit: scaled to fit a height x width canvas with the aspect ratio kept, padded to width.
    """
    source_width, source_height = image.size
    scale = height / source_height
    if mode == "squash":
        size = (width, height)
    elif mode == "fit":
        scale = min(scale, width / source_width)
        size = (max(1, round(source_width * scale)), max(1, round(source_height * scale)))
    else:
        size = (min(max_width, max(1, round(source_width * scale))), height)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    ink = 1.0 - torch.from_numpy(np.asarray(image, dtype=np.float32)).unsqueeze(0) / 255.0
    if mode == "fit":
        ink = F.pad(ink, (0, width - size[0], 0, height - size[1]))
    return ink


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _fires(generator: torch.Generator, prob: float) -> bool:
    return float(torch.rand((), generator=generator)) < prob


class Augmenter:
    """Random affine (shear, rotation, scale) + grid distortion, erosion/dilation, brightness and
    contrast, each firing with probability `cfg.prob`. Call with `(1, H, W)` ink -> `(1, H, W')`."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        ink = self._warp(ink, generator)
        ink = self._morphology(ink, generator)
        return self._intensity(ink, generator)

    def _warp(self, ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One grid_sample for affine + distortion: one interpolation, not three."""
        cfg, (_, height, width) = self.cfg, ink.shape
        shear = _uniform(generator, -cfg.shear, cfg.shear) if _fires(generator, cfg.prob) else 0.0
        angle = math.radians(_uniform(generator, -cfg.rotation, cfg.rotation)) if _fires(generator, cfg.prob) else 0.0
        scale_x, scale_y = 1.0, 1.0
        if _fires(generator, cfg.prob):
            scale_x = _uniform(generator, 1 - cfg.scale, 1 + cfg.scale)
            scale_y = _uniform(generator, 1 - cfg.scale, 1.0)  # never taller: keep ascenders
        distort = cfg.distortion * height / 64 if _fires(generator, cfg.prob) else 0.0
        if shear == angle == distort == 0.0 and scale_x == scale_y == 1.0:
            return ink
        out_width = max(8, round(width * scale_x + abs(shear) * height))
        # forward map (source -> output), about the centres: rotation . shear . scale
        cos, sin = math.cos(angle), math.sin(angle)
        forward = torch.tensor([[cos, -sin], [sin, cos]]) @ torch.tensor([[1.0, shear], [0.0, 1.0]])
        forward = forward @ torch.diag(torch.tensor([scale_x, scale_y]))
        ys, xs = torch.meshgrid(torch.arange(height) + 0.5 - height / 2,
                                torch.arange(out_width) + 0.5 - out_width / 2, indexing="ij")
        source = torch.stack([xs, ys], dim=-1) @ torch.linalg.inv(forward).T  # (H, W', 2) pixels
        if distort:
            cells = (2, max(2, out_width // max(1, height // 2)))
            field = (torch.rand((1, 2, *cells), generator=generator) * 2 - 1) * distort
            field = F.interpolate(field, size=(height, out_width), mode="bicubic", align_corners=True)
            source = source + field[0].permute(1, 2, 0)
        grid = torch.stack([source[..., 0] * 2 / width, source[..., 1] * 2 / height], dim=-1)
        return F.grid_sample(ink[None], grid[None], mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0]

    def _morphology(self, ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        radius = round(self.cfg.morphology * ink.shape[1] / 64)
        if radius < 1 or not _fires(generator, self.cfg.prob):
            return ink
        size = 1 + 2 * int(torch.randint(1, radius + 1, (), generator=generator))
        if _fires(generator, 0.5):  # thicker strokes
            return F.max_pool2d(ink[None], size, stride=1, padding=size // 2)[0]
        return -F.max_pool2d(-ink[None], size, stride=1, padding=size // 2)[0]

    def _intensity(self, ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not _fires(generator, self.cfg.prob):
            return ink
        contrast = _uniform(generator, 1 - self.cfg.contrast, 1 + self.cfg.contrast)
        brightness = _uniform(generator, -self.cfg.brightness, self.cfg.brightness) * 0.5
        return (ink * contrast + brightness).clamp_(0.0, 1.0)
