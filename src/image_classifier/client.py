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

from image_classifier.preprocess import preprocess_image
from image_classifier.tfserving.json_tensor import INSTANCES, json_floats


def make_request_json(image_path: str | os.PathLike[str]) -> dict[str, Any]:
    """A row-format predict request for one image file: ``{"instances": [[32][32][3] floats]}``."""
    pixels = preprocess_image(Path(image_path).read_bytes())
    return {INSTANCES: [json_floats(pixels)]}


def write_request_json(
    image_path: str | os.PathLike[str], output: str | os.PathLike[str] = "test_data.json"
) -> Path:
    """:func:`make_request_json` written to ``output`` (for ``curl -d @test_data.json``)."""
    target = Path(output)
    target.write_text(json.dumps(make_request_json(image_path)) + "\n", encoding="utf-8")
    return target
