"""Errors in TensorFlow Serving's vocabulary: a canonical status code, a message, an HTTP status.

::

    ImageClassifierError (image_classifier.errors)
    └── ServingError                 any canonical code (status), e.g. from a TensorFlow OpError
        ├── InvalidArgumentError     INVALID_ARGUMENT -> 400
        ├── NotFoundError            NOT_FOUND -> 404
        └── UnimplementedError       UNIMPLEMENTED -> 501

Everything the model server refuses is one of these; its app turns them into TF Serving's
``{"error": "<message>"}`` body with the HTTP status TF Serving's REST layer uses for the code.
TensorFlow's own ``OpError`` (an undecodable image in ``serving_bytes``, say) is mapped here too,
by its canonical code, so bad input is a 4xx and never a 500.
"""

from __future__ import annotations

import re
from typing import Final

from image_classifier.errors import ImageClassifierError

# tensorflow_serving/model_servers/http_server.cc, ToHTTPStatusCode().
HTTP_STATUS: Final[dict[str, int]] = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

# Canonical code numbers (tf.errors.OpError.error_code) -> names.
_CODE_NAMES: Final = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


class ServingError(ImageClassifierError):
    """A request the model server refuses, with TF Serving's canonical status code."""

    code = "serving_error"
    status = "UNKNOWN"

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.status, 500)


class InvalidArgumentError(ServingError):
    """The request is malformed or does not fit the signature (HTTP 400)."""

    status = "INVALID_ARGUMENT"


class NotFoundError(ServingError):
    """No such model or no such loaded version (HTTP 404)."""

    status = "NOT_FOUND"


class UnimplementedError(ServingError):
    """A TF Serving feature this server does not provide (HTTP 501)."""

    status = "UNIMPLEMENTED"


# TensorFlow wraps the op's message in graph details: "Graph execution error:", "Detected at
# node ... defined at (most recent call last):" with a stack, "{{function_node ...}}" prefixes,
# "[[{{node ...}}]]" and "[Op:...]" suffixes. They name internals, not anything the client sent.
_FUNCTION_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*")
_NODE_SUFFIX = re.compile(r"\s*(\[\[\{\{node [^\]]*\]\]|\[Op:[^\]]*\])")


def code_number(status: str) -> int:
    """A canonical status name's number (``NOT_FOUND`` -> 5), as gRPC and StatusProto carry it."""
    return _CODE_NAMES.index(status) if status in _CODE_NAMES else _CODE_NAMES.index("UNKNOWN")


def from_tf_error(exc: BaseException) -> ServingError:
    """A ``tf.errors.OpError`` -> the :class:`ServingError` with the same canonical code."""
    code = getattr(exc, "error_code", 2)
    name = _CODE_NAMES[code] if isinstance(code, int) and 0 < code < len(_CODE_NAMES) else "UNKNOWN"
    return ServingError(clean_tf_message(getattr(exc, "message", None) or str(exc)), status=name)


def clean_tf_message(message: str) -> str:
    """The op's own words from a TensorFlow error message, without graph and stack details."""
    text = _NODE_SUFFIX.sub("", _FUNCTION_NODE.sub("", message))
    kept: list[str] = []
    in_stack = False
    for line in text.splitlines():
        if line.startswith("Detected at node"):
            in_stack = True  # indented "File ..." lines and source lines follow
            continue
        if in_stack and (line[:1].isspace() or line.strip() == "<stack traces unavailable>"):
            continue
        in_stack = False
        if line.strip() and line.strip() != "Graph execution error:":
            kept.append(line.strip())
    return " ".join(kept) or "TensorFlow error"
