"""The Open Inference Protocol (KServe v2) on the model server's REST port, as its clients see it.

A real server process serves a tiny export; NVIDIA's ``tritonclient[http]`` (the reference
client of the protocol) checks health, metadata and inference in JSON and with the binary tensor
data extension, and every probability must match the v1 ``:predict`` answer for the same images.
Bad requests are checked with raw HTTP, since the client refuses to send most of them.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from image_classifier.constants import (
    BYTES_INPUT_KEY,
    INPUT_KEY,
    MODEL_NAME,
    OUTPUT_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
)

# Each module starts one real model server process.
pytestmark = pytest.mark.slow

TOLERANCE = 1e-6
MAX_BATCH_SIZE = 8
INFER = f"/v2/models/{MODEL_NAME}/infer"
PREDICT = f"/v1/models/{MODEL_NAME}:predict"


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(
    tiny_export: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
    start_model_server: Any,
) -> Any:
    base = tmp_path_factory.mktemp("kserve_v2") / MODEL_NAME
    tiny_export(base, seed=4)
    return start_model_server(
        base, "--port", str(_free_port()), "--max_batch_size", str(MAX_BATCH_SIZE)
    )


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def triton_client(server: Any) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def _v1_probabilities(http: httpx.Client, images: np.ndarray) -> np.ndarray:
    response = http.post(PREDICT, json={"instances": images.tolist()})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["predictions"], dtype=np.float32)


# --- health and metadata -------------------------------------------------------------------------


def test_server_is_live_ready_and_describes_itself(
    triton_client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "image_classifier"
    assert "binary_tensor_data" in metadata["extensions"]
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_describes_the_serving_default_signature(
    triton_client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    signature = http.get(f"/v1/models/{MODEL_NAME}/metadata").json()["metadata"]["signature_def"][
        "signature_def"
    ][SERVING_DEFAULT]
    outputs = [
        {
            "name": key,
            "datatype": "FP32",
            "shape": [int(d["size"]) for d in value["tensor_shape"]["dim"]],
        }
        for key, value in signature["outputs"].items()
    ]
    expected = {
        "name": MODEL_NAME,
        "versions": ["1"],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": INPUT_KEY, "datatype": "FP32", "shape": [-1, 32, 32, 3]}],
        "outputs": outputs,
    }
    assert triton_client.get_model_metadata(MODEL_NAME) == expected
    assert triton_client.get_model_metadata(MODEL_NAME, model_version="1") == expected
    assert outputs[0]["name"] == OUTPUT_KEY and outputs[0]["shape"][0] == -1


def test_model_readiness_by_name_and_version(
    triton_client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    assert triton_client.is_model_ready(MODEL_NAME)
    assert triton_client.is_model_ready(MODEL_NAME, model_version="1")
    assert not triton_client.is_model_ready(MODEL_NAME, model_version="7")
    assert not triton_client.is_model_ready("nope")
    assert http.get(f"/v2/models/{MODEL_NAME}/ready").json() == {"name": MODEL_NAME, "ready": True}
    unknown = http.get("/v2/models/nope/ready")
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]


# --- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_gives_the_v1_probabilities(
    triton_client: triton.InferenceServerClient, http: httpx.Client, binary: bool
) -> None:
    images = _images(5, seed=11)
    tensor = triton.InferInput(INPUT_KEY, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    wanted = triton.InferRequestedOutput(OUTPUT_KEY, binary_data=binary)
    result = triton_client.infer(MODEL_NAME, [tensor], outputs=[wanted], request_id="req-7")
    probabilities = result.as_numpy(OUTPUT_KEY)
    assert probabilities is not None and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, _v1_probabilities(http, images), atol=TOLERANCE)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == MODEL_NAME and response["model_version"] == "1"
    assert ("parameters" in response["outputs"][0]) is binary


def test_infer_with_a_gzip_request_and_a_version(
    triton_client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    images = _images(3, seed=12)
    tensor = triton.InferInput(INPUT_KEY, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = triton_client.infer(
        MODEL_NAME, [tensor], model_version="1", request_compression_algorithm="gzip"
    )
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT_KEY), _v1_probabilities(http, images), atol=TOLERANCE
    )


def test_infer_bytes_through_the_serving_bytes_signature(
    triton_client: triton.InferenceServerClient,
    http: httpx.Client,
    image_bytes: Callable[..., bytes],
) -> None:
    import base64

    pictures = [image_bytes("PNG", color=(200, 30, 90)), image_bytes("JPEG", size=(48, 40))]
    tensor = triton.InferInput(BYTES_INPUT_KEY, [len(pictures)], "BYTES")
    tensor.set_data_from_numpy(np.array(pictures, dtype=object))
    result = triton_client.infer(MODEL_NAME, [tensor], parameters={"signature_name": SERVING_BYTES})
    v1 = http.post(
        PREDICT,
        json={
            "signature_name": SERVING_BYTES,
            "instances": [{"b64": base64.b64encode(p).decode()} for p in pictures],
        },
    )
    assert v1.status_code == 200, v1.text
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT_KEY), np.asarray(v1.json()["predictions"]), atol=TOLERANCE
    )


def test_raw_json_infer_with_nested_data_and_mixed_binary_outputs(http: httpx.Client) -> None:
    images = _images(2, seed=13)
    header = json.dumps(
        {
            "id": "nested",
            "inputs": [
                {
                    "name": INPUT_KEY,
                    "shape": [2, 32, 32, 3],
                    "datatype": "FP32",
                    "data": images.tolist(),  # nested lists are the protocol's too
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    response = http.post(INFER, content=header)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    document = json.loads(response.content[:length])
    (output,) = document["outputs"]
    assert document["id"] == "nested"
    assert output["parameters"]["binary_data_size"] == len(response.content) - length
    probabilities = np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(probabilities, _v1_probabilities(http, images), atol=TOLERANCE)

    # A per-output binary_data: false wins over the request's binary_data_output.
    body = json.loads(header)
    body["outputs"] = [{"name": OUTPUT_KEY, "parameters": {"binary_data": False}}]
    as_json = http.post(INFER, json=body)
    assert as_json.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in as_json.headers
    data = as_json.json()["outputs"][0]["data"]
    np.testing.assert_allclose(np.reshape(data, probabilities.shape), probabilities, atol=0)


# --- errors --------------------------------------------------------------------------------------


def _one_image_input(**changes: Any) -> dict[str, Any]:
    tensor = {
        "name": INPUT_KEY,
        "shape": [1, 32, 32, 3],
        "datatype": "FP32",
        "data": [0.5] * 3072,
    }
    return {"inputs": [{**tensor, **changes}]}


def _binary_body(header: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
    encoded = json.dumps(header).encode()
    return encoded + payload, {"Inference-Header-Content-Length": str(len(encoded))}


_BINARY_INPUT = _one_image_input(parameters={"binary_data_size": 3072 * 4})
del _BINARY_INPUT["inputs"][0]["data"]
_ERROR_CASES: list[tuple[str, str, Any, dict[str, str], int, str]] = [
    # (id, path, body, headers, status, message fragment)
    ("unknown-model", "/v2/models/nope/infer", _one_image_input(), {}, 404,
     "Servable not found for request: Latest(nope)"),
    ("unknown-version", f"/v2/models/{MODEL_NAME}/versions/7/infer", _one_image_input(), {},
     404, f"Servable not found for request: Specific({MODEL_NAME}, 7)"),
    ("version-not-a-number", f"/v2/models/{MODEL_NAME}/versions/latest/infer",
     _one_image_input(), {}, 400, "Invalid model version"),
    ("malformed-json", INFER, b'{"inputs": [', {}, 400, "JSON Parse error"),
    ("no-inputs", INFER, {"inputs": []}, {}, 400, "'inputs' must be a non-empty array"),
    ("unknown-input", INFER, _one_image_input(name="pixels"), {}, 400,
     "unexpected inference input 'pixels'"),
    ("wrong-datatype", INFER, _one_image_input(datatype="FP64"), {}, 400,
     "unexpected datatype FP64 for inference input 'images', expecting FP32"),
    ("wrong-shape", INFER, _one_image_input(shape=[1, 32, 32]), {}, 400,
     "unexpected shape for input 'images'"),
    ("data-count", INFER, _one_image_input(data=[0.5] * 3071), {}, 400,
     "'data' has 3071 values but shape [1,32,32,3] needs 3072"),
    ("string-for-fp32", INFER, _one_image_input(data=["0.5"] * 3072), {}, 400,
     "Type: String is not of expected type: float"),
    ("no-data", INFER, {"inputs": [{k: v for k, v in _one_image_input()["inputs"][0].items()
                                    if k != "data"}]}, {}, 400, "has neither 'data' nor"),
    ("batch-too-large", INFER, _one_image_input(shape=[MAX_BATCH_SIZE + 1, 32, 32, 3],
                                                data=[0.5] * 3072 * (MAX_BATCH_SIZE + 1)), {},
     400, f"larger than maximum input batch size {MAX_BATCH_SIZE}"),
    ("unknown-output", INFER, {**_one_image_input(), "outputs": [{"name": "logits"}]}, {}, 400,
     "unexpected inference output 'logits'"),
    ("id-not-a-string", INFER, {**_one_image_input(), "id": 7}, {}, 400,
     "'id' must be a string"),
    ("binary-cut-short", INFER, *_binary_body(_BINARY_INPUT, b"\0" * 100), 400,
     "expects 12,288 bytes of binary data but only 100 remain"),
    ("binary-left-over", INFER, *_binary_body(_BINARY_INPUT, b"\0" * (3072 * 4 + 4)), 400,
     "4 bytes of binary data that no input's 'binary_data_size' accounts for"),
    ("bad-header-length", INFER, json.dumps(_one_image_input()).encode(),
     {"Inference-Header-Content-Length": "99999999"}, 400, "Inference-Header-Content-Length"),
    ("bytes-length-prefix", INFER, *_binary_body(
        {"inputs": [{"name": BYTES_INPUT_KEY, "shape": [1], "datatype": "BYTES",
                     "parameters": {"binary_data_size": 8}}],
         "parameters": {"signature_name": SERVING_BYTES}},
        struct.pack("<I", 1000) + b"abcd"), 400, "claims 1,000 bytes past the end"),
    ("unknown-signature", INFER, {**_one_image_input(), "parameters": {"signature_name": "x"}},
     {}, 400, 'Serving signature name: "x" not found'),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [case[1:] for case in _ERROR_CASES],
    ids=[case[0] for case in _ERROR_CASES],
)
def test_bad_requests_get_the_protocols_error_shape(
    http: httpx.Client,
    server: Any,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert "Traceback" not in server.log()


def test_metadata_of_unknown_models_and_versions_is_404(
    triton_client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        triton_client.get_model_metadata("nope")
    assert raised.value.status() == "404"
    assert "nope" in raised.value.message()
    response = http.get(f"/v2/models/{MODEL_NAME}/versions/7")
    assert response.status_code == 404
    assert "Specific(image_classifier, 7)" in response.json()["error"]
