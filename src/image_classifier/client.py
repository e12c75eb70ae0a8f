"""Requests in TensorFlow Serving's REST format, made from pictures (``make-request``).

``make_request_json("cat.jpg")`` runs the one shared
:func:`~image_classifier.preprocess.preprocess_image` and returns
``{"instances": [<32x32x3 floats>]}``, the body that

    curl -X POST http://localhost:8501/v1/models/image_classifier:predict -d @test_data.json

sends. Needs only Pillow and NumPy (no TensorFlow, no web stack).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from image_classifier.preprocess import preprocess_image


def json_floats(values: np.ndarray) -> Any:
    """float32 array -> nested lists of the shortest decimals that read back as the same float32.

    ``0.5019608`` instead of ``0.501960813999176``: half the bytes, and the value TF Serving
    parses is still exactly the float32 the model would see in-process (TF Serving writes its own
    float outputs the same way).
    """
    array = np.asarray(values, dtype=np.float32)
    # str() of a NumPy float32 is its shortest round-trip repr; float() of that is exact enough
    # for json to print the same digits back.
    shortest = [float(str(value)) for value in array.ravel()]
    return np.asarray(shortest, dtype=np.float64).reshape(array.shape).tolist()


def make_request_json(image_path: str | os.PathLike[str]) -> dict[str, Any]:
    """A row-format predict request for one image file: ``{"instances": [[32][32][3] floats]}``."""
    pixels = preprocess_image(Path(image_path).read_bytes())
    return {"instances": [json_floats(pixels)]}


def write_request_json(
    image_path: str | os.PathLike[str], output: str | os.PathLike[str] = "test_data.json"
) -> Path:
    """:func:`make_request_json` written to ``output`` (for ``curl -d @test_data.json``)."""
    target = Path(output)
    target.write_text(json.dumps(make_request_json(image_path)) + "\n", encoding="utf-8")
    return target
