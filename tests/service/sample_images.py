"""Encoded test images for the service tests (random pixels, so different seeds give different predictions)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(size: int = 16, seed: int = 0, mode: str = "L") -> Image.Image:
    """Random pixels, so that different seeds give different predictions."""
    channels = {"L": 1, "RGB": 3}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def png(size: int = 16, seed: int = 0) -> bytes:
    return encode(picture(size, seed), "PNG")


def jpeg(size: int = 16, seed: int = 0) -> bytes:
    return encode(picture(size, seed, "RGB"), "JPEG", quality=95)
