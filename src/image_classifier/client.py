"""Requests in TensorFlow Serving's REST format, made from pictures (``make-request``).

``make_request_json(["cat.jpg"])`` runs the one shared
:func:`~image_classifier.preprocess.preprocess_image` and returns
``{"instances": [<32x32x3 floats>]}``, the body that

    curl -X POST http://localhost:8501/v1/models/image_classifier:predict -d @test_data.json

sends. Two other forms target the export's other signatures: ``bytes`` sends each file as it is
(``serving_bytes`` decodes it in the graph; the gateway's ``/predict`` takes the same body), and
``pixels`` sends the preprocessed image as its 3,072 raw bytes (``serving_pixels``, the compact
wire the gateway itself uses). Needs only Pillow and NumPy (no TensorFlow, no web stack).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from image_classifier.constants import SERVING_BYTES, SERVING_PIXELS
from image_classifier.errors import InvalidImageError
from image_classifier.preprocess import preprocess_image
from image_classifier.tfserving.json_tensor import B64, INSTANCES, SIGNATURE_NAME, json_floats

RequestFormat = Literal["floats", "bytes", "pixels"]
REQUEST_FORMATS: Final[tuple[RequestFormat, ...]] = ("floats", "bytes", "pixels")

ImagePaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _paths(images: ImagePaths) -> list[Path]:
    if isinstance(images, str | os.PathLike):
        return [Path(images)]
    return [Path(image) for image in images]


def _b64(blob: bytes) -> dict[str, str]:
    return {B64: base64.b64encode(blob).decode("ascii")}


def _preprocess(path: Path) -> np.ndarray:
    try:
        return preprocess_image(path.read_bytes())
    except InvalidImageError as exc:
        # Several pictures in one request: say which one is bad.
        raise type(exc)(f"{path}: {exc}") from None


def make_request_json(
    images: ImagePaths, request_format: RequestFormat = "floats"
) -> dict[str, Any]:
    """A row-format predict request for one or more image files, in request order.

    ``floats``: ``{"instances": [[32][32][3] floats, ...]}`` for ``serving_default``;
    ``bytes``: ``{"signature_name": "serving_bytes", "instances": [{"b64": <file>}, ...]}``;
    ``pixels``: ``{"signature_name": "serving_pixels", "instances": [{"b64": <3,072 bytes>}]}``.
    Every file is read and, except for ``bytes``, preprocessed: a bad one raises before anything
    is written.
    """
    paths = _paths(images)
    if request_format == "bytes":
        return {SIGNATURE_NAME: SERVING_BYTES, INSTANCES: [_b64(p.read_bytes()) for p in paths]}
    pixels = [_preprocess(p) for p in paths]
    if request_format == "pixels":
        # Exactly k/255 per channel, so the uint8 bytes carry the same image without loss.
        raw = [np.rint(image * 255.0).astype(np.uint8).tobytes() for image in pixels]
        return {SIGNATURE_NAME: SERVING_PIXELS, INSTANCES: [_b64(blob) for blob in raw]}
    return {INSTANCES: [json_floats(image) for image in pixels]}


def request_text(images: ImagePaths, request_format: RequestFormat = "floats") -> str:
    """:func:`make_request_json` as the JSON text ``make-request`` writes (one line)."""
    return json.dumps(make_request_json(images, request_format)) + "\n"


def write_request_json(
    images: ImagePaths,
    output: str | os.PathLike[str] = "test_data.json",
    request_format: RequestFormat = "floats",
) -> Path:
    """:func:`make_request_json` written to ``output`` (for ``curl -d @test_data.json``)."""
    text = request_text(images, request_format)  # before opening: a bad image leaves no file
    target = Path(output)
    target.write_text(text, encoding="utf-8")
    return target
