"""Properties of the image decoder (service.preprocess) on generated, damaged and hostile files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from modelrepo.manifest import load as load_manifest
from service.errors import ImageTooLarge, ServiceError
from service.preprocess import DEFAULT_FORMATS, Preprocessor
from service.settings import Settings

FASHION_MANIFEST = Path(__file__).parents[2] / "model_repo" / "srvit_fashion_d1" / "manifest.json"
IMAGENET = {"input_size": 224, "resize_size": 256, "channels": "RGB", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}  # fmt: skip
MAX_PIXELS = Settings.model_fields["max_pixels"].default
CLIENT_ERRORS = {400, 413, 415, 422}

MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr")
REFUSED = ("TIFF", "ICO", "PPM", "PCX", "SGI", "JPEG2000", "QOI", "DDS", "ICNS", "TGA", "SPIDER")
NO_SIGNATURE = {"TGA", "SPIDER"}  # no leading signature names them (TGA's header may look like CUR's): 400 or 415
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM")
FRAMES = {"PNG", "GIF", "WEBP"}  # formats that carry animations: only frame 0 is decoded
MAX_SIDE = {"ICO": 256}  # an icon is at most 256x256
EXIF = {"PNG", "JPEG", "WEBP"}  # formats whose EXIF orientation the decoder applies
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


def picture(mode: str, w: int, h: int, seed: int) -> Image.Image:
    """Random pixels in `mode`; 16-bit, 32-bit and float images use their whole range (floats beyond [0, 1])."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(0.5, 1.0, (h, w)).astype(np.float32))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def can_save(fmt: str, mode: str) -> bool:
    try:
        picture(mode, 4, 4, 0).save(io.BytesIO(), fmt)
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def writable(formats) -> dict[str, list[str]]:
    """Format -> the modes this Pillow can write in it, asked once with tiny images."""
    return {f: [m for m in MODES if can_save(f, m)] for f in formats}


ACCEPTED, REFUSED_WRITES = writable(DEFAULT_FORMATS), writable(REFUSED)


def side() -> st.SearchStrategy[int]:
    """1 to 300 px, often very small, so strips (1x300) and single pixels come up."""
    return st.one_of(st.integers(1, 4), st.integers(1, 300))


@st.composite
def files(draw, modes: dict[str, list[str]]) -> tuple[str, bytes]:
    """(format, an undamaged file): any mode the format saves, any size, maybe an EXIF orientation, a
    transparent colour, or more frames."""
    fmt = draw(st.sampled_from(sorted(modes)))
    mode = draw(st.sampled_from(modes[fmt]))
    limit = MAX_SIDE.get(fmt, 300)
    w, h = min(draw(side()), limit), min(draw(side()), limit)
    img = picture(mode, w, h, draw(st.integers(0, 2**16)))
    options = {}
    if fmt in EXIF and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))  # Orientation
        options["exif"] = exif.tobytes()
    if fmt in ("PNG", "GIF") and mode in ("L", "P") and draw(st.booleans()):
        options["transparency"] = 0
    if fmt in FRAMES and draw(st.booleans()):
        options |= {"save_all": True, "append_images": [img.transpose(Image.Transpose.ROTATE_180)]}
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return fmt, buf.getvalue()


@st.composite
def damaged(draw) -> bytes:
    """A file cut short, with chunks overwritten in the middle, or bytes that only look like an image."""
    _, data = draw(files(ACCEPTED))
    kind = draw(st.sampled_from(["truncated", "corrupted", "signature", "garbage"]))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "corrupted":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=64))
            data = data[:at] + chunk + data[at + len(chunk) :]
        return data
    if kind == "signature":
        return draw(st.sampled_from(SIGNATURES)) + draw(st.binary(max_size=512))
    return draw(st.binary(max_size=2048))


@pytest.fixture(scope="module", params=["fashion", "imagenet"])
def pre(request) -> Preprocessor:
    """The embedded model's own preprocessing (1x28x28 grayscale), and an ImageNet-style RGB 224 one."""
    spec = load_manifest(FASHION_MANIFEST).preprocessing if request.param == "fashion" else IMAGENET
    return Preprocessor(spec, MAX_PIXELS)


def decode(pre: Preprocessor, data: bytes) -> np.ndarray | ServiceError:
    """The tensor, or the error the client is told; any other exception escapes and fails the property."""
    try:
        return pre(data)
    except ServiceError as e:
        return e


def assert_model_input(pre: Preprocessor, x) -> None:
    """What the model may be fed: float32 [C, H, W], finite, each pixel in [0, 1] before normalization."""
    assert isinstance(x, np.ndarray), f"expected a tensor, got {x!r}"
    assert x.dtype == np.float32 and x.shape == pre.shape
    assert np.isfinite(x).all()
    pixels = x * pre.std + pre.mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def assert_client_error(outcome) -> None:
    assert isinstance(outcome, ServiceError), f"expected a client error, got {outcome!r}"
    assert outcome.status in CLIENT_ERRORS, f"{type(outcome).__name__} has status {outcome.status}"


@FUZZ
@given(file=files(ACCEPTED))
def test_every_file_in_an_accepted_format_decodes_to_the_model_input(pre, file):
    """Any mode, size, aspect ratio, orientation or frame count a client's encoder writes is served."""
    assert_model_input(pre, decode(pre, file[1]))


@settings(FUZZ, max_examples=100)
@given(file=files(REFUSED_WRITES))
def test_files_in_refused_formats_are_415(pre, file):
    """A refused format is never decoded: 415 names it, or 400 when Pillow has no signature to name it by."""
    fmt, data = file
    outcome = decode(pre, data)
    assert_client_error(outcome)
    assert outcome.status == 415 or (fmt in NO_SIGNATURE and outcome.status == 400), outcome.message


@settings(FUZZ, max_examples=250)
@given(data=damaged())
def test_damaged_files_and_garbage_give_the_model_input_or_a_client_error(pre, data):
    """Hostile bytes end in a 4xx the client can act on, never a 500; whatever decodes is a valid input."""
    outcome = decode(pre, data)
    if isinstance(outcome, ServiceError):
        assert_client_error(outcome)
    else:
        assert_model_input(pre, outcome)


@settings(FUZZ, max_examples=50)
@given(file=files(ACCEPTED), spare=st.integers(1, 10))
def test_an_image_over_the_pixel_limit_is_422(file, spare):
    """width*height above max_pixels is refused as image_too_large, whatever the file holds."""
    with Image.open(io.BytesIO(file[1])) as img:
        pixels = img.width * img.height
    assume(pixels > spare)  # a limit must be positive
    pre = Preprocessor(load_manifest(FASHION_MANIFEST).preprocessing, pixels - spare)
    outcome = decode(pre, file[1])
    assert isinstance(outcome, ImageTooLarge) and outcome.status == 422, outcome
