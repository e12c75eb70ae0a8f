"""TF Serving's REST API over a :class:`ModelRegistry`, independent of HTTP plumbing.

The app matches the URL with :func:`image_classifier.tfserving.rest.parse_path`; the
``model_status`` and ``model_metadata`` functions return JSON bodies, a predict is
:func:`prepare_predict` (parse and check) then :func:`run_signature` (TensorFlow), directly or
through the batcher; each raises :class:`ServingError`. All of it is synchronous: the app runs
it in worker threads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from image_classifier.constants import SERVING_DEFAULT
from image_classifier.errors import InvalidImageError, OverloadedError
from image_classifier.model_server._manager import LoadedVersion, ModelRegistry
from image_classifier.model_server._monitoring import ServerMetrics
from image_classifier.preprocess import MAX_PIXELS, check_encoded_image
from image_classifier.tfserving.errors import (
    InvalidArgumentError,
    ServingError,
    UnimplementedError,
    from_tf_error,
)
from image_classifier.tfserving.json_tensor import (
    decode_predict_request,
    parse_json_object,
    signature_name_of,
)
from image_classifier.tfserving.rest import ApiCall
from image_classifier.tfserving.signatures import CLASSIFY_METHOD, REGRESS_METHOD
from image_classifier.tfserving.status import status_body
from image_classifier.webserver import DecodeBudget

_METHOD_NAMES: Final = {"classify": CLASSIFY_METHOD, "regress": REGRESS_METHOD}


def model_status(manager: ModelRegistry, call: ApiCall) -> dict[str, Any]:
    return status_body(manager.statuses(call.model_name, call.version, call.label))


def model_metadata(manager: ModelRegistry, call: ApiCall) -> dict[str, Any]:
    loaded = manager.servable(call.model_name, call.version, call.label)
    return {
        "model_spec": {
            "name": call.model_name,
            "signature_name": "",
            "version": str(loaded.version),
        },
        "metadata": {"signature_def": loaded.table.metadata_json},
    }


@dataclass(frozen=True)
class PreparedPredict:
    """A ``:predict`` request parsed and checked, ready to run on the version it named."""

    loaded: LoadedVersion
    signature_name: str
    inputs: dict[str, np.ndarray]
    row_format: bool
    pixels: int  # encoded-image pixels the run will decode (serving_bytes), else 0


def prepare_predict(
    manager: ModelRegistry,
    call: ApiCall,
    body: bytes,
    *,
    max_batch_size: int,
    max_request_pixels: int,
) -> PreparedPredict:
    """Parse and check a ``:predict`` (or ``:classify``/``:regress``) body; nothing runs yet."""
    # TF Serving's order: parse, signature_name, find the servable, then the signature.
    document = parse_json_object(body)
    signature_name = signature_name_of(document, SERVING_DEFAULT)
    # One reference for the whole request: a version swapped in meanwhile does not affect it.
    loaded = manager.servable(call.model_name, call.version, call.label)
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
    pixels = check_encoded_images(
        request.inputs, max_image_pixels=MAX_PIXELS, max_request_pixels=max_request_pixels
    )
    return PreparedPredict(loaded, signature.name, request.inputs, request.row_format, pixels)


def run_signature(
    decode_budget: DecodeBudget,
    metrics: ServerMetrics,
    model_name: str,
    loaded: LoadedVersion,
    signature_name: str,
    inputs: Mapping[str, np.ndarray],
    pixels: int,
) -> dict[str, np.ndarray]:
    """Call one signature; every failure leaves as a :class:`ServingError`.

    Encoded images first wait for decoding room (UNAVAILABLE after a bounded wait).
    """
    import tensorflow as tf

    try:
        with decode_budget.reserve(pixels):
            started = time.perf_counter()
            outputs = loaded.run(signature_name, inputs)
            metrics.observe_runtime(model_name, "Predict", (time.perf_counter() - started) * 1e6)
            return outputs
    except OverloadedError as exc:
        raise ServingError(str(exc), status="UNAVAILABLE") from None
    except tf.errors.OpError as exc:
        raise from_tf_error(exc) from None
    except (TypeError, ValueError) as exc:
        # The function's own argument binding refused the tensors (checked above, so rare).
        raise InvalidArgumentError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None


def check_encoded_images(
    inputs: Mapping[str, np.ndarray], *, max_image_pixels: int, max_request_pixels: int
) -> int:
    """Refuse encoded images the in-graph decoder must not see; returns the pixels to decode.

    The bytes signature decodes in-graph with no guard of its own, so each image gets the
    gateway's header rule (:func:`preprocess.check_encoded_image`: pixels, sides, aspect
    ratio, no animated WebP), and the whole request a pixel cap.
    """
    total = 0
    for key, array in inputs.items():
        if array.dtype != object:
            continue
        for index, data in enumerate(array.ravel()):
            if not isinstance(data, bytes):
                continue
            try:
                total += check_encoded_image(data, max_pixels=max_image_pixels)
            except InvalidImageError as exc:
                raise InvalidArgumentError(f"input '{key}' value {index}: {exc}") from None
    if total > max_request_pixels:
        raise InvalidArgumentError(
            f"the images in this request decode to {total:,} pixels, over the limit of "
            f"{max_request_pixels:,} per request (--max_decoded_pixels)"
        )
    return total
