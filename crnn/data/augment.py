"""Train-only augmentation of a padded batch, on the device the batch trains on (docs/gpu.md).

A line's parameters come from its seed (the sampler's, from train.seed, epoch and line), so it is
augmented the same way in any batch, on any rank and after a resume, and `augmented_widths` gives
many lines' new widths in a few array ops. Nothing is read from the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from crnn.config import AugmentConfig
from crnn.data.collate import round_up, to_device
from crnn.data.samplers import hash64

# The warp's uniform draws: slot k of a line is hash64(seed, k) / 2**64, each op on its own slots
# whether it fires or not.
_SLOTS = 8
(_SHEAR_FIRES, _SHEAR, _ROTATION_FIRES, _ROTATION, _SCALE_FIRES, _SCALE_X, _SCALE_Y,
 _DISTORT_FIRES) = range(_SLOTS)


@dataclass(frozen=True)
class Warps:
    """The warps of many lines, one array entry per line: the draws that decide a line's new width."""

    shear: np.ndarray
    angle: np.ndarray  # radians
    scale_x: np.ndarray
    scale_y: np.ndarray
    distort: np.ndarray  # max displacement, pixels

    def identity(self) -> np.ndarray:
        """Lines left as they are: no op fired, or each drew its neutral value."""
        unmoved = (self.shear == 0) & (self.angle == 0) & (self.distort == 0)
        return unmoved & (self.scale_x == 1) & (self.scale_y == 1)

    def out_widths(self, widths: np.ndarray, height: int) -> np.ndarray:
        """The warped lines' widths: scaled, plus the room their shear takes."""
        warped = np.maximum(8, np.round(widths * self.scale_x + np.abs(self.shear) * height))
        return np.where(self.identity(), widths, warped).astype(np.int64)


def draw_warps(cfg: AugmentConfig, height: int, seeds: np.ndarray) -> Warps:
    """The warps of the lines of `seeds`: the one place warps are drawn, so the sampler's widths and
    the augmenter's agree."""
    bits = hash64(np.asarray(seeds)[:, None], np.arange(_SLOTS))
    uniform = (bits >> np.uint64(11)) * 2.0**-53  # the top 53 bits: exact floats in [0, 1)
    fires = uniform < cfg.prob

    def between(slot: int, low: float, high: float) -> np.ndarray:
        return low + (high - low) * uniform[:, slot]

    scaled = fires[:, _SCALE_FIRES]
    return Warps(
        shear=np.where(fires[:, _SHEAR_FIRES], between(_SHEAR, -cfg.shear, cfg.shear), 0.0),
        angle=np.where(fires[:, _ROTATION_FIRES], np.radians(between(_ROTATION, -cfg.rotation, cfg.rotation)), 0.0),
        scale_x=np.where(scaled, between(_SCALE_X, 1 - cfg.scale, 1 + cfg.scale), 1.0),
        scale_y=np.where(scaled, between(_SCALE_Y, 1 - cfg.scale, 1.0), 1.0),  # never taller: keep ascenders
        distort=np.where(fires[:, _DISTORT_FIRES], cfg.distortion * height / 64, 0.0),
    )


def augmented_widths(cfg: AugmentConfig, height: int, widths: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The widths `BatchAugmenter` returns for lines of `widths` px at `height` augmented with `seeds`."""
    return draw_warps(cfg, height, seeds).out_widths(np.asarray(widths), height)


@dataclass
class LineParams:
    """One line's draw. The identity unless an op fired."""

    width: int  # the line's width before augmentation
    out_width: int  # after the warp
    inverse: torch.Tensor | None = None  # (2, 2) output -> source map about the centres; None: no warp
    field: torch.Tensor | None = None  # (2, 2, cells) distortion in pixels, or None
    morphology: int = 0  # kernel size, 0: none
    dilate: bool = False
    contrast: float = 1.0
    brightness: float = 0.0


def draw_params(cfg: AugmentConfig, width: int, height: int, seed: int | None) -> LineParams:
    """The line's parameters from its seed (None: no augmentation): its warp from `draw_warps`, the
    rest drawn in this order from a generator seeded with it."""
    params = LineParams(width, width)
    if seed is None:
        return params
    warps = draw_warps(cfg, height, np.array([seed]))
    params.out_width = int(warps.out_widths(np.array([width]), height)[0])
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    if not warps.identity()[0]:
        # forward map (source -> output), about the centres: rotation . shear . scale
        angle, shear = float(warps.angle[0]), float(warps.shear[0])
        cos, sin = math.cos(angle), math.sin(angle)
        forward = torch.tensor([[cos, -sin], [sin, cos]]) @ torch.tensor([[1.0, shear], [0.0, 1.0]])
        scale = torch.tensor([float(warps.scale_x[0]), float(warps.scale_y[0])])
        params.inverse = torch.linalg.inv(forward @ torch.diag(scale))
        if warps.distort[0]:
            cells = (2, max(2, params.out_width // max(1, height // 2)))
            params.field = (torch.rand((2, *cells), generator=generator) * 2 - 1) * float(warps.distort[0])
    radius = round(cfg.morphology * height / 64)
    if radius >= 1 and uniform(0, 1) < cfg.prob:
        params.morphology = 1 + 2 * int(torch.randint(1, radius + 1, (), generator=generator))
        params.dilate = uniform(0, 1) < 0.5
    if uniform(0, 1) < cfg.prob:
        params.contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast)
        params.brightness = uniform(-cfg.brightness, cfg.brightness) * 0.5
    return params


class BatchAugmenter:
    """`(N, 1, H, W)` float ink on any device, its widths `(N,)` on the CPU and per-line seeds (None:
    left as it is) -> the augmented batch `(N, 1, H, W')`, W' rounded up to `width_multiple`, and
    its new widths `(N,)` on the CPU (`augmented_widths` of the seeded lines)."""

    def __init__(self, cfg: AugmentConfig, width_multiple: int = 1):
        self.cfg, self.width_multiple = cfg, width_multiple

    def __call__(self, images: torch.Tensor, widths: torch.Tensor,
                 seeds: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        height, device = images.shape[2], images.device
        params = [draw_params(self.cfg, int(width), height, seed) for width, seed in zip(widths, seeds, strict=True)]
        new_widths = torch.tensor([p.out_width for p in params])
        canvas = round_up(max(int(new_widths.max()), 1), self.width_multiple)
        images = self._warp(images, params, canvas)
        mask = (torch.arange(canvas, device=device) < to_device(new_widths, device)[:, None])[:, None, None, :]
        images = self._morphology(images * mask, params, mask)
        light = to_device(torch.tensor([[p.contrast, p.brightness] for p in params]), device)
        contrast, brightness = light[:, 0, None, None, None], light[:, 1, None, None, None]
        return (images * contrast + brightness).clamp_(0.0, 1.0) * mask, new_widths

    @staticmethod
    def _warp(images: torch.Tensor, params: list[LineParams], canvas: int) -> torch.Tensor:
        """Lines that warp are resampled on one grid each (one grid_sample for all of them); the
        others are copied onto the new canvas as they are."""
        height, width = images.shape[2:]
        out = F.pad(images, (0, canvas - width))  # cropped where the canvas is narrower
        warped = [i for i, p in enumerate(params) if p.inverse is not None]
        if warped:
            lines = to_device(torch.tensor(warped), images.device)
            grid = warp_grid([params[i] for i in warped], height, width, canvas, images.device)
            out[lines] = F.grid_sample(images[lines], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out

    @staticmethod
    def _morphology(images: torch.Tensor, params: list[LineParams], mask: torch.Tensor) -> torch.Tensor:
        """Erosion / dilation, one max-pool per (kernel, kind) group of lines."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, p in enumerate(params):
            if p.morphology:
                groups.setdefault((p.morphology, p.dilate), []).append(i)
        for (size, dilate), group in groups.items():
            lines = to_device(torch.tensor(group), images.device)
            chosen = images[lines]
            if dilate:
                chosen = F.max_pool2d(chosen, size, stride=1, padding=size // 2)
            else:  # the blank right of a line must not erode its last columns: fill it with ink first
                chosen = torch.where(mask[lines], chosen, 1.0)
                chosen = -F.max_pool2d(-chosen, size, stride=1, padding=size // 2)
            images[lines] = chosen
        return images


def warp_grid(params: list[LineParams], height: int, width: int, canvas: int, device: torch.device) -> torch.Tensor:
    """`(n, H, canvas, 2)` sampling grid of warped lines: output pixel centres -> source positions,
    normalised for the padded input batch of `width` columns."""
    widths = to_device(torch.tensor([[p.width, p.out_width] for p in params], dtype=torch.float32), device)
    inverse = to_device(torch.stack([p.inverse for p in params]), device)  # (n, 2, 2)
    xs = (torch.arange(canvas, device=device) + 0.5 - widths[:, 1, None] / 2)[:, None, None, :]  # centred
    ys = (torch.arange(height, device=device) + 0.5 - height / 2)[:, None]  # (H, 1)
    source = inverse[:, :, 0, None, None] * xs + inverse[:, :, 1, None, None] * ys  # (n, 2, H, canvas)
    if any(p.field is not None for p in params):
        source = source + distortion_field(params, height, canvas, device)
    # a source x, relative to its line's centre, -> the padded batch's normalised x
    grid_x = (2 * source[:, 0] + widths[:, 0, None, None]) / width - 1
    return torch.stack([grid_x, 2 * source[:, 1] / height], dim=-1)


def distortion_field(params: list[LineParams], height: int, canvas: int, device: torch.device) -> torch.Tensor:
    """`(n, 2, H, canvas)` displacement in pixels: each line's coarse `(2, 2, cells)` field upsampled
    bicubically (corners aligned) over its own output width; zero for lines without one. The coarse
    fields are padded to one width by repeating each line's last column, so that one grid_sample
    upsamples them all as `F.interpolate` would each one alone."""
    fields = [torch.zeros(2, 2, 2) if p.field is None else p.field for p in params]
    cells = max(field.shape[-1] for field in fields)
    coarse = torch.stack([F.pad(field, (0, cells - field.shape[-1]), mode="replicate") for field in fields])
    spans = to_device(torch.tensor([[field.shape[-1] - 1, max(p.out_width - 1, 1)]  # cells, columns
                                    for field, p in zip(fields, params, strict=True)]), device)
    position = torch.arange(canvas, device=device) * spans[:, :1] / spans[:, 1:]  # (n, canvas), in cells
    grid_x = (2 * position / (cells - 1) - 1)[:, None, :].expand(-1, height, -1)
    grid_y = (2 * torch.arange(height, device=device) / max(height - 1, 1) - 1)[None, :, None].expand_as(grid_x)
    grid = torch.stack([grid_x, grid_y], dim=-1).float()
    return F.grid_sample(to_device(coarse, device), grid, mode="bicubic", padding_mode="border",
                         align_corners=True)
