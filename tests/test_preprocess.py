"""Tests for image_classifier.preprocess, on real images encoded by Pillow (no mocks)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from image_classifier.constants import IMAGE_SIZE
from image_classifier.errors import (
    EmptyImageError,
    ImageDimensionsError,
    ImageTooLargeError,
    InvalidImageError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from image_classifier.preprocess import (
    ALPHA_BACKGROUND,
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    MAX_SIDE,
    center_crop_box,
    check_encoded_image,
    decode_image,
    decoded_pixels,
    normalize,
    preprocess_image,
    resize_to_input,
    tf_decode_and_resize,
    tf_normalize,
)

ImageBytes = Callable[..., bytes]
Encode = Callable[..., bytes]

ONE_LEVEL = 1.0 / 255.0
RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)
WHITE = np.ones(3, np.float32)
ALL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
LOSSY = ("JPEG", "WEBP")
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TF_SKIP_REASON = "tf_decode_and_resize needs TensorFlow (the 'train'/'serve' extras)"


# --- Helpers ---------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **save_kwargs: object) -> bytes:
    """Module-level twin of the ``encode_image`` fixture, for hypothesis strategies and setup."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def natural_image(size: tuple[int, int] = (80, 60)) -> Image.Image:
    """A photo-like RGB picture: smooth gradients plus a few solid shapes (not noise)."""
    width, height = size
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    red = 40 + 180 * x + 0 * y
    green = 30 + 190 * y + 0 * x
    blue = 128 + 100 * np.sin(3.0 * (x + y))
    pixels = np.stack([red, green, blue], axis=-1).round().clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((0.3 * width, 0.2 * height, 0.7 * width, 0.8 * height), fill=(240, 220, 40))
    draw.rectangle((0.05 * width, 0.55 * height, 0.25 * width, 0.9 * height), fill=(20, 40, 150))
    draw.line((0, 0, width, height), fill=(250, 250, 250), width=max(1, width // 40))
    return image


def halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...], mode: str):
    """An image whose left half is ``left`` and right half is ``right``."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def expected(color: tuple[int, int, int]) -> np.ndarray:
    return normalize(np.asarray(color, np.uint8))


def assert_model_input(out: np.ndarray) -> None:
    assert isinstance(out, np.ndarray)
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0
    assert out.max() <= 1.0


def assert_solid(out: np.ndarray, color: tuple[int, int, int], atol: float) -> None:
    assert_model_input(out)
    np.testing.assert_allclose(out, np.broadcast_to(expected(color), out.shape), atol=atol)


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim ``width`` x ``height`` (CRC recomputed)."""
    data = bytearray(_encode(Image.new("RGB", (1, 1), RED), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 header is patched to claim ``width`` x ``height``."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), RED), "JPEG", quality=95))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# --- Formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_each_format_decodes_to_the_model_input(image_bytes: ImageBytes, fmt: str) -> None:
    color = (200, 60, 30)
    out = preprocess_image(image_bytes(fmt, "RGB", (50, 40), color))
    assert_solid(out, color, atol=4 * ONE_LEVEL if fmt in LOSSY else ONE_LEVEL)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_each_format_keeps_a_natural_picture(fmt: str) -> None:
    image = natural_image((96, 64))
    reference = resize_to_input(image)
    out = preprocess_image(_encode(image, fmt))
    assert_model_input(out)
    # GIF quantizes to 256 colours, JPEG and WebP are lossy: close, not equal.
    tolerance = 0.0 if fmt in ("PNG", "BMP", "TIFF") else 0.03
    assert np.abs(out - reference).mean() <= tolerance


@pytest.mark.parametrize(
    ("fmt", "save_kwargs"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})],
    ids=["GIF", "APNG", "WebP"],
)
def test_animation_uses_the_first_frame(fmt: str, save_kwargs: dict[str, object]) -> None:
    first = Image.new("RGB", (40, 40), RED)
    second = Image.new("RGB", (40, 40), BLUE)
    data = _encode(first, fmt, save_all=True, append_images=[second], duration=100, **save_kwargs)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 2  # really animated
    assert_solid(preprocess_image(data), RED, atol=ONE_LEVEL)


# --- Modes -----------------------------------------------------------------------------------


def test_grayscale_l(image_bytes: ImageBytes) -> None:
    assert_solid(preprocess_image(image_bytes("PNG", "L", (40, 30), 100)), (100,) * 3, 0.0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize(
    ("value", "level"),
    [(0, 0), (257, 1), (255, 1), (32896, 128), (65535, 255), (60000, 233)],
)
def test_16_bit_grayscale_is_scaled_not_clipped(fmt: str, value: int, level: int) -> None:
    image = Image.fromarray(np.full((30, 40), value, np.uint16))
    assert image.mode == "I;16"
    data = _encode(image, fmt)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")  # really stored and read as 16-bit
    assert_solid(preprocess_image(data), (level,) * 3, atol=1e-7)


def test_16_bit_gradient_spans_the_whole_range() -> None:
    row = np.linspace(0, 65535, 64).round().astype(np.uint16)
    image = Image.fromarray(np.tile(row, (64, 1)))
    out = preprocess_image(_encode(image, "PNG"))
    assert_model_input(out)
    gray = out[..., 0]
    np.testing.assert_allclose(gray, out[..., 1])
    reference = np.linspace(0.0, 1.0, IMAGE_SIZE)  # 64 -> 32 columns: the same ramp
    np.testing.assert_allclose(gray.mean(axis=0), reference, atol=0.02)
    assert gray[:, 0].max() < 0.02
    assert gray[:, -1].min() > 0.98
    # Strictly increasing: nothing saturated at 255 (the clipping bug) or stuck at 0.
    assert (np.diff(gray.mean(axis=0)) > 0).all()


def test_palette_p(encode_image: Encode) -> None:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (3 * 254))
    assert_solid(preprocess_image(encode_image(image, "PNG")), (10, 200, 30), atol=0.0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_p_with_transparency_is_composited_on_white(encode_image: Encode, fmt: str):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (3 * 254))
    image.paste(1, (32, 0, 64, 64))  # right half: opaque green; left half: transparent black
    out = preprocess_image(encode_image(image, fmt, transparency=0))
    assert_model_input(out)
    np.testing.assert_allclose(out[:, :12], np.broadcast_to(WHITE, (32, 12, 3)))
    np.testing.assert_allclose(out[:, 20:], np.broadcast_to(expected((10, 200, 30)), (32, 12, 3)))


def test_cmyk_jpeg(image_bytes: ImageBytes) -> None:
    data = image_bytes("JPEG", "CMYK", (40, 40), (0, 255, 255, 0), quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    assert_solid(preprocess_image(data), RED, atol=4 * ONE_LEVEL)


def test_rgba_is_composited_on_white(encode_image: Encode) -> None:
    assert ALPHA_BACKGROUND == (255, 255, 255)
    # Fully transparent pixels hold black: a plain convert("RGB") would make them black.
    image = halves((64, 64), (0, 0, 0, 0), (*RED, 255), "RGBA")
    out = preprocess_image(encode_image(image, "PNG"))
    assert_model_input(out)
    np.testing.assert_array_equal(out[:, :12], np.broadcast_to(WHITE, (32, 12, 3)))
    np.testing.assert_array_equal(out[:, 20:], np.broadcast_to(expected(RED), (32, 12, 3)))


def test_rgba_half_transparent_blends_with_white(image_bytes: ImageBytes) -> None:
    out = preprocess_image(image_bytes("PNG", "RGBA", (40, 40), (0, 0, 0, 128)))
    assert_solid(out, (127,) * 3, atol=ONE_LEVEL)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_rgba_other_formats(encode_image: Encode, fmt: str) -> None:
    image = halves((64, 64), (0, 0, 0, 0), (*RED, 255), "RGBA")
    save_kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = preprocess_image(encode_image(image, fmt, **save_kwargs))
    np.testing.assert_allclose(out[:, :12], np.broadcast_to(WHITE, (32, 12, 3)), atol=ONE_LEVEL)
    np.testing.assert_allclose(
        out[:, 20:], np.broadcast_to(expected(RED), (32, 12, 3)), atol=ONE_LEVEL
    )


def test_la_is_composited_on_white(encode_image: Encode) -> None:
    image = halves((64, 64), (0, 0), (50, 255), "LA")
    out = preprocess_image(encode_image(image, "PNG"))
    assert_model_input(out)
    np.testing.assert_array_equal(out[:, :12], np.broadcast_to(WHITE, (32, 12, 3)))
    np.testing.assert_array_equal(out[:, 20:], np.broadcast_to(expected((50,) * 3), (32, 12, 3)))


@pytest.mark.parametrize(("mode", "color"), [("RGB", (10, 20, 30)), ("L", 40)])
def test_png_transparency_colour_key_is_composited(encode_image: Encode, mode: str, color):
    """A tRNS colour key (RGB or L PNG): pixels of that colour are transparent -> white."""
    image = Image.new(mode, (40, 40), color)
    image.paste((200, 100, 50) if mode == "RGB" else 90, (20, 0, 40, 40))
    out = preprocess_image(encode_image(image, "PNG", transparency=color))
    assert_model_input(out)
    np.testing.assert_array_equal(out[:, :12], np.broadcast_to(WHITE, (32, 12, 3)))
    right = (200, 100, 50) if mode == "RGB" else (90,) * 3
    np.testing.assert_array_equal(out[:, 20:], np.broadcast_to(expected(right), (32, 12, 3)))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_one_bit(encode_image: Encode, fmt: str) -> None:
    image = halves((64, 64), (0,), (1,), "1")
    data = encode_image(image, fmt)
    out = preprocess_image(data)
    assert_model_input(out)
    np.testing.assert_array_equal(out[:, :12], np.zeros((32, 12, 3), np.float32))
    np.testing.assert_array_equal(out[:, 20:], np.broadcast_to(WHITE, (32, 12, 3)))


@pytest.mark.parametrize(
    ("mode", "color"),
    [("L", 7), ("P", 3), ("RGB", (1, 2, 3)), ("RGBA", (1, 2, 3, 255)), ("LA", (9, 255))],
)
def test_decode_image_always_returns_rgb(image_bytes: ImageBytes, mode: str, color) -> None:
    image = decode_image(image_bytes("PNG", mode, (20, 10), color))
    assert image.mode == "RGB"
    assert image.size == (20, 10)


# --- EXIF orientation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "top", "bottom", "left", "right"),
    [
        (None, None, None, RED, BLUE),  # no tag: as stored
        (1, None, None, RED, BLUE),  # "normal"
        (3, None, None, BLUE, RED),  # rotated 180 degrees
        (6, RED, BLUE, None, None),  # rotate 90 degrees clockwise to display
        (8, BLUE, RED, None, None),  # rotate 90 degrees counter-clockwise to display
    ],
)
def test_exif_orientation_is_applied(encode_image: Encode, orientation, top, bottom, left, right):
    stored = halves((64, 64), RED, BLUE, "RGB")  # left half red, right half blue, as stored
    save_kwargs: dict[str, object] = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save_kwargs["exif"] = exif.tobytes()
    out = preprocess_image(encode_image(stored, "JPEG", **save_kwargs))
    assert_model_input(out)
    tolerance = 0.1  # JPEG chroma at a sharp edge; the halves are far apart in colour

    def assert_region(region: np.ndarray, color: tuple[int, int, int]) -> None:
        np.testing.assert_allclose(region.mean(axis=(0, 1)), expected(color), atol=tolerance)

    if top is not None:
        assert_region(out[:12], top)
        assert_region(out[20:], bottom)
    else:
        assert_region(out[:, :12], left)
        assert_region(out[:, 20:], right)


def test_exif_orientation_swaps_width_and_height(encode_image: Encode) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_image(natural_image((80, 40)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (40, 80)


# --- Resize policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(200, 100), (100, 200), (400, 100), (97, 301)])
def test_center_crop_keeps_only_the_center_square(encode_image: Encode, size) -> None:
    """The trimmed margins are red; the center square green: no red may reach the output."""
    width, height = size
    image = Image.new("RGB", size, RED)
    left, top, right, bottom = center_crop_box(width, height)
    image.paste(GREEN, (left, top, right, bottom))
    out = preprocess_image(encode_image(image, "PNG"))
    assert_model_input(out)
    np.testing.assert_array_equal(out, np.broadcast_to(expected(GREEN), out.shape))


def test_center_crop_is_not_a_squash(encode_image: Encode) -> None:
    """A 2:1 image with a circle in the middle: the circle stays round (same width and height)."""
    image = Image.new("L", (256, 128), 0)
    ImageDraw.Draw(image).ellipse((64, 0, 191, 127), fill=255)
    out = preprocess_image(encode_image(image, "PNG"))[..., 0]
    inside = out > 0.5
    height = inside.any(axis=1).sum()
    width = inside.any(axis=0).sum()
    assert abs(int(height) - int(width)) <= 1
    assert width >= IMAGE_SIZE - 2  # the circle fills the crop


@pytest.mark.parametrize(
    ("size", "box"),
    [
        ((200, 100), (50, 0, 150, 100)),
        ((100, 200), (0, 50, 100, 150)),
        ((7, 4), (1, 0, 5, 4)),
        ((32, 32), (0, 0, 32, 32)),
        ((1, 1), (0, 0, 1, 1)),
    ],
)
def test_center_crop_box(size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    assert center_crop_box(*size) == box


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    color=st.tuples(*[st.integers(0, 255)] * 3),
    fmt=st.sampled_from(["PNG", "BMP", "TIFF"]),
)
def test_solid_colour_of_any_size_maps_to_that_colour(width, height, color, fmt) -> None:
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        width = height = min(width, height) * 2  # keep the example, drop the absurd ratio
    image = Image.new("RGB", (width, height), color)
    assert_solid(preprocess_image(_encode(image, fmt)), color, atol=ONE_LEVEL + 1e-6)


def test_resize_to_input_and_normalize() -> None:
    out = resize_to_input(Image.new("RGB", (100, 60), (0, 128, 255)))
    assert_solid(out, (0, 128, 255), atol=0.0)
    levels = normalize(np.arange(256, dtype=np.uint8))
    assert levels.dtype == np.float32
    assert levels[0] == 0.0
    assert levels[255] == 1.0
    np.testing.assert_allclose(levels, np.arange(256) / 255.0, atol=1e-7)


# --- Draft mode for large JPEGs --------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    image = natural_image((400, 300)).resize((4000, 3000), Image.Resampling.BICUBIC)
    return _encode(image, "JPEG", quality=90)


def test_large_jpeg_is_decoded_in_draft_mode(large_jpeg: bytes) -> None:
    decoded = decode_image(large_jpeg)
    assert decoded.mode == "RGB"
    width, height = decoded.size
    assert width <= 4000 // 4
    assert height <= 3000 // 4
    assert min(width, height) >= IMAGE_SIZE  # still enough pixels for a 32x32 crop
    assert width / height == pytest.approx(4000 / 3000, rel=0.01)

    with Image.open(io.BytesIO(large_jpeg)) as full:
        full_rgb = full.convert("RGB")  # full-resolution decode: the reference
    assert full_rgb.size == (4000, 3000)
    reference = resize_to_input(full_rgb)
    out = preprocess_image(large_jpeg)
    assert_model_input(out)
    assert np.abs(out - reference).mean() < 0.02


# --- Bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        EmptyImageError,
        NotAnImageError,
        TruncatedImageError,
        ImageTooLargeError,
        ImageDimensionsError,
    ],
)
def test_errors_are_invalid_image_and_value_errors(error: type[Exception]) -> None:
    assert issubclass(error, InvalidImageError)
    assert issubclass(error, ValueError)


def test_empty_bytes() -> None:
    with pytest.raises(EmptyImageError, match="empty"):
        preprocess_image(b"")


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is plain text and not a picture",
        b"\x00",
        np.random.default_rng(0).bytes(4096),
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        b"\x89PNG\r\n\x1a\n",  # a signature and nothing else
    ],
    ids=["text", "one-byte", "random", "svg", "pdf", "png-signature-only"],
)
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(NotAnImageError, match=r"not a supported image|cannot be read"):
        preprocess_image(data)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_pillow_knows_but_we_do_not_accept(image_bytes: ImageBytes, fmt: str) -> None:
    with pytest.raises(NotAnImageError, match="not a supported image"):
        preprocess_image(image_bytes(fmt, "RGB", (32, 32), RED))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(encode_image: Encode, fmt: str) -> None:
    data = encode_image(natural_image((160, 120)), fmt)
    with Image.open(io.BytesIO(data[: len(data) // 2])) as check:
        assert check.format == fmt  # Pillow still identifies it: only the body is short
    with pytest.raises(TruncatedImageError, match="truncated"):
        preprocess_image(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "GIF", "TIFF"])
def test_truncated_other_formats_raise_an_invalid_image_error(encode_image: Encode, fmt: str):
    data = encode_image(natural_image((160, 120)), fmt)
    with pytest.raises(InvalidImageError):
        preprocess_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data",
    [
        png_with_size(100_000, 100_000),  # past Pillow's own bomb limit as well
        png_with_size(9_000, 9_000),  # 81 MP: only our limit (50 MP) catches it
        png_with_size(MAX_SIDE, MAX_PIXELS // MAX_SIDE + 1),
        jpeg_with_size(60_000, 60_000),
    ],
    ids=["png-100000x100000", "png-9000x9000", "png-just-over-limit", "jpeg-60000x60000"],
)
def test_huge_header_is_rejected_without_decoding(data: bytes) -> None:
    # The pixel data is that of a tiny image: decoding would fail as truncated, not too large.
    with pytest.raises(ImageTooLargeError, match="pixels"):
        preprocess_image(data)


def test_real_image_over_a_lowered_pixel_limit(encode_image: Encode) -> None:
    data = encode_image(natural_image((2000, 1500)), "JPEG")
    with pytest.raises(ImageTooLargeError, match=r"2000x1500 = 3,000,000 pixels.*1,000,000"):
        preprocess_image(data, max_pixels=1_000_000)
    assert_model_input(preprocess_image(data, max_pixels=3_000_000))


def test_raised_pixel_limit_is_honoured() -> None:
    """Over Pillow's own warning threshold (~89 MP) but under the caller's limit: not too large."""
    data = jpeg_with_size(9_500, 9_500)  # 90.25 MP claimed, 16x16 of data
    try:
        preprocess_image(data, max_pixels=120_000_000)
    except ImageTooLargeError as exc:  # pragma: no cover - the failure being guarded against
        pytest.fail(f"a 90 MP header was rejected under a 120 MP limit: {exc}")
    except InvalidImageError:
        pass  # truncated: the claimed pixels are not there, which is fine


@pytest.mark.parametrize("size", [(1000, 10), (10, 1000), (211, 10)])
def test_absurd_aspect_ratio(image_bytes: ImageBytes, size: tuple[int, int]) -> None:
    with pytest.raises(ImageDimensionsError, match="aspect ratio"):
        preprocess_image(image_bytes("PNG", "RGB", size, RED))


def test_aspect_ratio_at_the_limit_is_accepted(image_bytes: ImageBytes) -> None:
    size = (int(10 * MAX_ASPECT_RATIO), 10)
    assert_solid(preprocess_image(image_bytes("PNG", "RGB", size, RED)), RED, atol=0.0)


def test_side_over_max_side() -> None:
    with pytest.raises(ImageDimensionsError, match="side over"):
        preprocess_image(png_with_size(MAX_SIDE + 1, 1_500))


def test_zero_sized_header() -> None:
    with pytest.raises(InvalidImageError):
        preprocess_image(png_with_size(0, 10))


# --- Properties: nothing but InvalidImageError ever escapes ---------------------------------


def _seed_images() -> list[bytes]:
    picture = natural_image((24, 20))
    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(picture.size))
    gray16 = Image.fromarray(np.asarray(picture.convert("L"), np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        _encode(picture, "JPEG"),
        _encode(picture, "JPEG", progressive=True, exif=exif.tobytes()),
        _encode(picture, "PNG"),
        _encode(rgba, "PNG"),
        _encode(picture.convert("P"), "PNG", transparency=0),
        _encode(gray16, "PNG"),
        _encode(picture.convert("LA"), "PNG"),
        _encode(picture, "GIF", save_all=True, append_images=[rgba.convert("RGB")]),
        _encode(picture, "BMP"),
        _encode(picture.convert("1"), "BMP"),
        _encode(picture, "WEBP"),
        _encode(rgba, "WEBP", lossless=True),
        _encode(picture, "TIFF"),
        _encode(picture, "TIFF", compression="tiff_lzw"),
        _encode(gray16, "TIFF"),
        _encode(picture.convert("CMYK"), "JPEG"),
    ]


SEED_IMAGES = _seed_images()
MAGIC_PREFIXES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
]


# Pillow warns (UserWarning) about the corrupt EXIF/TIFF tags it skips; expected noise here.
CORRUPT_DATA_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning")


def assert_only_invalid_image_errors(data: bytes) -> None:
    try:
        out = preprocess_image(data)
    except InvalidImageError as exc:
        assert str(exc)  # every error carries a message
    else:
        assert_model_input(out)


@CORRUPT_DATA_WARNINGS
@PROPERTY_SETTINGS
@given(prefix=st.sampled_from(MAGIC_PREFIXES), body=st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_invalid_image_errors(prefix: bytes, body: bytes) -> None:
    assert_only_invalid_image_errors(prefix + body)


@st.composite
def corrupted_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@CORRUPT_DATA_WARNINGS
@PROPERTY_SETTINGS
@given(data=corrupted_images())
def test_corrupted_images_raise_only_invalid_image_errors(data: bytes) -> None:
    assert_only_invalid_image_errors(data)


def test_seed_images_are_valid() -> None:
    for data in SEED_IMAGES:
        assert_model_input(preprocess_image(data))


# --- The TensorFlow in-graph mirror ----------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow", reason=TF_SKIP_REASON)


def _natural_rgba(size: tuple[int, int]) -> Image.Image:
    image = natural_image(size).convert("RGBA")
    alpha = Image.linear_gradient("L").rotate(90).resize(size)  # 255 .. 0, left to right
    ImageDraw.Draw(alpha).rectangle((0, 0, size[0] // 6, size[1]), fill=0)  # fully transparent
    image.putalpha(alpha)
    return image


TF_CASES = {
    "png": lambda: _encode(natural_image((80, 60)), "PNG"),
    "jpeg": lambda: _encode(natural_image((80, 60)), "JPEG", quality=90),
    "jpeg-draft": lambda: _encode(natural_image((300, 200)), "JPEG", quality=90),
    "gif": lambda: _encode(natural_image((80, 60)), "GIF"),
    "bmp": lambda: _encode(natural_image((60, 80)), "BMP"),
    "webp": lambda: _encode(natural_image((80, 60)), "WEBP"),
    "png-rgba": lambda: _encode(_natural_rgba((90, 70)), "PNG"),
    "png-gray": lambda: _encode(natural_image((80, 60)).convert("L"), "PNG"),
    "png-gray-alpha": lambda: _encode(_natural_rgba((70, 90)).convert("LA"), "PNG"),
    "png-palette-transparent": lambda: _encode(
        natural_image((64, 48)).convert("P"), "PNG", transparency=0
    ),
    "png-square": lambda: _encode(natural_image((64, 64)), "PNG"),
    "png-small": lambda: _encode(natural_image((20, 16)), "PNG"),  # upscaled, not shrunk
}


@pytest.mark.parametrize("case", sorted(TF_CASES))
def test_tf_decode_and_resize_matches_preprocess_image(tf, case: str) -> None:
    data = TF_CASES[case]()
    reference = preprocess_image(data)
    out = tf_decode_and_resize(tf.constant(data)).numpy()
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert out.dtype == np.float32
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    diff = np.abs(out - reference)
    assert diff.mean() < 0.01, f"{case}: mean abs diff {diff.mean():.4f}"
    assert diff.max() < 0.06, f"{case}: max abs diff {diff.max():.4f}"


def test_tf_decode_and_resize_in_a_graph(tf) -> None:
    """As the bytes serving signature uses it: a traced function over a batch of strings."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def batch(images):
        return tf.map_fn(
            tf_decode_and_resize, images, fn_output_signature=tf.TensorSpec(None, tf.float32)
        )

    datas = [TF_CASES["png"](), TF_CASES["jpeg"](), TF_CASES["png-rgba"]()]
    out = batch(tf.constant(datas)).numpy()
    assert out.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    for got, data in zip(out, datas, strict=True):
        assert np.abs(got - preprocess_image(data)).mean() < 0.01


def test_tf_normalize_matches_normalize(tf) -> None:
    levels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(tf_normalize(tf.constant(levels)).numpy(), normalize(levels))


def test_encoded_pixel_check_counts_gif_frames_and_passes_unknown_bytes() -> None:
    frames = [Image.new("RGB", (100, 100), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    gif = buffer.getvalue()
    assert check_encoded_image(gif, max_pixels=30_000) == 30_000  # 3 x 10,000 pixels: allowed
    with pytest.raises(ImageTooLargeError, match=r"30,000 pixels \(100x100 x 3 frames\)"):
        check_encoded_image(gif, max_pixels=29_999)
    assert check_encoded_image(b"not an image", max_pixels=1) == 0  # the decoder's to judge


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_encoded_pixel_check_reads_every_format_tensorflow_decodes(image_format: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(buffer, image_format)
    assert check_encoded_image(buffer.getvalue()) == 300 * 200
    with pytest.raises(ImageTooLargeError):
        check_encoded_image(buffer.getvalue(), max_pixels=300 * 200 - 1)


def test_encoded_pixel_check_passes_raw_pixels_and_formats_tensorflow_refuses() -> None:
    # serving_pixels' raw bytes are no image; TensorFlow's decode_image refuses TIFF unread.
    pixels = np.full((32, 32, 3), 200, dtype=np.uint8).tobytes()
    assert check_encoded_image(pixels, max_pixels=1) == 0
    tiff = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(tiff, "TIFF")
    assert check_encoded_image(tiff.getvalue(), max_pixels=1) == 0


def test_encoded_image_check_refuses_animated_webp_but_not_a_still_one() -> None:
    # TensorFlow's in-graph WebP decoder aborts the whole process on an animated WebP.
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    animated, still = io.BytesIO(), io.BytesIO()
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:])
    frames[0].save(still, "WEBP")
    with pytest.raises(UnsupportedImageError, match="animated WebP"):
        check_encoded_image(animated.getvalue())
    assert check_encoded_image(still.getvalue()) == 32 * 32
    # The Python path decodes its first frame, as it does for GIF.
    assert preprocess_image(animated.getvalue()).shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("size", "error"),
    [
        ((20_001, 1_000), ImageDimensionsError),
        ((2_100, 100), ImageDimensionsError),
        ((8_000, 7_000), ImageTooLargeError),
    ],
)
def test_both_decoders_apply_one_dimension_rule(
    size: tuple[int, int], error: type[Exception]
) -> None:
    data = _encode(Image.new("1", size), "PNG")
    with pytest.raises(error):
        check_encoded_image(data, max_pixels=50_000_000)
    with pytest.raises(error):
        preprocess_image(data)


def test_decoded_pixels_counts_the_reduced_jpeg_decode() -> None:
    photo = _encode(Image.new("RGB", (4000, 3000), "gray"), "JPEG")
    png = _encode(Image.new("RGB", (400, 300), "gray"), "PNG")
    # Draft mode decodes a 4000x3000 JPEG at 1/8 scale: 500x375.
    assert decoded_pixels(photo) == 500 * 375
    assert decoded_pixels(png) == 400 * 300
    assert decoded_pixels(b"garbage") == 0
