"""Decoding line images from bytes or files into 8-bit grayscale, whatever their mode; every failure
is a DataError naming the image."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from crnn.errors import DataError

# Image files the tools take for lines or pages, in the order a page's image is looked for beside its XML
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif")

# A text line never needs more than this; larger files are decompression bombs or page scans.
MAX_PIXELS = 50_000_000


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGB, RGBA, LA, P, I;16, I, F, 1) -> mode 'L'; transparency becomes white paper."""
    if image.mode in ("P", "RGBA", "LA", "PA"):
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((pixels - low) * scale).astype(np.uint8), mode="L")
    return image.convert("L")


@contextlib.contextmanager
def _opened(source: bytes | str | Path, where: str) -> Iterator[Image.Image]:
    """The PIL image of `source` (raw bytes or a path), not yet decoded; any failure, there or in the
    caller's block, as a DataError naming `where`."""
    try:
        if (len(source) if isinstance(source, bytes) else os.path.getsize(source)) == 0:
            raise DataError(f"{where}: empty file (0 bytes), not an image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with stream, Image.open(stream) as image:
                yield image
    except FileNotFoundError:
        named = "" if str(source) == where else f" {source}"  # the path tried, as resolved
        raise DataError(f"{where}: image file{named} not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{where}: unreadable image (not an image format Pillow knows)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{where}: rejected as a decompression bomb: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{where}: unreadable image ({type(err).__name__}: {err})") from None


def decode_image(source: bytes | str | Path, where: str) -> Image.Image:
    """Decode an image (raw bytes or a path) to grayscale; DataError naming `where` on failure."""
    with _opened(source, where) as image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise DataError(f"{where}: image of {width}x{height} pixels is over the limit of {MAX_PIXELS} "
                            f"pixels for a text line; crop or downscale it")
        image.load()
        return to_grayscale(image)


def image_size(source: bytes | str | Path, where: str) -> tuple[int, int]:
    """(width, height) from the header only, without decoding pixels."""
    with _opened(source, where) as image:
        return image.size
