"""Line preprocessing: grayscale, fixed height, aspect kept (or squashed / fitted).

Images become uint8 tensors `(1, H, W)` of *ink*, 0 (paper) to 255: right-padding a batch with zeros
looks like more blank paper, and uint8 is a quarter of the bytes to cache and to copy to the device,
where `Batch.to` turns them into float ink in [0, 1]. Augmentation runs on the device, on whole
batches (`crnn.data.augment`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resized_size(source_width: int, source_height: int, height: int, mode: str = "keep_aspect",
                 width: int = 0, max_width: int = 4000) -> tuple[int, int]:
    """(width, height) of the ink a line of this size is scaled to (before `fit`'s padding)."""
    scale = height / source_height
    if mode == "squash":
        return width, height
    if mode == "fit":
        scale = min(scale, width / source_width)
        return max(1, round(source_width * scale)), max(1, round(source_height * scale))
    return min(max_width, max(1, round(source_width * scale))), height


def resize_line(image: Image.Image, height: int, mode: str = "keep_aspect", width: int = 0,
                max_width: int = 4000) -> torch.Tensor:
    """Grayscale PIL line -> uint8 ink tensor `(1, height, W)` (255 - pixel value).

    keep_aspect: W follows the aspect ratio (capped at max_width); squash: W = width;
    fit: scaled to fit a height x width canvas with the aspect ratio kept, padded to width.
    """
    size = resized_size(*image.size, height, mode, width, max_width)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    ink = 255 - torch.from_numpy(np.array(image, dtype=np.uint8)).unsqueeze(0)
    if mode == "fit":
        ink = F.pad(ink, (0, width - size[0], 0, height - size[1]))
    return ink


def round_up(value: int, multiple: int) -> int:
    """`value` rounded up to a multiple of `multiple` (a batch's padded width)."""
    return -(-value // multiple) * multiple
