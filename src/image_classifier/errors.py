"""One exception hierarchy for the whole package.

Library code raises these (never a bare Pillow, TensorFlow or protobuf exception); the gateway,
the model server and the CLI map them to HTTP statuses and exit codes in one place each::

    ImageClassifierError
    ├── InvalidImageError (also ValueError)       the bytes cannot become a model input
    │   ├── EmptyImageError, NotAnImageError, TruncatedImageError
    │   ├── ImageTooLargeError, ImageDimensionsError
    │   └── UnsupportedImageError                 an image one of the decoders cannot take
    ├── PayloadTooLargeError                      a request body over a server's size limit
    ├── RequestTimeoutError                       a request body that stopped arriving
    ├── OverloadedError                           a server is at a limit; retry shortly
    ├── ConfigError (also ValueError)             a configuration value or file is invalid
    ├── DatasetError                              a dataset directory is missing or malformed
    ├── ModelNotFoundError                        no loadable exported version where expected
    ├── ExportError                               writing a version failed; nothing left behind
    └── ServeError                                the service could not be started

Each layer above the library has its own subtree, drawn in its module: TF Serving's canonical
codes in :mod:`image_classifier.tfserving.errors`, the gateway's HTTP errors in
:mod:`image_classifier.gateway.errors`.
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


class PayloadTooLargeError(ImageClassifierError):
    """A request body is larger than the server's limit (refused before it is read)."""

    code = "payload_too_large"


class RequestTimeoutError(ImageClassifierError):
    """A request's body stopped arriving before it was complete."""

    code = "request_timeout"


class OverloadedError(ImageClassifierError):
    """A server is at one of its limits (decoding memory, queue); the request may be retried."""

    code = "overloaded"


class ConfigError(ImageClassifierError, ValueError):
    """A configuration value or file is invalid; the message says which and why."""

    code = "invalid_config"


class UnsupportedImageError(InvalidImageError):
    """A valid image of a kind the decoder in use cannot take (animated WebP in-graph, say)."""

    code = "unsupported_image"


class DatasetError(ImageClassifierError):
    """A dataset directory is missing, malformed or inconsistent."""

    code = "dataset_error"


class ModelNotFoundError(ImageClassifierError):
    """No exported model version exists where one was expected."""

    code = "model_not_found"


class ExportError(ImageClassifierError):
    """Writing a SavedModel version failed; nothing was left behind."""

    code = "export_error"


class ServeError(ImageClassifierError):
    """The service could not be started (a port taken, the model server failed to come up...)."""

    code = "serve_error"
