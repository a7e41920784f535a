"""Encoded image bytes -> the model's input tensor, exactly as the manifest's `preprocessing` says."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin

from modelrepo.manifest import Preprocessing
from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedMediaType

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Only draft a JPEG when it is at least this many times the resize target: DCT scaling changes the
# pixels slightly, so smaller images take the exact path and match training bit for bit.
DRAFT_MIN_RATIO = 2

# EXIF orientation -> the transpose that makes the image upright (the table of ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {_UPRIGHT[k] for k in (5, 6, 7, 8)}  # quarter turns: width and height trade places

_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_COLOR_MODES = {"CMYK", "YCbCr", "RGBX"}  # Pillow converts these to RGB exactly as documented
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class Preprocessor:
    """Decodes one request image; thread-safe, so the app can run it in a thread pool.

    The transform matches `srvit.data.Preprocessing.__call__` (convert to `channels`, resize the shorter
    side bilinearly, center-crop, scale to [0, 1], normalize) within float rounding; only JPEGs at least
    DRAFT_MIN_RATIO times the resize target differ, by libjpeg's reduced-scale decoding. Everything before
    it is about hostile input: a format allowlist, a pixel limit checked before any decoding, frame 0 only,
    and every Pillow failure turned into a client error.

    `preprocessing` is the manifest's (a plain mapping is read through the contract, `Preprocessing.from_dict`);
    `max_pixels` bounds width*height before any pixel is decoded.
    Transparent images are composited onto `background` (a gray level, white by default: photos and
    product shots with alpha are meant to be seen on a page, and a black fill would invent a dark frame).
    """

    def __init__(
        self,
        preprocessing: Preprocessing | Mapping,
        max_pixels: int,
        formats: Sequence[str] = DEFAULT_FORMATS,
        background: int = 255,
    ):
        if not isinstance(preprocessing, Preprocessing):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.input_size = preprocessing.input_size
        self.resize_size = preprocessing.resize_size
        self.channels = preprocessing.channels
        self.mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(-1, 1, 1)  # [C, 1, 1]
        self.std = np.asarray(preprocessing.std, dtype=np.float32).reshape(-1, 1, 1)  # [C, 1, 1]
        self.max_pixels = int(max_pixels)
        self.formats = tuple(f.upper() for f in formats)
        self.background = int(background)
        self._validate()
        _let_our_pixel_limit_decide(self.max_pixels)

    def _validate(self) -> None:
        """The transform itself was checked by the contract (`Preprocessing.problems`); what is left is ours."""
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"formats {unknown} cannot be read by this Pillow; known: {sorted(Image.OPEN)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """[C, H, W] of every output."""
        return (len(self.channels), self.input_size, self.input_size)

    def __call__(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> float32 [C, H, W]; raises InvalidImage, UnsupportedMediaType or ImageTooLarge."""
        img = self.decode(data)
        return self.to_tensor(img)

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> upright image in `channels` mode, resized so its shorter side is `resize_size`."""
        with _pillow_errors():
            return self._decode_opened(self._open(data))

    def open_small(self, data: bytes, max_pixels: int) -> Image.Image | None:
        """The image, its header read, when it and its resize both have at most `max_pixels` pixels (a decode
        that costs less than handing it to a thread); None when larger, or unreadable: `__call__` then raises
        the error where it always does. Finish it with `finish`."""
        if self.resize_size**2 > max_pixels:
            return None
        try:
            with _pillow_errors():
                img = self._open(data)
        except ServiceError:
            return None
        return img if img.size[0] * img.size[1] <= max_pixels else None

    def finish(self, img: Image.Image) -> np.ndarray:
        """An image `open_small` opened -> float32 [C, H, W], exactly as `__call__` would have made it."""
        with _pillow_errors():
            img = self._decode_opened(img)
        return self.to_tensor(img)

    def _decode_opened(self, img: Image.Image) -> Image.Image:
        img.seek(0)
        target = self._resize_target(img.size)
        self._draft(img, target)
        img, target = _load_upright(img, target)
        img = to_channels(img, self.channels, self.background)
        return img if img.size == target else img.resize(target, Image.Resampling.BILINEAR)

    def to_tensor(self, img: Image.Image) -> np.ndarray:
        """Center crop, [0, 1], normalize: numpy only, same float32 arithmetic as the training transform."""
        img = center_crop(img, self.input_size)
        x = np.asarray(img, dtype=np.float32) / 255.0  # [H, W] or [H, W, C]
        x = x[:, :, None] if x.ndim == 2 else x
        return np.ascontiguousarray((x.transpose(2, 0, 1) - self.mean) / self.std)  # [C, H, W]

    def _open(self, data: bytes) -> Image.Image:
        """Header only: format allowlist and the pixel limit are checked before a single pixel is decoded."""
        if not data:
            raise InvalidImage(f"the image is empty: send the bytes of one of: {', '.join(self.formats)}")
        try:
            img = Image.open(io.BytesIO(data), formats=list(self.formats))
        except Image.UnidentifiedImageError as e:
            raise self._unidentified(data) from e
        w, h = img.size
        if w * h > self.max_pixels:
            raise ImageTooLarge(
                f"the image is {w}x{h} = {w * h} pixels; the limit is {self.max_pixels} pixels: send a smaller image"
            )
        return img

    def _resize_target(self, size: tuple[int, int]) -> tuple[int, int]:
        """The resize keeps the aspect ratio, so a thin image grows along its long side: a 1x4000 strip
        would become 256x1024000. Bound the resized image by the same pixel limit before any decoding."""
        target = _resized_size(size, self.resize_size)
        if target[0] * target[1] > self.max_pixels:
            raise ImageTooLarge(
                f"the image is {size[0]}x{size[1]}: its aspect ratio is too extreme, resizing its shorter side to "
                f"{self.resize_size} would make {target[0]}x{target[1]} = {target[0] * target[1]} pixels; the limit "
                f"is {self.max_pixels} pixels: crop it closer to square"
            )
        return target

    def _unidentified(self, data: bytes) -> ServiceError:
        """415 when Pillow's signature table names a format we refuse, else 400: the bytes are not an image."""
        accepted = ", ".join(self.formats)
        fmt = sniff_format(data)
        if fmt is not None and fmt not in self.formats:
            return UnsupportedMediaType(f"image format {fmt} is not accepted; send one of: {accepted}")
        return InvalidImage(f"the bytes are not a readable image; send one of: {accepted}")

    def _draft(self, img: Image.Image, target: tuple[int, int]) -> None:
        """Let libjpeg decode a big photo at 1/2, 1/4 or 1/8 scale: a 24 MP photo decodes in a fraction
        of the time and memory. Never below `target`, so the bilinear resize still only shrinks."""
        if isinstance(img, JpegImagePlugin.JpegImageFile) and min(img.size) >= DRAFT_MIN_RATIO * min(target):
            img.draft(None, target)


def _let_our_pixel_limit_decide(max_pixels: int) -> None:
    """Pillow raises its own DecompressionBombError at 2 * MAX_IMAGE_PIXELS inside Image.open, before our
    check can run. Raise (never lower) that process-wide limit to ours, so any image Pillow refuses is one
    we refuse too; `_pillow_errors` maps its error to the same ImageTooLarge."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Turn whatever Pillow raises on hostile bytes into a client error.

    Truncated and fuzzed files raise OSError, ValueError, SyntaxError, struct.error, EOFError,
    IndexError, TypeError, KeyError, ZeroDivisionError and more, depending on the plugin. Only Pillow
    runs inside this block, so any exception here means the bytes are bad: a 400, never a 500.
    """
    try:
        yield
    except ServiceError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"the image is too large to decode ({e}): send a smaller image") from e
    except Exception as e:
        raise InvalidImage(f"the image could not be decoded ({type(e).__name__}: {e})") from e


def sniff_format(data: bytes) -> str | None:
    """The format whose signature matches, using Pillow's own `accept` checks on the first 16 bytes.

    No plugin's parser or decoder runs, so refused formats (EPS, TIFF, ...) stay out of reach.
    """
    Image.init()
    prefix = data[:16]
    for fmt, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # some accept() functions index past a short prefix
            continue
    return None


def _load_upright(img: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Decode, then apply the EXIF orientation; the resize target turns with the image."""
    img.load()
    upright = _orientation(img)
    if upright is None:
        return img, target
    return img.transpose(upright), (target[::-1] if upright in _SWAPS_AXES else target)


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose that makes the image upright. A malformed EXIF block counts as no orientation: the
    pixels themselves are fine, and browsers show such images as stored."""
    try:
        return _UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return None


def to_channels(img: Image.Image, channels: str, background: int = 255) -> Image.Image:
    """Any Pillow mode -> `channels` ("L" or "RGB"), each mode handled deliberately.

    Alpha (and palette/L/RGB transparency) is composited onto `background`; 16-bit and 32-bit integer
    images are scaled from their full 16-bit range (not clipped at 255); float images are read as [0, 1];
    "1" is 0/255; CMYK, YCbCr and RGBX use Pillow's conversion to RGB.
    """
    mode = img.mode
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        img = _composite(img, background)
    elif mode in _UINT16_MODES or mode == "I":
        img = _from_uint16(np.asarray(img))
    elif mode == "F":
        img = _from_unit_float(np.asarray(img))
    elif mode in _COLOR_MODES or mode == "P":
        img = img.convert("RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode not in ("L", "RGB"):
        raise UnsupportedMediaType(f"pixel mode {mode} is not supported; send 8-bit grayscale or RGB")
    return img if img.mode == channels else img.convert(channels)


def _composite(img: Image.Image, background: int) -> Image.Image:
    """Alpha-blend over an opaque gray; premultiplied La goes through LA, Pillow has no direct La -> RGBA."""
    rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _from_uint16(values: np.ndarray) -> Image.Image:
    """0..65535 -> 0..255 with rounding (v * 255 / 65535), so white stays white and nothing clips."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))


def _from_unit_float(values: np.ndarray) -> Image.Image:
    """[0, 1] -> 0..255; NaN reads as 0 and values outside the range clip."""
    v = np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0.0, 1.0)
    return Image.fromarray(np.round(v * 255.0).astype(np.uint8))


def _resized_size(size: tuple[int, int], resize_size: int) -> tuple[int, int]:
    """The size srvit.data.resize_shorter produces (same rounding), computed from the full-resolution size."""
    w, h = size
    if min(w, h) == resize_size:
        return (w, h)
    scale = resize_size / min(w, h)
    return (max(resize_size, round(w * scale)), max(resize_size, round(h * scale)))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Same offsets as srvit.data.center_crop."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
