"""The one definition of how a picture becomes a model input.

``preprocess_image(bytes) -> float32 (32, 32, 3) in [0, 1]``, NHWC, RGB. Training (image folders),
``make-request``, the gateway and the model's in-graph bytes signature all follow these steps:

1. **Decode** JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF with Pillow. Before any pixel is
   decoded the header is checked against :data:`MAX_PIXELS` (decompression bombs) and
   :data:`MAX_SIDE` / :data:`MAX_ASPECT_RATIO` (absurd dimensions).
2. **Shrink cheaply**: JPEGs are decoded at reduced size with the decoder's DCT scaling
   (Pillow's draft mode), so a 4000x3000 photo is decoded at 1/8 scale instead of 12 MP.
3. **Orient** by the EXIF orientation tag (phones store pictures sideways and say so there).
4. **Convert to RGB**: grayscale, palette, CMYK and 16-bit images are converted; transparent
   images are composited on a white background (:data:`ALPHA_BACKGROUND`), because a transparent
   pixel has no colour of its own and product photos with transparency are meant to be seen on
   white.
5. **Center-crop and resize**: the largest centered square is resized to 32x32 with an
   antialiasing (triangle) filter. Center-crop rather than squash: CIFAR-10 objects are centered
   and shown at their true aspect ratio, so squashing a 4:3 photo stretches the object by a third,
   a distortion the model never saw in training, while the crop only trims background at the
   edges. ``benchmarks/resize_policy.py`` measures both on validation images framed 4:3 and
   3:4 with background around the object: center-crop 85.6%, squash 82.8-83.8%.
6. **Normalize** to float32 in [0, 1] (``/ 255``). Standardization (mean/std) lives inside the
   model, so every caller sends the same [0, 1] contract.

TensorFlow is imported lazily, only by the ``tf_*`` functions that mirror these steps inside a
graph, so this module (and the gateway that uses it) works without TensorFlow installed.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import TYPE_CHECKING, Final

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from image_classifier.constants import IMAGE_SIZE
from image_classifier.errors import (
    EmptyImageError,
    ImageDimensionsError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

if TYPE_CHECKING:
    import tensorflow as tf

MAX_PIXELS: Final = 50_000_000  # 50 MP: above any phone camera, far below a bomb's size
MAX_SIDE: Final = 20_000
MAX_ASPECT_RATIO: Final = 20.0  # beyond this a 32x32 center crop shows a sliver of the picture
ALPHA_BACKGROUND: Final = (255, 255, 255)
PIXEL_SCALE: Final = 1.0 / 255.0
SUPPORTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
# The openers to try: MPO (multi-picture JPEG) has none of its own in Pillow, the JPEG opener
# returns it, and naming it in ``Image.open(formats=...)`` raises KeyError for non-JPEG input.
_OPEN_FORMATS: Final = tuple(f for f in SUPPORTED_FORMATS if f != "MPO")

# Pillow warns (and at 2x raises) on its own bomb threshold. Its warning is silenced (our own
# ``max_pixels`` check runs right after the header is read, before any pixel is decoded) and its
# error is turned into ours, so its global is left alone.
_DRAFT_SIZE: Final = (IMAGE_SIZE * 2, IMAGE_SIZE * 2)
# The prefixes by which tf.io.decode_image tells JPEG, PNG, GIF and BMP apart (WebP is RIFF with
# "WEBP" at offset 8); anything else it refuses without decoding.
_TF_IMAGE_MAGIC: Final = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF", b"BM")


def _tf_decodable(data: bytes) -> bool:
    return data.startswith(_TF_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def check_encoded_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> int:
    """The guards of :func:`decode_image`, from the header alone, for decoders without them.

    For the in-graph ``serving_bytes`` decoder, which has no size limit and cannot take every
    image: the same dimension rule (:func:`check_dimensions`), all frames of a GIF counted
    (TensorFlow's GIF decoder materializes every frame), and animated WebP refused (TensorFlow's
    WebP decoder corrupts the heap on it and aborts the process). Bytes Pillow cannot identify
    pass, leaving the verdict to the decoder that follows. Returns the pixels that will be
    decoded (0 when unknown).

    Bytes without the magic number of a format TensorFlow's ``decode_image`` recognises (it
    goes by the same prefixes) are passed at once: raw pixels sent to ``serving_pixels`` are
    no image, and asking each of Pillow's openers about them costs more than the model call's
    bookkeeping.
    """
    if not _tf_decodable(data):
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                size, image_format = image.size, image.format
                frames = getattr(image, "n_frames", 1)
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"the image has too many pixels (limit {max_pixels:,})") from None
    except Exception:
        return 0
    if image_format == "WEBP" and frames > 1:
        raise UnsupportedImageError(
            f"animated WebP ({frames} frames) is not supported here; send a still image "
            "(for example its first frame as PNG or JPEG)"
        )
    check_dimensions(size, max_pixels)
    width, height = size
    decoded = width * height * (frames if image_format == "GIF" else 1)
    if decoded > max_pixels:
        raise ImageTooLargeError(
            f"the image decodes to {decoded:,} pixels ({width}x{height} x {frames} frames), "
            f"over the limit of {max_pixels:,}"
        )
    return decoded


def decoded_pixels(data: bytes) -> int:
    """How many pixels :func:`decode_image` will hold for ``data``, from the header alone.

    JPEGs decode at reduced size (draft mode), so they cost a fraction of their pixel count;
    0 when the bytes cannot be identified (the decoder will refuse them without decoding).
    Used to budget memory before decoding, not to refuse: :func:`decode_image` does that.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only the formats decode_image opens: anything else decodes to nothing here.
            with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as image:
                if image.format in ("JPEG", "MPO"):
                    image.draft("RGB", _DRAFT_SIZE)  # changes .size to the reduced decode size
                width, height = image.size
    except Exception:
        return 0
    return width * height


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode, check, orient and convert encoded image bytes to an RGB Pillow image.

    Raises the :class:`~image_classifier.errors.InvalidImageError` subclasses, never a Pillow one.
    """
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        raise NotAnImageError(
            "the data is not a supported image (JPEG, PNG, WebP, BMP, GIF or TIFF)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"the image has too many pixels (limit {max_pixels:,})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise NotAnImageError(f"the image header cannot be read: {exc}") from None

    check_dimensions(image.size, max_pixels)
    try:
        image.seek(0)  # first frame of animations (GIF, APNG, WebP)
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", _DRAFT_SIZE)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image) or image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"the image has too many pixels (limit {max_pixels:,})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as exc:
        raise TruncatedImageError(f"the image data is truncated or corrupt: {exc}") from None


def check_dimensions(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> None:
    """The one rule for an image's size, wherever it is decoded: pixels, sides, aspect ratio."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageDimensionsError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}"
        )
    if max(width, height) > MAX_SIDE:
        raise ImageDimensionsError(
            f"the image is {width}x{height}; a side over {MAX_SIDE:,} pixels is not accepted"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageDimensionsError(
            f"the image is {width}x{height}; an aspect ratio over {MAX_ASPECT_RATIO:g}:1 "
            "is not accepted"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
        # 16-bit grayscale: Pillow's own conversion clips at 255 instead of scaling. The scale is
        # fixed by the bit depth, never guessed from the pixels (a dark 16-bit picture whose
        # values are all <= 255 is nearly black, not an 8-bit picture).
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0))
    if mode == "I":
        # 32-bit integer (TIFF): no bit depth to go by; 16-bit range if it exceeds 8 bits.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if pixels.max(initial=0) > 255 else 1.0
        return _gray_to_rgb(pixels * scale)
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
        return _gray_to_rgb(pixels * scale)
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in image.info)
        or (mode in ("L", "RGB") and "transparency" in image.info)
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _gray_to_rgb(pixels: np.ndarray) -> Image.Image:
    """Gray levels already scaled to [0, 255] (float) -> RGB, rounded rather than truncated."""
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
    gray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")  # 2-D uint8 -> mode "L"


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centered square, as a Pillow box (left, upper, right, lower)."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def resize_to_pixels(image: Image.Image) -> np.ndarray:
    """Center-crop an RGB image and resize it to 32x32 with antialiasing: uint8 (32, 32, 3)."""
    box = center_crop_box(*image.size)
    # Crop first: ``resize(box=...)`` lets the filter reach pixels outside the box, so the edges
    # of the crop would be blended with the trimmed margins (and differ from the in-graph mirror).
    square = image.crop(box) if box != (0, 0, *image.size) else image
    small = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def resize_to_input(image: Image.Image) -> np.ndarray:
    """Center-crop an RGB image, resize it to 32x32 with antialiasing, and normalize to [0, 1]."""
    return normalize(resize_to_pixels(image))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB pixels -> float32 in [0, 1]: the model's input contract."""
    return pixels.astype(np.float32) * np.float32(PIXEL_SCALE)


def preprocess_pixels(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> the model input before normalization: uint8 (32, 32, 3).

    ``normalize(preprocess_pixels(b)) == preprocess_image(b)`` exactly; the uint8 form is what
    travels on the compact wire (``serving_pixels``), 4x smaller than float32.
    """
    return resize_to_pixels(decode_image(data, max_pixels=max_pixels))


def preprocess_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> float32 array (32, 32, 3) in [0, 1], ready for the model."""
    return normalize(preprocess_pixels(data, max_pixels=max_pixels))


# --- The same steps inside a TensorFlow graph (training pipeline and the bytes signature) ----


def tf_normalize(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 tensor -> float32 in [0, 1], identical to :func:`normalize`."""
    import tensorflow as tf

    return tf.cast(pixels, tf.float32) * PIXEL_SCALE


def tf_decode_and_resize(data: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string tensor) -> float32 (32, 32, 3) in [0, 1], in-graph.

    Mirrors :func:`preprocess_image` for what TensorFlow's decoders support (JPEG, PNG, GIF first
    frame, BMP, WebP): alpha composited on white, center crop, antialiased bilinear resize. EXIF
    orientation is not applied in-graph; clients that need it send preprocessed floats.
    """
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
    image = tf.cast(image, tf.float32)
    channels = tf.shape(image)[-1]
    background = tf.constant(ALPHA_BACKGROUND, tf.float32)

    def gray() -> tf.Tensor:
        return tf.image.grayscale_to_rgb(image[..., :1])

    def gray_alpha() -> tf.Tensor:
        alpha = image[..., 1:2] / 255.0
        return tf.image.grayscale_to_rgb(image[..., :1]) * alpha + background * (1.0 - alpha)

    def rgb() -> tf.Tensor:
        return image[..., :3]

    def rgba() -> tf.Tensor:
        alpha = image[..., 3:4] / 255.0
        return image[..., :3] * alpha + background * (1.0 - alpha)

    image = tf.switch_case(
        tf.clip_by_value(channels - 1, 0, 3), branch_fns=[gray, gray_alpha, rgb, rgba]
    )
    # Round to uint8 as Pillow does between compositing and resizing.
    image = tf.round(image)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    image = tf.image.crop_to_bounding_box(
        image, (height - side) // 2, (width - side) // 2, side, side
    )
    image = tf.image.resize(image, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear", antialias=True)
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    return image * PIXEL_SCALE
