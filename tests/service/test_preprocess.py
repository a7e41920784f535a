"""service.preprocess: parity with the training transform, and survival of hostile images."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedMediaType
from service.preprocess import Preprocessor, center_crop, to_channels

FASHION = {"input_size": 28, "channels": "L", "mean": [0.2860], "std": [0.3530], "resize_size": 28}
IMAGENET = {
    "input_size": 224,
    "channels": "RGB",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "resize_size": 256,
    "interpolation": "bilinear",
}
# Identity normalization on a small crop: the tensor is just pixels / 255, easy to reason about.
PIXELS = {"input_size": 16, "channels": "L", "mean": [0.0], "std": [1.0], "resize_size": 16}
MAX_PIXELS = 40_000_000


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resizing and JPEG both have something to get wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def translucent(w: int, h: int) -> Image.Image:
    """RGBA whose alpha runs from clear to opaque, so encoders keep the alpha channel."""
    img = photo(w, h)
    img.putalpha(Image.linear_gradient("L").resize((w, h)))
    return img


def halves(w: int, h: int) -> Image.Image:
    """Left half black, right half white: shows which way an image was turned."""
    a = np.zeros((h, w), np.uint8)
    a[:, w // 2 :] = 255
    return Image.fromarray(a)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_declaring(w: int, h: int) -> bytes:
    """A few dozen bytes of PNG whose header claims w x h 1-bit pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_declaring(w: int, h: int) -> bytes:
    screen = struct.pack("<HHBBB", w, h, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


@pytest.fixture(scope="module")
def reference():
    """The training transform; needs torch, which only the tests (never the service) may import."""
    pytest.importorskip("torch")
    from srvit.data import Preprocessing

    return Preprocessing


def assert_parity(pre: Preprocessor, transform, data: bytes) -> None:
    ours = pre(data)
    theirs = transform(Image.open(io.BytesIO(data))).numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(28, 28), (40, 33), (19, 50)])
def test_fashion_mnist_matches_training_transform(reference, size):
    data = encode(photo(*size, mode="L"), "PNG")
    assert_parity(Preprocessor(FASHION, MAX_PIXELS), reference.fashion_mnist(), data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_imagenet_matches_training_transform_on_non_square_rgb(reference, fmt):
    """Images under twice the resize target take the exact path, JPEG included."""
    data = encode(photo(300, 230), fmt)
    assert_parity(Preprocessor(IMAGENET, MAX_PIXELS), reference.imagenet(224), data)


def test_manifest_preprocessing_from_reference_dict(reference):
    manifest = reference.imagenet(224).to_dict()
    assert Preprocessor(manifest, MAX_PIXELS).shape == (3, 224, 224)


def test_png_and_jpeg_round_trip_keep_the_picture():
    pre = Preprocessor(PIXELS, MAX_PIXELS)
    for fmt in ("PNG", "JPEG"):
        x = pre(encode(halves(16, 16), fmt))[0]
        assert x[:, :6].max() < 0.1 and x[:, 10:].min() > 0.9, fmt


@pytest.mark.parametrize("bomb", [png_declaring(30000, 30000), gif_declaring(30000, 30000), png_declaring(5000, 5000)])
def test_decompression_bomb_is_refused_before_decoding(monkeypatch, bomb):
    def no_decoding(self):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLarge):
        Preprocessor(IMAGENET, max_pixels=1_000_000)(bomb)


def test_pixel_limit_message_names_sizes_and_limit():
    with pytest.raises(ImageTooLarge, match=r"100x100 = 10000 pixels.*limit is 9999"):
        Preprocessor(PIXELS, max_pixels=9999)(encode(halves(100, 100), "PNG"))
    assert Preprocessor(PIXELS, max_pixels=10000)(encode(halves(100, 100), "PNG")).shape == (1, 16, 16)


def test_extreme_aspect_ratio_is_refused_before_decoding(monkeypatch):
    """1x40000 is few pixels, but resizing its shorter side to 256 would make 256x10240000 (gigabytes)."""
    strip = encode(photo(1, 40_000), "PNG")

    def no_decoding(self):
        raise AssertionError("decoded an image whose resize would not fit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLarge, match=r"aspect ratio is too extreme.*256x10240000.*limit is 40000000"):
        Preprocessor(IMAGENET, MAX_PIXELS)(strip)


def test_a_thin_image_within_the_limit_after_resizing_is_served():
    assert Preprocessor(IMAGENET, MAX_PIXELS)(encode(photo(40, 2000), "PNG")).shape == (3, 224, 224)


def test_refused_format_is_415_and_its_parser_never_runs(monkeypatch):
    def forbidden(self):
        raise AssertionError("EPS parser ran")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    pre = Preprocessor(IMAGENET, MAX_PIXELS)
    with pytest.raises(UnsupportedMediaType, match="EPS"):
        pre(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(UnsupportedMediaType, match="TIFF"):
        pre(encode(photo(20, 20), "TIFF"))


def test_allowlist_is_configurable():
    data = encode(photo(20, 20), "GIF")
    with pytest.raises(UnsupportedMediaType, match="GIF"):
        Preprocessor(IMAGENET, MAX_PIXELS, formats=("JPEG", "PNG"))(data)
    with pytest.raises(ValueError, match="NOPE"):
        Preprocessor(IMAGENET, MAX_PIXELS, formats=("JPEG", "NOPE"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_garbage_empty_and_truncated_bytes_are_invalid_image(fmt):
    pre = Preprocessor(IMAGENET, MAX_PIXELS)
    data = encode(photo(64, 48), fmt)
    for bad in (b"", b"not an image at all, just text", data[: len(data) // 2], data[:20]):
        with pytest.raises(InvalidImage):
            pre(bad)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_fuzzed_bytes_never_raise_anything_but_client_errors(fmt):
    """Whatever Pillow raises on a corrupted file must become a 4xx, never an unhandled exception."""
    pre = Preprocessor(IMAGENET, max_pixels=1_000_000)
    data = bytearray(encode(photo(32, 24), fmt))
    rng = random.Random(fmt)
    for _ in range(60):
        fuzzed = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            fuzzed[rng.randrange(len(fuzzed))] = rng.randrange(256)
        try:
            out = pre(bytes(fuzzed))
        except ServiceError as e:
            assert e.status in (400, 415, 422)
        else:
            assert out.shape == (3, 224, 224) and np.isfinite(out).all()


MODES = {
    "1": lambda: halves(40, 30).convert("1"),
    "L": lambda: photo(40, 30, "L"),
    "P": lambda: photo(40, 30).convert("P"),
    "PA": lambda: translucent(40, 30).convert("PA"),
    "LA": lambda: translucent(40, 30).convert("LA"),
    "La": lambda: translucent(40, 30).convert("LA").convert("La"),
    "RGBA": lambda: translucent(40, 30),
    "RGBa": lambda: translucent(40, 30).convert("RGBa"),
    "I;16": lambda: Image.fromarray(np.full((30, 40), 40000, np.uint16)),
    "I": lambda: photo(40, 30, "I"),
    "F": lambda: photo(40, 30, "F"),
    "CMYK": lambda: photo(40, 30, "CMYK"),
    "YCbCr": lambda: photo(40, 30, "YCbCr"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("manifest", [FASHION, IMAGENET], ids=["L", "RGB"])
def test_every_mode_gives_finite_output_of_the_right_shape(mode, manifest):
    img = MODES[mode]()
    assert img.mode == mode
    pre = Preprocessor(manifest, MAX_PIXELS)
    x = pre.to_tensor(to_channels(img, manifest["channels"]).resize((pre.input_size,) * 2))
    assert x.shape == pre.shape and x.dtype == np.float32 and np.isfinite(x).all()


@pytest.mark.parametrize("mode,fmt", [("1", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"),
                                      ("CMYK", "JPEG"), ("P", "GIF"), ("RGBA", "WEBP"), ("P", "BMP")])  # fmt: skip
def test_every_mode_a_file_can_hold_decodes_end_to_end(mode, fmt):
    data = encode(MODES[mode](), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    x = Preprocessor(IMAGENET, MAX_PIXELS)(data)
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 40000, 65535]], np.uint16)
    for mode in ("I;16", "I"):
        img = Image.fromarray(values).convert(mode) if mode == "I" else Image.fromarray(values)
        assert img.mode == mode
        assert np.asarray(to_channels(img, "L")).tolist() == [[0, 100, 156, 255]]


def test_float_images_read_as_unit_range():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0, 7.0, -1.0, np.nan]], np.float32))
    assert np.asarray(to_channels(img, "L")).tolist() == [[0, 128, 255, 255, 0, 0]]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_are_composited_onto_white(mode):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0)).convert(mode)
    assert np.asarray(to_channels(img, "RGB")).min() == 255
    assert np.asarray(to_channels(img, "L")).min() == 255


def test_palette_transparency_is_composited_and_background_is_configurable():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    assert np.asarray(to_channels(img, "L")).tolist() == [[255] * 4] * 4
    assert np.asarray(to_channels(img, "L", background=0)).max() == 0


def test_animated_gif_uses_frame_zero():
    frames = [halves(16, 16).convert("P"), Image.new("P", (16, 16), 0)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pre = Preprocessor(PIXELS, MAX_PIXELS)
    np.testing.assert_array_equal(pre(data), pre(encode(halves(16, 16), "PNG")))


def test_exif_orientation_is_applied():
    """Orientation 6: the stored image is shown turned a quarter clockwise, so left becomes top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(halves(48, 32), "JPEG", exif=exif.tobytes(), quality=95)
    pre = Preprocessor({**PIXELS, "resize_size": 16}, MAX_PIXELS)
    x = pre(data)[0]  # upright 32 x 48, resized to 16 x 24, center crop 16 x 16
    assert x[:6].max() < 0.1 and x[10:].min() > 0.9


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_leaves_the_image_as_stored():
    data = encode(halves(16, 16), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage", quality=95)
    x = Preprocessor(PIXELS, MAX_PIXELS)(data)[0]
    assert x[:, :6].max() < 0.1 and x[:, 10:].min() > 0.9


def test_large_jpeg_is_drafted_at_reduced_scale(reference, monkeypatch):
    """4000x3000 decodes at 1/8 scale (500x375), still above the 341x256 resize target."""
    ramp = Image.linear_gradient("L")
    big = Image.merge("RGB", [ramp.resize((4000, 3000)), ramp.rotate(90).resize((4000, 3000)), halves(4000, 3000)])
    data = encode(big, "JPEG", quality=90)
    resized_from = []
    original_resize = Image.Image.resize

    def spy(self, size, *args, **kw):
        resized_from.append(self.size)
        return original_resize(self, size, *args, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    x = Preprocessor(IMAGENET, MAX_PIXELS)(data)
    assert resized_from == [(500, 375)]
    assert x.shape == (3, 224, 224)
    monkeypatch.undo()
    exact = reference.imagenet(224)(Image.open(io.BytesIO(data))).numpy()
    diff = np.abs(x - exact)  # DCT scaling differs from a full decode only slightly
    assert diff.mean() < 0.01 and diff.max() < 0.1


def test_center_crop_matches_reference_offsets(reference):
    from srvit.data import center_crop as reference_crop

    img = photo(37, 30)
    assert center_crop(img, 24).tobytes() == reference_crop(img, 24).tobytes()


@pytest.mark.parametrize(
    "bad",
    [{"channels": "RGBA"}, {"mean": [0.1, 0.2]}, {"std": [0.0]}, {"interpolation": "bicubic"}, {"resize_size": 8}],
)
def test_manifest_the_server_cannot_follow_fails_at_startup(bad):
    with pytest.raises(ValueError):
        Preprocessor({**PIXELS, **bad}, MAX_PIXELS)


def test_service_modules_never_import_torch_or_srvit():
    """The base install serves without torch; a stray import would break it only there."""
    code = "import sys, service.batcher, service.preprocess; print(sorted({'torch', 'srvit'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pillow_bomb_limit_never_refuses_an_image_within_ours(monkeypatch):
    """Pillow errors at 2 * MAX_IMAGE_PIXELS inside Image.open; our limit, not Pillow's, must decide."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(halves(60, 60), "PNG")  # 3600 pixels: over 2 * 1000, within 10000
    assert Preprocessor(PIXELS, max_pixels=10_000)(data).shape == (1, 16, 16)
    assert Image.MAX_IMAGE_PIXELS == 10_000  # raised to ours, never lowered


def test_a_small_image_opened_for_the_event_loop_decodes_exactly_as_the_pool_would():
    pre = Preprocessor(FASHION, MAX_PIXELS)
    for data in (encode(photo(28, 28, "L"), "PNG"), encode(photo(40, 30), "JPEG"), encode(translucent(20, 20), "PNG")):
        img = pre.open_small(data, 16384)
        assert img is not None
        np.testing.assert_array_equal(pre.finish(img), pre(data))


def test_large_images_unreadable_bytes_and_large_resizes_are_left_to_the_pool():
    fashion, imagenet = Preprocessor(FASHION, MAX_PIXELS), Preprocessor(IMAGENET, MAX_PIXELS)
    assert fashion.open_small(encode(photo(200, 100), "PNG"), 16384) is None  # 20,000 pixels
    assert fashion.open_small(b"not an image", 16384) is None
    assert fashion.open_small(png_declaring(100_000, 100_000), 16384) is None  # over the pixel limit too
    assert imagenet.open_small(encode(photo(28, 28), "PNG"), 16384) is None  # a 256x256 resize is no small decode
    assert fashion.open_small(encode(photo(28, 28, "L"), "PNG"), 0) is None  # 0: every image to the pool
    with pytest.raises(InvalidImage):  # the pool then raises what it always did
        fashion(b"not an image")


def test_a_truncated_small_image_fails_as_a_client_error_when_finished():
    pre = Preprocessor(FASHION, MAX_PIXELS)
    data = encode(photo(28, 28, "L"), "PNG")
    img = pre.open_small(data[: len(data) // 2], 16384)
    assert img is not None  # its header is whole
    with pytest.raises(ServiceError) as e:
        pre.finish(img)
    assert 400 <= e.value.status < 500
