"""The gateway's errors and the HTTP status of every package error.

::

    ImageClassifierError (image_classifier.errors)
    ├── InvalidImageError ──── InvalidBase64Error      400 (with the library's image errors)
    ├── PayloadTooLargeError                           413 (image_classifier.errors)
    ├── RequestTimeoutError                            408 (image_classifier.errors)
    └── GatewayError                                   its own status_code
        ├── UnauthorizedError                          401
        ├── TooManyImagesError, TooManyPixelsError     413
        ├── UnsupportedMediaTypeError                  415
        └── BackendError                               502
            ├── BackendUnavailableError                503
            ├── ModelUnavailableError                  503
            └── BackendTimeoutError                    504

:mod:`image_classifier.gateway.handlers` renders every one of them as the API's one error body.
Status policy:

- 400: the image content is unusable (not an image, truncated, empty, bad base64, too many
  pixels, absurd dimensions). A decompression bomb is invalid content too, so it is 400 with
  code ``image_too_large``; 413 is kept for bytes over the upload limit.
- 401: API key missing or wrong (when one is configured); decided from the headers alone.
- 408: the request body stopped arriving (``GATEWAY_BODY_TIMEOUT_S``).
- 413: request body over ``max_upload_bytes``, more images than ``max_images_per_request``, or
  more decoded pixels than ``max_request_pixels``.
- 415: a multipart route got something else, the JSON route got something else, or a file part
  declared a non-image type.
- 422: the request is malformed (missing field, ``top_k`` out of range, invalid JSON).
- 502: the backend answered something the gateway cannot use.
- 503: the backend is unreachable or the model is not AVAILABLE. 504: the backend timed out.
- 500: a bug; the message says so and the log has the traceback under the request id.
"""

from __future__ import annotations

from image_classifier.errors import (
    ImageClassifierError,
    InvalidImageError,
    ModelNotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
)


class GatewayError(ImageClassifierError):
    """An error the gateway raises itself; carries its HTTP status.

    ``public_message``, when set, is what a client is told instead of the message, which then
    goes only to the log (and /ready): backend addresses and socket errors are for operators.
    """

    code = "gateway_error"
    status_code = 500
    public_message: str | None = None


class UnauthorizedError(GatewayError):
    """The API key is missing or wrong."""

    code = "unauthorized"
    status_code = 401


class TooManyImagesError(GatewayError):
    """More images in one request than the configured limit."""

    code = "too_many_images"
    status_code = 413


class TooManyPixelsError(GatewayError):
    """The images of one request decode to more pixels than the per-request limit."""

    code = "too_many_pixels"
    status_code = 413


class UnsupportedMediaTypeError(GatewayError):
    """The request (or one file part) has a content type the route does not take."""

    code = "unsupported_media_type"
    status_code = 415


class InvalidBase64Error(InvalidImageError):
    """A JSON image is not valid standard base64."""

    code = "invalid_base64"


class BackendError(GatewayError):
    """The model backend answered with something the gateway cannot use."""

    code = "backend_error"
    status_code = 502
    public_message: str | None = "the model backend answered something the gateway cannot use"


class BackendUnavailableError(BackendError):
    """The model backend cannot be reached."""

    code = "backend_unavailable"
    status_code = 503
    public_message: str | None = "the model backend is unreachable; try again shortly"


class ModelUnavailableError(BackendError):
    """The backend is up but the model is not loaded (not AVAILABLE, or unknown)."""

    code = "model_unavailable"
    status_code = 503
    public_message = None  # the model's state, in TF Serving's words: nothing internal


class BackendTimeoutError(BackendError):
    """The model backend did not answer within the request timeout."""

    code = "backend_timeout"
    status_code = 504
    public_message = None  # names only the configured timeout


def status_for(exc: ImageClassifierError) -> int:
    """The HTTP status of any package error (the policy in this module's docstring)."""
    if isinstance(exc, GatewayError):
        return exc.status_code
    if isinstance(exc, InvalidImageError):
        return 400
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, RequestTimeoutError):
        return 408
    if isinstance(exc, ModelNotFoundError):
        return 503
    return 500
