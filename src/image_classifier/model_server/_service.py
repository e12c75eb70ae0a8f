"""TF Serving's REST API over a :class:`ModelManager`, independent of HTTP plumbing.

The app matches the URL with :func:`image_classifier.tfserving.rest.parse_path`; the
``model_status``, ``model_metadata`` and ``predict`` functions return JSON bodies or raise
:class:`ServingError`. ``predict`` is synchronous (parsing, TensorFlow, encoding): the app runs
it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from image_classifier.constants import SERVING_DEFAULT
from image_classifier.errors import ImageTooLargeError
from image_classifier.model_server._manager import ModelManager
from image_classifier.preprocess import check_encoded_pixels
from image_classifier.tfserving.errors import (
    InvalidArgumentError,
    UnimplementedError,
    from_tf_error,
)
from image_classifier.tfserving.json_tensor import (
    decode_predict_request,
    encode_predict_response,
    parse_json_object,
    signature_name_of,
)
from image_classifier.tfserving.rest import ApiCall
from image_classifier.tfserving.status import status_body

_METHOD_NAMES: Final = {
    "classify": "tensorflow/serving/classify",
    "regress": "tensorflow/serving/regress",
}


def model_status(manager: ModelManager, call: ApiCall) -> dict[str, Any]:
    return status_body(manager.statuses(call.model_name, call.version))


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


def check_image_sizes(inputs: Mapping[str, np.ndarray], max_pixels: int) -> None:
    """Refuse encoded images that would decode to more than ``max_pixels``.

    The bytes signature decodes in-graph with no size limit, so a small PNG of a huge blank
    canvas would be a memory bomb; :func:`preprocess.check_encoded_pixels` reads headers only.
    """
    for key, array in inputs.items():
        if array.dtype != object:
            continue
        for index, data in enumerate(array.ravel()):
            if not isinstance(data, bytes):
                continue
            try:
                check_encoded_pixels(data, max_pixels=max_pixels)
            except ImageTooLargeError as exc:
                raise InvalidArgumentError(f"input '{key}' value {index}: {exc}") from None
