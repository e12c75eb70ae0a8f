"""One exception hierarchy for the whole package.

Library code raises these (never a bare Pillow or TensorFlow exception); the gateway and the CLI
map them to HTTP statuses and exit codes in one place each.
"""

from __future__ import annotations


class ImageClassifierError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "error"


class InvalidImageError(ImageClassifierError, ValueError):
    """The bytes given cannot be turned into a model input."""

    code = "invalid_image"


class EmptyImageError(InvalidImageError):
    """The input holds no bytes at all."""

    code = "empty_image"


class NotAnImageError(InvalidImageError):
    """The bytes are not in any image format the decoder knows."""

    code = "not_an_image"


class TruncatedImageError(InvalidImageError):
    """The image header is valid but its pixel data is cut short or corrupt."""

    code = "truncated_image"


class ImageTooLargeError(InvalidImageError):
    """The image has more pixels than the limit (decompression-bomb guard)."""

    code = "image_too_large"


class ImageDimensionsError(InvalidImageError):
    """The image's width, height or aspect ratio is outside what can be classified sensibly."""

    code = "invalid_dimensions"


class DatasetError(ImageClassifierError):
    """A dataset directory is missing, malformed or inconsistent."""

    code = "dataset_error"


class ModelNotFoundError(ImageClassifierError):
    """No exported model version exists where one was expected."""

    code = "model_not_found"


class ExportError(ImageClassifierError):
    """Writing a SavedModel version failed; nothing was left behind."""

    code = "export_error"
