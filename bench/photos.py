"""Real photographs for the benchmarks and the memory and soak checks: scikit-image's sample photos, re-encoded as
JPEG at the sizes asked for (nothing is downloaded: the photos ship inside the scikit-image wheel)."""

from __future__ import annotations

import io
from functools import cache
from importlib import resources

from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")
MEGAPIXEL_12 = (4000, 3000)  # a phone camera's photo


@cache
def photo(name: str) -> Image.Image:
    """One of PHOTOS as an RGB image, read from the installed scikit-image package's data folder."""
    with resources.files("skimage").joinpath("data", name).open("rb") as f:
        return Image.open(f).convert("RGB")


def jpeg(name: str, size: tuple[int, int], quality: int = 90) -> bytes:
    """`name` resized to `size` (width, height; the aspect ratio is the caller's choice) as JPEG bytes."""
    buf = io.BytesIO()
    photo(name).resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def jpegs(size: tuple[int, int], count: int, quality: int = 90) -> list[bytes]:
    """`count` JPEGs of `size`, cycling through the photos (so a decoder never sees one file only)."""
    return [jpeg(PHOTOS[i % len(PHOTOS)], size, quality) for i in range(count)]
