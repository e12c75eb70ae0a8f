"""TF Serving's REST API over a :class:`ModelManager`, independent of HTTP plumbing.

``parse_path`` matches the URL with TF Serving's own regular expressions (case-insensitive,
``/versions/N`` or ``/labels/L``, ``:predict``/``:classify``/``:regress``, ``/metadata``); the
``model_status``, ``model_metadata`` and ``predict`` functions return JSON bodies or raise
:class:`ServingError`. ``predict`` is synchronous (parsing, TensorFlow, encoding): the app runs
it in a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from image_classifier.constants import SERVING_DEFAULT
from image_classifier.model_server._codec import (
    check_image_sizes,
    decode_predict_request,
    encode_predict_response,
    parse_json_object,
    signature_name_of,
)
from image_classifier.model_server._errors import (
    InvalidArgumentError,
    UnimplementedError,
    from_tf_error,
)
from image_classifier.model_server._manager import ModelManager

# tensorflow_serving/model_servers/http_rest_api_util.cc
_PREDICTION_RE: Final = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_RE: Final = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_INT64_MAX: Final = 2**63 - 1
_METHOD_NAMES: Final = {
    "classify": "tensorflow/serving/classify",
    "regress": "tensorflow/serving/regress",
}


@dataclass(frozen=True)
class ApiCall:
    """What a ``/v1/...`` URL asks for."""

    kind: str  # "status", "metadata", "predict", "classify" or "regress"
    model_name: str
    version: int | None


def parse_path(method: str, path: str) -> ApiCall:
    """Match ``path`` as TF Serving does; anything else under /v1 is a "Malformed request"."""
    if method == "POST" and (match := _PREDICTION_RE.fullmatch(path)):
        name, version_text, label, verb = match.groups()
        return ApiCall(verb.lower(), name, _version(version_text, label))
    if method == "GET" and (match := _STATUS_RE.fullmatch(path)):
        name, version_text, label, subresource = match.groups()
        if not name:
            raise InvalidArgumentError("Missing model name in request.")
        kind = "metadata" if subresource else "status"
        return ApiCall(kind, name, _version(version_text, label))
    raise InvalidArgumentError(f"Malformed request: {method} {path}")


def _version(text: str | None, label: str | None) -> int | None:
    if label is not None:
        # Labels come from a --model_config_file, which this server does not read.
        raise InvalidArgumentError(f"Unrecognized servable version label: {label}")
    if text is None:
        return None
    version = int(text)
    if version > _INT64_MAX:
        raise InvalidArgumentError(f"Failed to convert version: {text} to numeric.")
    return version


def model_status(manager: ModelManager, call: ApiCall) -> dict[str, Any]:
    statuses = manager.statuses(call.model_name, call.version)
    return {"model_version_status": [status.to_json() for status in statuses]}


def model_metadata(manager: ModelManager, call: ApiCall) -> dict[str, Any]:
    loaded = manager.servable(call.model_name, call.version)
    return {
        "model_spec": {
            "name": call.model_name,
            "signature_name": "",
            "version": str(loaded.version),
        },
        "metadata": {"signature_def": loaded.table.metadata_json},
    }


def predict(
    manager: ModelManager,
    call: ApiCall,
    body: bytes,
    *,
    max_batch_size: int,
    max_image_pixels: int,
) -> bytes:
    """A whole ``:predict`` (or ``:classify``/``:regress``) call, body in, JSON bytes out."""
    import tensorflow as tf

    # TF Serving's order: parse, signature_name, find the servable, then the signature.
    document = parse_json_object(body)
    signature_name = signature_name_of(document, SERVING_DEFAULT)
    # One reference for the whole request: a version swapped in meanwhile does not affect it.
    loaded = manager.servable(call.model_name, call.version)
    signature = loaded.signature(signature_name)
    if call.kind != "predict":
        expected = _METHOD_NAMES[call.kind]
        if signature.method_name != expected:
            raise InvalidArgumentError(
                f"Expected {call.kind} signature method_name to be {expected}. "
                f"Was: {signature.method_name}"
            )
        raise UnimplementedError(f"{call.kind} is not implemented by this model server")
    request = decode_predict_request(
        document,
        signature,
        max_batch_size=max_batch_size,
        may_contain_bools=b"true" in body or b"false" in body,
    )
    check_image_sizes(request.inputs, max_image_pixels)
    try:
        outputs = loaded.run(signature.name, request.inputs)
    except tf.errors.OpError as exc:
        raise from_tf_error(exc) from None
    except (TypeError, ValueError) as exc:
        # The function's own argument binding refused the tensors (checked above, so rare).
        raise InvalidArgumentError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
    return encode_predict_response(outputs, row_format=request.row_format)
