"""The model server's gRPC API, as TF Serving's own Python clients see it.

One real ``python -m image_classifier model-server`` process (tiny export, batching on, health
service on) answers the stock ``PredictionServiceStub`` / ``ModelServiceStub`` /
``HealthStub`` from ``tensorflow-serving-api`` and ``grpcio-health-checking``; every answer is
compared with the REST port's answer or the export called in-process.
"""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from image_classifier.constants import MODEL_NAME, SERVING_BYTES, SERVING_DEFAULT

PARITY = 1e-6
BATCH_TIMEOUT_MICROS = 50_000  # wide enough that concurrent calls meet in one batch


@pytest.fixture(scope="module")
def base(gateway_model_base_path: Path) -> Path:
    return gateway_model_base_path  # the session's tiny export (version 1), only read here


@pytest.fixture(scope="module")
def server(
    start_model_server: Callable[..., Any], base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    configs = tmp_path_factory.mktemp("grpc_configs")
    batching = configs / "batching.config"
    batching.write_text(
        "max_batch_size { value: 32 }\n"
        f"batch_timeout_micros {{ value: {BATCH_TIMEOUT_MICROS} }}\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 16 }\n"
    )
    monitoring = configs / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true path: "/metrics" }')
    running = start_model_server(
        base,
        "--enable_batching",
        "--batching_parameters_file", str(batching),
        "--monitoring_config_file", str(monitoring),
        "--enable_grpc_healthcheck_service",
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Any:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel: grpc.Channel) -> Any:
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def servable(gateway_servable: Any) -> Any:
    return gateway_servable  # the same export, loaded in-process


def _predict_request(images: np.ndarray, **spec: Any) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", MODEL_NAME)
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return request


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


# --- PredictionService -------------------------------------------------------------------------


def test_grpc_predict_gives_the_rest_answer(stub: Any, server: Any, servable: Any) -> None:
    images = _images(3)
    response = stub.Predict(_predict_request(images), timeout=30)
    grpc_probs = tf.make_ndarray(response.outputs["probabilities"])
    rest = httpx.post(
        f"{server.url}/v1/models/{MODEL_NAME}:predict",
        json={"instances": images.tolist()},
        timeout=30,
    )
    assert rest.status_code == 200, rest.text
    rest_probs = np.asarray(rest.json()["predictions"], dtype=np.float32)

    assert grpc_probs.shape == (3, 10) and grpc_probs.dtype == np.float32
    np.testing.assert_allclose(grpc_probs, rest_probs, atol=PARITY, rtol=0)
    np.testing.assert_allclose(grpc_probs, servable.predict(images), atol=PARITY, rtol=0)
    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == SERVING_DEFAULT


def test_grpc_predict_takes_encoded_images_as_string_tensors(
    stub: Any, server: Any, image_bytes: Callable[..., bytes]
) -> None:
    png = image_bytes("PNG", color=(200, 30, 60), size=(40, 24))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = SERVING_BYTES
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([png]))
    grpc_probs = tf.make_ndarray(stub.Predict(request, timeout=30).outputs["probabilities"])
    rest = httpx.post(
        f"{server.url}/v1/models/{MODEL_NAME}:predict",
        json={
            "signature_name": SERVING_BYTES,
            "instances": [{"b64": base64.b64encode(png).decode()}],
        },
        timeout=30,
    )
    np.testing.assert_allclose(grpc_probs, rest.json()["predictions"], atol=PARITY, rtol=0)


def test_grpc_output_filter_keeps_only_the_named_outputs(stub: Any) -> None:
    request = _predict_request(_images(1))
    request.output_filter.append("probabilities")
    assert list(stub.Predict(request, timeout=30).outputs) == ["probabilities"]


def test_get_model_metadata_sends_the_signature_defs(stub: Any, server: Any) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL_NAME
    response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    rest = httpx.get(f"{server.url}/v1/models/{MODEL_NAME}/metadata", timeout=30).json()

    assert response.model_spec.name == MODEL_NAME and response.model_spec.version.value == 1
    assert set(signatures.signature_def) == set(rest["metadata"]["signature_def"]["signature_def"])
    images = signatures.signature_def[SERVING_DEFAULT].inputs["images"]
    assert images.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in images.tensor_shape.dim] == [-1, 32, 32, 3]


def test_get_model_status_reports_the_version_available(model_stub: Any) -> None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    (status,) = model_stub.GetModelStatus(request, timeout=30).model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert (status.status.error_code, status.status.error_message) == (0, "")


# --- errors: TF Serving's codes and texts -----------------------------------------------------


def _classify() -> Any:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL_NAME
    return request


def _regress() -> Any:
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = MODEL_NAME
    return request


def _multi_inference() -> Any:
    request = inference_pb2.MultiInferenceRequest()
    task = request.tasks.add()
    task.model_spec.name = MODEL_NAME
    task.method_name = "tensorflow/serving/classify"
    return request


def _status(**spec: Any) -> Any:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = spec.get("name", MODEL_NAME)
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    return request


def _output_filter(*aliases: str) -> Any:
    request = _predict_request(_images(1))
    request.output_filter.extend(aliases)
    return request


def _bad_input_key() -> Any:
    request = _predict_request(_images(1))
    request.inputs["pictures"].CopyFrom(request.inputs.pop("images"))
    return request


CLASSIFY_REFUSAL = (
    "Expected classification signature method_name to be tensorflow/serving/classify. "
    "Was: tensorflow/serving/predict"
)
ERRORS = [
    ("Predict", lambda: _predict_request(_images(1), name="nope"), "NOT_FOUND",
     "Servable not found for request: Latest(nope)"),
    ("Predict", lambda: _predict_request(_images(1), version=99), "NOT_FOUND",
     f"Servable not found for request: Specific({MODEL_NAME}, 99)"),
    ("Predict", lambda: _predict_request(_images(1), version_label="canary"), "INVALID_ARGUMENT",
     "Unrecognized servable version label: canary"),
    ("Predict", lambda: _predict_request(_images(1), name=""), "INVALID_ARGUMENT",
     "ModelSpec has no name specified."),
    ("Predict", lambda: _predict_request(_images(1), signature_name="nope"),
     "FAILED_PRECONDITION", 'Serving signature key "nope" not found.'),
    ("Predict", _bad_input_key, "INVALID_ARGUMENT",
     "input size does not match signature: 1!=1 len({pictures}) != len({images}). "
     "Sent extra: {pictures}. Missing but required: {images}."),
    ("Predict", lambda: _predict_request(_images(1).astype(np.float64)), "INVALID_ARGUMENT",
     "Expects arg[0] to be float but double is provided"),
    ("Predict", lambda: _output_filter("nope"), "INVALID_ARGUMENT",
     "output tensor alias not found in signature: nope Outputs expected to be in the set "
     "{probabilities}."),
    ("Predict", lambda: _output_filter("probabilities", "probabilities"), "INVALID_ARGUMENT",
     "duplicate output tensor alias: probabilities"),
    ("GetModelStatus", lambda: _status(name="nope"), "NOT_FOUND",
     "Could not find any versions of model nope"),
    ("GetModelStatus", lambda: _status(version=7), "NOT_FOUND",
     f"Could not find version 7 of model {MODEL_NAME}"),
    ("Classify", _classify, "INVALID_ARGUMENT", CLASSIFY_REFUSAL),
    ("Regress", _regress, "INVALID_ARGUMENT",
     "Expected regression signature method_name to be tensorflow/serving/regress. "
     "Was: tensorflow/serving/predict"),
    ("MultiInference", _multi_inference, "INVALID_ARGUMENT", CLASSIFY_REFUSAL),
    ("GetModelMetadata",
     lambda: get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": MODEL_NAME}),
     "INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "make_request", "code", "message"),
    ERRORS,
    ids=[f"{m}-{c}-{i}" for i, (m, _, c, _) in enumerate(ERRORS)],
)
def test_refusals_carry_tf_servings_code_and_message(
    stub: Any, model_stub: Any, method: str, make_request: Any, code: str, message: str
) -> None:
    target = model_stub if method == "GetModelStatus" else stub
    with pytest.raises(grpc.RpcError) as caught:
        getattr(target, method)(make_request(), timeout=30)
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert caught.value.details() == message


def test_an_unknown_label_reads_the_same_over_rest(server: Any) -> None:
    response = httpx.post(
        f"{server.url}/v1/models/{MODEL_NAME}/labels/canary:predict",
        json={"instances": _images(1).tolist()},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json() == {"error": "Unrecognized servable version label: canary"}


# --- health, batching, ports --------------------------------------------------------------------


def test_health_service_reports_serving_under_tf_servings_service_names(
    channel: grpc.Channel,
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "PredictionService", "ModelService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_concurrent_grpc_predicts_share_batches(stub: Any, server: Any, servable: Any) -> None:
    runs = ":tensorflow:serving:batching_session:wrapped_run_count"
    before = _metric(httpx.get(f"{server.url}/metrics", timeout=10).text, runs)
    images = _images(16, seed=9)
    calls = [
        stub.Predict.future(_predict_request(images[i : i + 1]), timeout=30) for i in range(16)
    ]
    answers = np.concatenate(
        [tf.make_ndarray(call.result().outputs["probabilities"]) for call in calls]
    )
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text

    np.testing.assert_allclose(answers, servable.predict(images), atol=PARITY, rtol=0)
    model_runs = _metric(metrics, runs) - before
    assert 1 <= model_runs < 16  # several requests per model call
    assert 'entrypoint="GRPC"' in metrics  # counted and timed like REST, under its entry point


def test_a_taken_grpc_port_is_refused_before_anything_loads() -> None:
    from image_classifier.errors import ImageClassifierError
    from image_classifier.model_server import ModelServerSettings
    from image_classifier.model_server._grpc import bind

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # An ImageClassifierError: the CLI prints it as one line and exits non-zero.
        with pytest.raises(ImageClassifierError, match=f"gRPC port 127.0.0.1:{port} is not free"):
            bind(ModelServerSettings(grpc_port=port))


def test_grpc_cannot_be_switched_off_without_a_socket_as_in_tf_serving() -> None:
    from image_classifier.errors import ConfigError
    from image_classifier.model_server import ModelServerSettings

    with pytest.raises(ConfigError, match=r"At least one of server_options\.grpc_port"):
        ModelServerSettings(grpc_port=0)
    with pytest.raises(ConfigError, match="cannot be the same"):
        ModelServerSettings(grpc_port=9000, rest_api_port=9000)
    assert ModelServerSettings(grpc_port=0, grpc_socket_path="/tmp/x.sock").grpc_port == 0


def test_grpc_packages_are_the_pinned_ones_and_fit_the_installed_tensorflow() -> None:
    import importlib.metadata

    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = {
        req.name: req.specifier
        for req in map(Requirement, pyproject["project"]["optional-dependencies"]["serve"])
    }
    for name in ("grpcio", "grpcio-health-checking"):
        installed = importlib.metadata.version(name)
        assert installed in pins[name], (name, installed, pins[name])
        # ... and what tensorflow-cpu, tensorflow-serving-api and the health service ask for,
        # so no second grpcio, protobuf or TensorFlow comes in with them.
        for dependent in ("tensorflow-cpu", "tensorflow-serving-api", "grpcio-health-checking"):
            for text in importlib.metadata.requires(dependent) or []:
                requirement = Requirement(text)
                if requirement.name in ("grpcio", "protobuf"):
                    version = importlib.metadata.version(requirement.name)
                    assert version in requirement.specifier, (dependent, text, version)
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("tensorflow")
