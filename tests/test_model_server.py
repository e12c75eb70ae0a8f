"""The embedded model server, as TensorFlow Serving clients see it.

Most tests talk over HTTP (httpx, and curl for the documented command line) to a real
``python -m image_classifier model-server`` subprocess serving a tiny export, and compare every
answer with the export's own signature called in-process. The JSON codec and the version
manager also get fast in-process tests for the cases the tiny model cannot show (several inputs
and outputs, integer and bool tensors, load failures).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest

from image_classifier.cli import build_parser
from image_classifier.cli import model_server as model_server_command
from image_classifier.client import make_request_json, write_request_json
from image_classifier.constants import MODEL_NAME, SERVING_BYTES, SERVING_DEFAULT
from image_classifier.errors import ConfigError
from image_classifier.model_server import ModelServerSettings
from image_classifier.model_server._manager import LoadedVersion, ModelManager
from image_classifier.model_server._settings import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_REQUEST_BYTES,
)
from image_classifier.preprocess import preprocess_image
from image_classifier.tfserving.errors import InvalidArgumentError, NotFoundError
from image_classifier.tfserving.json_tensor import (
    decode_predict_request,
    encode_predict_response,
    json_floats,
)
from image_classifier.tfserving.signatures import Signature, TensorInfo
from image_classifier.tfserving.status import VersionStatus

TOLERANCE = 1e-5
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # small limits keep the over-limit requests cheap
MAX_BATCH_SIZE = 8
PREDICT = f"/v1/models/{MODEL_NAME}:predict"
STATUS = f"/v1/models/{MODEL_NAME}"


def _ok_status(version: int, state: str = "AVAILABLE") -> dict[str, Any]:
    return {
        "version": str(version),
        "state": state,
        "status": {"error_code": "OK", "error_message": ""},
    }


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode("ascii")}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_v1(tiny_export: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("model_server") / MODEL_NAME
    tiny_export(base, seed=1)
    return base


@pytest.fixture(scope="module")
def servable_v1(base_v1: Path) -> Any:
    from image_classifier.servable import load_servable

    return load_servable(base_v1, 1)


@pytest.fixture(scope="module")
def server(start_model_server: Callable[..., Any], base_v1: Path) -> Iterator[Any]:
    running = start_model_server(
        base_v1,
        "--max_request_bytes", str(MAX_REQUEST_BYTES),
        "--max_batch_size", str(MAX_BATCH_SIZE),
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def _assert_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert message in body["error"]


# --- CLI, settings and the client helper (no server) -----------------------------------------


def test_importing_the_server_loads_neither_tensorflow_nor_fastapi() -> None:
    code = (
        "import sys, image_classifier.model_server, image_classifier.client, "
        "image_classifier.cli; "
        "print(sorted(m for m in ('tensorflow', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_flags_are_tensorflow_model_servers() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "model-server",
            "--port=8500",
            "--rest_api_port=9001",
            "--model_name=cifar",
            "--model_base_path=/models/cifar",
            "--file_system_poll_wait_seconds=2",
        ]
    )
    assert args.port == 8500  # the gRPC port, as in TF Serving
    assert (args.rest_api_port, args.model_name, str(args.model_base_path)) == (
        9001,
        "cifar",
        "/models/cifar",
    )
    assert args.file_system_poll_wait_seconds == 2
    defaults = parser.parse_args(["model-server"])
    assert defaults.host == "127.0.0.1"
    assert defaults.rest_api_port == 8501
    assert defaults.model_name == MODEL_NAME
    assert defaults.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 64 * 1024 * 1024
    assert defaults.max_batch_size == DEFAULT_MAX_BATCH_SIZE


def test_cli_registers_the_model_server_subcommand() -> None:
    args = build_parser().parse_args(
        ["model-server", "--rest_api_port", "8502", "--host", "0.0.0.0"]
    )
    assert args.func is model_server_command.run
    assert (args.rest_api_port, args.host) == (8502, "0.0.0.0")


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ConfigError, match="rest_api_port"):
        ModelServerSettings(rest_api_port=70000)
    with pytest.raises(ConfigError, match="model_name"):
        ModelServerSettings(model_name="a:b")


def test_make_request_json_is_preprocess_image_as_instances(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    data = image_bytes("PNG", size=(48, 40), color=(200, 30, 10))
    picture = tmp_path / "red.png"
    picture.write_bytes(data)
    request = make_request_json(picture)
    assert list(request) == ["instances"]
    sent = np.asarray(request["instances"], dtype=np.float32)
    # Shortest decimals, yet exactly the float32 values the model sees in-process.
    np.testing.assert_array_equal(sent, preprocess_image(data)[None])
    written = write_request_json(picture, tmp_path / "test_data.json")
    assert json.loads(written.read_text(encoding="utf-8")) == request


def test_json_floats_round_trip_float32_exactly() -> None:
    values = np.random.default_rng(3).random((4, 5), dtype=np.float32) * 1e3
    values[0, 0] = np.float32(0.1)
    text = json.dumps(json_floats(values))
    assert "0.1," in text  # not 0.10000000149011612
    np.testing.assert_array_equal(np.asarray(json.loads(text), dtype=np.float32), values)


# --- status and metadata -----------------------------------------------------------------------


@pytest.mark.slow
def test_status_reports_the_served_version_available(client: httpx.Client) -> None:
    expected = {"model_version_status": [_ok_status(1)]}
    for path in (STATUS, f"{STATUS}/versions/1"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.json() == expected


@pytest.mark.slow
def test_metadata_describes_the_saved_models_signatures(
    client: httpx.Client, servable_v1: Any
) -> None:
    from tensorflow.core.framework import types_pb2

    response = client.get(f"{STATUS}/metadata")
    assert response.status_code == 200
    body = response.json()
    assert body["model_spec"] == {"name": MODEL_NAME, "signature_name": "", "version": "1"}
    signature_def = body["metadata"]["signature_def"]["signature_def"]

    def described(spec: Any) -> dict[str, Any]:
        return {
            "dtype": types_pb2.DataType.Name(spec.dtype.as_datatype_enum),
            "tensor_shape": {
                "dim": [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape],
                "unknown_rank": False,
            },
        }

    for name in (SERVING_DEFAULT, SERVING_BYTES):
        function = servable_v1.signatures[name]
        entry = signature_def[name]
        assert entry["method_name"] == "tensorflow/serving/predict"
        _, input_specs = function.structured_input_signature
        assert set(entry["inputs"]) == set(input_specs)
        for key, spec in input_specs.items():
            info = entry["inputs"][key]
            assert {k: info[k] for k in ("dtype", "tensor_shape")} == described(spec)
            assert info["name"] == f"{name}_{key}:0"  # the graph tensor TF Serving feeds
        assert set(entry["outputs"]) == set(function.structured_outputs)
        for key, spec in function.structured_outputs.items():
            info = entry["outputs"][key]
            assert {k: info[k] for k in ("dtype", "tensor_shape")} == described(spec)
    assert client.get(f"{STATUS}/versions/1/metadata").json() == body


# --- predict -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_documented_curl_command_with_make_request_json(
    server: Any, servable_v1: Any, tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    data = image_bytes("JPEG", size=(64, 48), color=(20, 120, 220))
    (tmp_path / "picture.jpg").write_bytes(data)
    write_request_json(tmp_path / "picture.jpg", tmp_path / "test_data.json")
    command = (
        f"curl -s -X POST http://localhost:{server.port}/v1/models/image_classifier:predict "
        "-d @test_data.json"
    )
    result = subprocess.run(
        command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    predictions = np.asarray(json.loads(result.stdout)["predictions"], dtype=np.float32)
    expected = servable_v1.predict(preprocess_image(data)[None])
    assert predictions.shape == (1, 10)
    np.testing.assert_allclose(predictions, expected, atol=TOLERANCE)


@pytest.mark.slow
def test_row_format_predictions_equal_the_signature_output(
    client: httpx.Client, servable_v1: Any
) -> None:
    images = _images(3)
    response = client.post(PREDICT, json={"instances": images.tolist()})
    assert response.status_code == 200, response.text
    assert list(response.json()) == ["predictions"]
    predictions = np.asarray(response.json()["predictions"], dtype=np.float32)
    np.testing.assert_allclose(predictions, servable_v1.predict(images), atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_body", "answer_key"),
    [
        (lambda x: {"instances": [{"images": image} for image in x]}, "predictions"),
        (lambda x: {"signature_name": SERVING_DEFAULT, "inputs": x}, "outputs"),
        (lambda x: {"inputs": {"images": x}}, "outputs"),
    ],
    ids=["instances-named", "inputs-bare", "inputs-named"],
)
def test_named_instances_and_columnar_inputs(
    client: httpx.Client,
    servable_v1: Any,
    make_body: Callable[[list[Any]], dict[str, Any]],
    answer_key: str,
) -> None:
    images = _images(2, seed=5)
    response = client.post(PREDICT, json=make_body(images.tolist()))
    assert response.status_code == 200, response.text
    assert list(response.json()) == [answer_key]
    answer = np.asarray(response.json()[answer_key], dtype=np.float32)
    np.testing.assert_allclose(answer, servable_v1.predict(images), atol=TOLERANCE)


@pytest.mark.slow
def test_versioned_predict(client: httpx.Client, servable_v1: Any) -> None:
    images = _images(1, seed=9)
    response = client.post(
        f"/v1/models/{MODEL_NAME}/versions/1:predict", json={"instances": images.tolist()}
    )
    assert response.status_code == 200, response.text
    predictions = np.asarray(response.json()["predictions"], dtype=np.float32)
    np.testing.assert_allclose(predictions, servable_v1.predict(images), atol=TOLERANCE)


@pytest.mark.slow
def test_serving_bytes_takes_b64_images(
    client: httpx.Client, servable_v1: Any, image_bytes: Callable[..., bytes]
) -> None:
    pictures = [
        image_bytes("PNG", size=(40, 30), color=(250, 200, 10)),
        image_bytes("JPEG", size=(32, 32), color=(10, 90, 160)),
    ]
    expected = servable_v1.predict_bytes(pictures)
    row = client.post(
        PREDICT,
        json={"signature_name": SERVING_BYTES, "instances": [_b64(p) for p in pictures]},
    )
    assert row.status_code == 200, row.text
    np.testing.assert_allclose(row.json()["predictions"], expected, atol=TOLERANCE)
    unpadded = [{"b64": _b64(p)["b64"].rstrip("=")} for p in pictures]
    columnar = client.post(
        PREDICT, json={"signature_name": SERVING_BYTES, "inputs": {"image_bytes": unpadded}}
    )
    assert columnar.status_code == 200, columnar.text
    np.testing.assert_allclose(columnar.json()["outputs"], expected, atol=TOLERANCE)


# --- errors: TF Serving's shape and status codes, never a 500 ---------------------------------

_ONE = np.zeros((1, 32, 32, 3)).tolist()
_ERROR_CASES: list[tuple[str, str, str, Any, int, str]] = [
    # (id, method, path, body, status, message fragment)
    ("unknown-model", "POST", "/v1/models/nope:predict", {"instances": _ONE}, 404,
     "Servable not found for request: Latest(nope)"),
    ("unknown-version", "POST", f"/v1/models/{MODEL_NAME}/versions/7:predict",
     {"instances": _ONE}, 404, f"Servable not found for request: Specific({MODEL_NAME}, 7)"),
    ("unknown-version-metadata", "GET", f"{STATUS}/versions/7/metadata", None, 404,
     f"Servable not found for request: Specific({MODEL_NAME}, 7)"),
    ("unknown-model-metadata", "GET", "/v1/models/nope/metadata", None, 404,
     "Servable not found for request: Latest(nope)"),
    ("unknown-version-status", "GET", f"{STATUS}/versions/7", None, 404,
     f"Could not find version 7 of model {MODEL_NAME}"),
    ("unknown-model-status", "GET", "/v1/models/nope", None, 404,
     "Could not find any versions of model nope"),
    ("label", "GET", f"{STATUS}/labels/stable", None, 400,
     "Unrecognized servable version label: stable"),
    ("no-model-name", "GET", "/v1/models", None, 400, "Missing model name in request."),
    ("malformed-path", "POST", f"{STATUS}:explain", {}, 400, "Malformed request: POST"),
    ("huge-version", "GET", f"{STATUS}/versions/99999999999999999999", None, 400,
     "Failed to convert version"),
    ("outside-v1", "GET", "/healthz", None, 404, "Not Found"),
    ("malformed-json", "POST", PREDICT, b'{"instances": [1,', 400, "JSON Parse error"),
    ("empty-body", "POST", PREDICT, b"", 400, "JSON Parse error: The document is empty"),
    ("not-utf8", "POST", PREDICT, b'{"instances": "\xff"}', 400, "JSON Parse error"),
    ("not-an-object", "POST", PREDICT, [1, 2], 400, "Is not object"),
    ("too-deep", "POST", PREDICT, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     400, "JSON Parse error"),
    ("both-keys", "POST", PREDICT, {"instances": _ONE, "inputs": _ONE}, 400,
     "expecting only one of 'inputs' or 'instances'"),
    ("no-keys", "POST", PREDICT, {"examples": []}, 400, "Missing 'inputs' or 'instances' key"),
    ("instances-not-list", "POST", PREDICT, {"instances": 1.0}, 400, "to be an list/array"),
    ("no-instances", "POST", PREDICT, {"instances": []}, 400, "No values in 'instances' array"),
    ("unknown-signature", "POST", PREDICT, {"signature_name": "nope", "instances": _ONE}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("signature-not-string", "POST", PREDICT, {"signature_name": 1, "instances": _ONE}, 400,
     "'signature_name' key must be a string value."),
    ("wrong-rank", "POST", PREDICT, {"instances": [[0.5, 0.5, 0.5]]}, 400,
     "expects shape [-1,32,32,3]"),
    ("wrong-size", "POST", PREDICT, {"inputs": np.zeros((1, 32, 31, 3)).tolist()}, 400,
     "the tensor has shape [1,32,31,3]"),
    ("ragged", "POST", PREDICT,
     {"instances": [np.zeros((32, 32, 3)).tolist(), np.zeros((32, 31, 3)).tolist()]}, 400,
     "Failed to process element: 1 of 'instances' list"),
    ("string-for-float", "POST", PREDICT,
     {"instances": [[[["0.5", 0.5, 0.5]] * 32] * 32]}, 400,
     "Type: String is not of expected type: float"),
    ("bool-for-float", "POST", PREDICT, {"instances": [[[[True, 0.5, 0.5]] * 32] * 32]}, 400,
     "Type: True is not of expected type: float"),
    ("null-for-float", "POST", PREDICT, {"instances": [[[[None, 0.5, 0.5]] * 32] * 32]}, 400,
     "Type: Null is not of expected type: float"),
    # NaN, Infinity and float literals beyond float32 are accepted, as by TF Serving:
    # tests/test_rest_gaps.py covers them.
    ("bad-b64", "POST", PREDICT,
     {"signature_name": SERVING_BYTES, "instances": [{"b64": "not base64!"}]}, 400,
     "Unable to base64 decode"),
    ("number-for-bytes", "POST", PREDICT, {"signature_name": SERVING_BYTES, "instances": [3]},
     400, "Type: Number is not of expected type: string"),
    ("not-an-image", "POST", PREDICT,
     {"signature_name": SERVING_BYTES, "instances": [_b64(b"hello, world")]}, 400,
     "Unknown image file format"),
    ("batch-too-large", "POST", PREDICT,
     {"instances": np.zeros((MAX_BATCH_SIZE + 1, 32, 32, 3)).tolist()}, 400,
     f"Task size {MAX_BATCH_SIZE + 1} is larger than maximum input batch size {MAX_BATCH_SIZE}"),
    ("classify", "POST", f"{STATUS}:classify", {"examples": [{"x": 1}]}, 400,
     "Expected classify signature method_name to be tensorflow/serving/classify"),
    ("method", "PUT", PREDICT, {}, 405, "Method Not Allowed"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [case[1:] for case in _ERROR_CASES],
    ids=[case[0] for case in _ERROR_CASES],
)
def test_errors_have_tf_servings_shape_and_status(
    client: httpx.Client, server: Any, method: str, path: str, body: Any, status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    _assert_error(client.request(method, path, content=content), status, message)
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_image_bomb_in_serving_bytes_is_refused_before_decoding(
    client: httpx.Client, encode_image: Callable[..., bytes]
) -> None:
    from PIL import Image

    # 60 MP of black compresses to ~60 KB of PNG but would decode to 180 MB in the graph.
    bomb = encode_image(Image.new("L", (10_000, 6_000)), "PNG")
    response = client.post(PREDICT, json={"signature_name": SERVING_BYTES, "inputs": [_b64(bomb)]})
    _assert_error(response, 400, "over the limit of 50,000,000")


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(server: Any, tmp_path: Path, chunked: bool) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_REQUEST_BYTES + 1024))
    command = ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", f"{server.url}{PREDICT}"]
    if chunked:
        command += ["-H", "Transfer-Encoding: chunked"]
    result = subprocess.run(
        [*command, "--data-binary", f"@{big}"], capture_output=True, text=True, timeout=60
    )
    body, _, code = result.stdout.rpartition("\n")
    assert code == "413", result.stdout
    assert "larger than the limit" in json.loads(body)["error"]


@pytest.mark.slow
def test_still_available_after_the_bad_requests(client: httpx.Client, server: Any) -> None:
    assert client.get(STATUS).json() == {"model_version_status": [_ok_status(1)]}
    assert server.process.poll() is None


# --- a new version while serving ---------------------------------------------------------------


@pytest.mark.slow
def test_new_version_replaces_the_old_without_restart_or_failed_requests(
    start_model_server: Callable[..., Any],
    tiny_export: Callable[..., Path],
    base_v1: Path,
    servable_v1: Any,
    tmp_path: Path,
) -> None:
    from image_classifier.servable import load_servable

    base = tmp_path / MODEL_NAME
    shutil.copytree(base_v1 / "1", base / "1")
    server = start_model_server(base, "--max_num_load_retries", "0")
    images = _images(2, seed=11)
    expected_v1 = servable_v1.predict(images)
    body = json.dumps({"instances": images.tolist()}).encode()
    stop = threading.Event()
    answers: list[list[tuple[int, Any]]] = [[], []]

    def hammer(record: list[tuple[int, Any]]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                response = http.post(PREDICT, content=body)
                record.append((response.status_code, response.json()))

    threads = [threading.Thread(target=hammer, args=(record,)) for record in answers]
    try:
        for thread in threads:
            thread.start()
        expected_v2 = load_servable(tiny_export(base, seed=2)).predict(images)
        assert np.abs(expected_v2 - expected_v1).max() > 100 * TOLERANCE  # two distinct models
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while http.get(STATUS).json()["model_version_status"][0] != _ok_status(2):
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.2)
            time.sleep(1.0)  # keep firing on the new version for a moment
            stop.set()
            for thread in threads:
                thread.join(timeout=60)

            assert http.get(STATUS).json() == {
                "model_version_status": [_ok_status(2), _ok_status(1, "END")]
            }
            assert http.get(f"{STATUS}/versions/1").json() == {
                "model_version_status": [_ok_status(1, "END")]
            }
            _assert_error(
                http.post(f"/v1/models/{MODEL_NAME}/versions/1:predict", content=body),
                404,
                f"Servable not found for request: Specific({MODEL_NAME}, 1)",
            )
            latest = http.post(PREDICT, content=body).json()["predictions"]
            np.testing.assert_allclose(latest, expected_v2, atol=TOLERANCE)
            assert http.get(f"{STATUS}/metadata").json()["model_spec"]["version"] == "2"

            # A broken version 3 is reported, and version 2 keeps serving.
            (base / "3").mkdir()
            (base / "3" / "saved_model.pb").write_bytes(b"not a SavedModel")
            while http.get(f"{STATUS}/versions/3").status_code != 200 or (
                http.get(f"{STATUS}/versions/3").json()["model_version_status"][0]["state"] != "END"
            ):
                assert time.monotonic() < deadline + 60, server.log()
                time.sleep(0.2)
            failed = http.get(f"{STATUS}/versions/3").json()["model_version_status"][0]
            assert failed["status"]["error_code"] != "OK" and failed["status"]["error_message"]
            still = http.post(PREDICT, content=body).json()["predictions"]
            np.testing.assert_allclose(still, expected_v2, atol=TOLERANCE)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        server.stop()

    for record in answers:
        assert record, "no requests were made during the switch"
        assert all(status == 200 for status, _ in record), [r for r in record if r[0] != 200]
        versions = []
        for _, answer in record:
            predictions = np.asarray(answer["predictions"], dtype=np.float32)
            if np.allclose(predictions, expected_v1, atol=TOLERANCE):
                versions.append(1)
            else:
                np.testing.assert_allclose(predictions, expected_v2, atol=TOLERANCE)
                versions.append(2)
        # One client sees the switch once: version 1 answers, then only version 2 answers.
        assert versions == sorted(versions) and versions[-1] == 2


# --- the codec and the manager in-process: cases the tiny model cannot show -----------------


def _info(key: str, dtype: str, shape: tuple[int | None, ...] | None) -> TensorInfo:
    return TensorInfo(key=key, dtype=dtype, shape=shape, tensor_name=f"{key}:0")


_TWO_INPUTS = Signature(
    name="two",
    method_name="tensorflow/serving/predict",
    inputs={
        "ids": _info("ids", "DT_INT64", (None, 2)),
        "mask": _info("mask", "DT_BOOL", (None,)),
    },
    outputs={},
)


def test_codec_named_instances_for_several_inputs() -> None:
    document = {
        "instances": [{"ids": [1, 2], "mask": True}, {"ids": [3, 4], "mask": False}],
    }
    request = decode_predict_request(document, _TWO_INPUTS, max_batch_size=8)
    assert request.row_format
    assert request.inputs["ids"].dtype == np.int64
    np.testing.assert_array_equal(request.inputs["ids"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(request.inputs["mask"], [True, False])


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"instances": [[1, 2]]}, "instances is a plain list"),
        ({"instances": [{"ids": [1, 2]}]}, "keys must be equal to: ids,mask"),
        ({"instances": [{"ids": [1.5, 2], "mask": True}]}, "is not of expected type: int64"),
        ({"instances": [{"ids": [1, 2], "mask": 1}]}, "is not of expected type: bool"),
        ({"inputs": {"ids": [[1, 2]]}}, "Missing named input: mask in 'inputs' object."),
        ({"inputs": [[1, 2]]}, "inputs is a plain value/list"),
    ],
)
def test_codec_refuses_what_tf_serving_refuses(document: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message.replace(".", r"\.")):
        decode_predict_request(document, _TWO_INPUTS, max_batch_size=8)


def test_codec_several_outputs_and_bytes_outputs() -> None:
    outputs = {
        "scores": np.array([[0.1, 0.9], [0.5, 0.5]], dtype=np.float32),
        "label_bytes": np.array([b"\x00\xff", b"ok"], dtype=object),
        "label": np.array([b"cat", b"dog"], dtype=object),
    }
    rows = json.loads(encode_predict_response(outputs, row_format=True))
    assert rows["predictions"][0] == {
        "label": "cat",
        "label_bytes": {"b64": "AP8="},  # *_bytes string outputs are base64, as in TF Serving
        "scores": [0.1, 0.9],
    }
    columns = json.loads(encode_predict_response(outputs, row_format=False))
    assert columns["outputs"]["scores"] == [[0.1, 0.9], [0.5, 0.5]]
    assert columns["outputs"]["label"] == ["cat", "dog"]


class _FakeLoaded:
    def __init__(self, version: int) -> None:
        self.version = version


def _fake_manager(base: Path, fail: set[int]) -> ModelManager:
    def loader(version_dir: Path) -> LoadedVersion:
        version = int(version_dir.name)
        if version in fail:
            raise ValueError(f"version {version} is broken")
        return cast(LoadedVersion, _FakeLoaded(version))

    return ModelManager(MODEL_NAME, base, max_num_load_retries=1, load_retry_interval_seconds=0,
                        loader=loader)  # fmt: skip


def test_manager_serves_the_highest_version_and_survives_a_broken_one(tmp_path: Path) -> None:
    manager = _fake_manager(tmp_path, fail={3})
    with pytest.raises(NotFoundError, match="Could not find any versions"):
        manager.statuses(MODEL_NAME)
    (tmp_path / "1").mkdir()
    (tmp_path / "not-a-version").mkdir()
    manager.poll()
    in_flight = manager.servable(MODEL_NAME, None)  # a request that started on version 1
    (tmp_path / "2").mkdir()
    manager.poll()
    assert in_flight.version == 1  # kept its reference across the swap
    assert manager.servable(MODEL_NAME, None).version == 2
    assert manager.servable(MODEL_NAME, 2).version == 2
    with pytest.raises(NotFoundError, match=rf"Specific\({MODEL_NAME}, 1\)"):
        manager.servable(MODEL_NAME, 1)

    (tmp_path / "3").mkdir()
    manager.poll()  # first failure: retried while LOADING
    assert manager.statuses(MODEL_NAME, 3)[0].state == "LOADING"
    manager.poll()  # retry fails too: given up
    manager.poll()
    status = manager.statuses(MODEL_NAME, 3)[0]
    assert (status.state, status.error_code) == ("END", "UNKNOWN")
    assert "version 3 is broken" in status.error_message
    assert manager.servable(MODEL_NAME, None).version == 2
    assert [s.state for s in manager.statuses(MODEL_NAME)] == ["END", "AVAILABLE", "END"]


def test_manager_keeps_serving_when_the_base_path_vanishes_but_not_when_emptied(
    tmp_path: Path,
) -> None:
    base = tmp_path / "models"
    (base / "1").mkdir(parents=True)
    manager = _fake_manager(base, fail=set())
    manager.poll()
    base.rename(tmp_path / "elsewhere")  # an unmounted volume is not a request to unload
    manager.poll()
    assert manager.servable(MODEL_NAME, None).version == 1
    (tmp_path / "elsewhere").rename(base)
    (base / "1").rmdir()  # no versions left: TF Serving unloads
    manager.poll()
    with pytest.raises(NotFoundError, match=rf"Latest\({MODEL_NAME}\)"):
        manager.servable(MODEL_NAME, None)
    assert manager.statuses(MODEL_NAME) == [VersionStatus(1, "END")]


def test_tensorflow_thread_flags_are_tensorflow_model_servers() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "model-server",
            "--tensorflow_intra_op_parallelism=3",
            "--tensorflow_inter_op_parallelism",
            "2",
        ]
    )
    settings = model_server_command.settings_from_args(args)
    assert (settings.tensorflow_intra_op_parallelism, settings.tensorflow_inter_op_parallelism) == (
        3,
        2,
    )
    defaults = model_server_command.settings_from_args(parser.parse_args(["model-server"]))
    assert (defaults.tensorflow_intra_op_parallelism, defaults.tensorflow_inter_op_parallelism) == (
        0,
        0,
    )  # TF Serving's default: TensorFlow picks
    with pytest.raises(ConfigError, match="tensorflow_intra_op_parallelism"):
        ModelServerSettings(tensorflow_intra_op_parallelism=-1)


def test_the_thread_flags_reach_tensorflow_in_the_server_process(
    start_model_server: Callable[..., Any], base_v1: Path
) -> None:
    server = start_model_server(
        base_v1, "--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=3"
    )
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"instances": _images(2).tolist()}
            response = http.post(f"/v1/models/{MODEL_NAME}:predict", json=body)
        assert response.status_code == 200
        assert len(response.json()["predictions"]) == 2
        # The server logs what TensorFlow reports back after the flags were applied.
        assert "TensorFlow threads: intra-op 1, inter-op 3" in server.log()
    finally:
        server.stop()


def test_serve_runs_the_model_with_the_tuned_thread_counts(base_v1: Path) -> None:
    from image_classifier.cli.serve import _tensorflow_thread_flags
    from image_classifier.servable import tuned_thread_counts

    # Two passes per image (the picture and its mirror) side by side, each on half the cores.
    assert tuned_thread_counts(2) == (1, 2)
    assert tuned_thread_counts(16) == (8, 2)
    assert tuned_thread_counts(1) == (1, 2)
    intra, inter = tuned_thread_counts()
    shipped = Path(__file__).resolve().parent.parent / "saved_models" / MODEL_NAME
    flipped = max((p for p in shipped.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert _tensorflow_thread_flags(flipped) == (
        f"--tensorflow_intra_op_parallelism={intra}",
        f"--tensorflow_inter_op_parallelism={inter}",
    )
    # An export without flip averaging has one pass per image: TensorFlow's defaults.
    assert _tensorflow_thread_flags(base_v1 / "1") == ()


class _Cycle:
    """Garbage only the cyclic collector can free: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


def test_freeze_heap_collects_what_an_earlier_freeze_pinned_then_freezes() -> None:
    import gc
    import weakref

    from image_classifier.webserver import freeze_heap

    try:
        garbage = _Cycle()
        ref = weakref.ref(garbage)
        gc.freeze()  # an earlier freeze_heap, say at start-up, while it was still in use
        del garbage
        gc.collect()
        assert ref() is not None  # frozen objects are outside the collector's rounds

        freeze_heap()

        assert ref() is None  # unfrozen and collected before the new freeze
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_manager_freezes_the_heap_after_each_load_and_unload(tmp_path: Path) -> None:
    import gc
    import weakref

    manager = _fake_manager(tmp_path, fail=set())
    try:
        (tmp_path / "1").mkdir()
        gc.unfreeze()
        manager.poll()
        assert gc.get_freeze_count() > 0  # loaded: the long-lived heap is frozen

        garbage = _Cycle()
        ref = weakref.ref(garbage)
        gc.freeze()
        del garbage
        shutil.rmtree(tmp_path / "1")
        (tmp_path / "2").mkdir()
        manager.poll()  # loads 2, unloads 1: each refreezes after a full collection
        assert ref() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
