"""The load's test images: Fashion-MNIST test images as the PNG files a client would upload."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from modelrepo.idx import fashion_mnist


def load_pngs(data: Path, count: int | None = None) -> tuple[list[bytes], np.ndarray]:
    """The first `count` Fashion-MNIST test images as PNG files, and their labels."""
    images, labels = fashion_mnist(data, "test")
    images, labels = images[:count], labels[:count]
    return [encode_png(image) for image in images], labels


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 [H, W] (gray) or [H, W, 3] (RGB) array as PNG bytes, the way a client would upload it."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
