"""image_classifier.tfserving.config, and the tensorflow_serving install it relies on.

The config module parses TF Serving's text-proto files with TF Serving's own message types from
tensorflow-serving-api, installed with --no-deps next to tensorflow-cpu (its wheel asks for the
full `tensorflow` wheel). The last tests check that this left exactly one TensorFlow installed and
that TF Serving's messages are built on that TensorFlow's protos.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from image_classifier.errors import ImageClassifierError
from image_classifier.tfserving.config import (
    ConfigError,
    parse_batching_parameters,
    parse_model_server_config,
    parse_monitoring_config,
    read_text_proto,
    validate_batching_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BATCHING = ROOT / "docker" / "tf_serving" / "batching.config"

TWO_MODELS = """
model_config_list {
  config {
    name: "image_classifier"
    base_path: "/models/image_classifier"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config {
    name: "image_classifier_next"
    base_path: "/models/image_classifier_next"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
  }
}
"""


# --- ModelServerConfig (--model_config_file) ----------------------------------------------------


def test_model_server_config_with_two_models_reads_back() -> None:
    config = parse_model_server_config(TWO_MODELS)
    assert config.DESCRIPTOR.full_name == "tensorflow.serving.ModelServerConfig"
    assert config.WhichOneof("config") == "model_config_list"
    first, second = config.model_config_list.config
    assert (first.name, first.base_path) == ("image_classifier", "/models/image_classifier")
    assert first.model_platform == "tensorflow"
    assert first.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert first.model_version_policy.latest.num_versions == 2
    assert dict(first.version_labels) == {"stable": 1, "canary": 2}
    assert second.name == "image_classifier_next"
    assert second.model_version_policy.WhichOneof("policy_choice") == "specific"
    assert list(second.model_version_policy.specific.versions) == [1, 2]
    assert not second.version_labels


@pytest.mark.parametrize(
    ("policy", "choice"),
    [
        ("latest { num_versions: 2 }", "latest"),
        ("specific { versions: 1 versions: 2 }", "specific"),
        ("all {}", "all"),
    ],
)
def test_model_version_policy_choice_reads_back(policy: str, choice: str) -> None:
    text = f'model_config_list {{ config {{ name: "m" model_version_policy {{ {policy} }} }} }}'
    config = parse_model_server_config(text)
    (model,) = config.model_config_list.config
    assert model.model_version_policy.WhichOneof("policy_choice") == choice


def test_model_server_config_file_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "models.config"
    path.write_text(TWO_MODELS, encoding="utf-8")
    config = read_text_proto(path, parse_model_server_config)
    assert [c.name for c in config.model_config_list.config] == [
        "image_classifier",
        "image_classifier_next",
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('model_config_list { config { nmae: "m" } }', 'has no field named "nmae"'),
        (
            'model_config_list { config { name: "m" version_labels { key: "a" value: "one" } } }',
            "Couldn't parse integer",
        ),
        (
            "model_config_list { config { model_version_policy { latest { num_versions: -1 } } } }",
            "Value out of range: -1",
        ),
        ('model_config_list { config { name: "m" }', 'Expected "}"'),
    ],
    ids=["unknown-field", "string-for-int64", "negative-uint32", "unclosed-brace"],
)
def test_invalid_model_server_config_raises_config_error_naming_the_file(
    tmp_path: Path, text: str, complaint: str
) -> None:
    path = tmp_path / "models.config"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        read_text_proto(path, parse_model_server_config)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert complaint in message
    # `from None`: the caller sees one error, not protobuf's parser internals behind it.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_config_error_belongs_to_the_package_hierarchy() -> None:
    with pytest.raises(ImageClassifierError) as caught:
        parse_model_server_config("no_such_field: 1")
    assert isinstance(caught.value, ConfigError)
    assert caught.value.code == "invalid_config"
    assert str(caught.value).startswith("<text>: ")


def test_unreadable_config_file_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.config"
    with pytest.raises(ConfigError, match=r"absent\.config: cannot read"):
        read_text_proto(missing, parse_model_server_config)
    not_utf8 = tmp_path / "latin1.config"
    not_utf8.write_bytes(b'model_config_list { config { name: "caf\xe9" } }')
    with pytest.raises(ConfigError, match=r"latin1\.config: cannot read"):
        read_text_proto(not_utf8, parse_model_server_config)


# --- MonitoringConfig and BatchingParameters ----------------------------------------------------


def test_monitoring_config_fields_read_back() -> None:
    config = parse_monitoring_config('prometheus_config { enable: true path: "/metrics" }')
    assert config.DESCRIPTOR.full_name == "tensorflow.serving.MonitoringConfig"
    assert config.prometheus_config.enable is True
    assert config.prometheus_config.path == "/metrics"


def test_validate_batching_parameters_accepts_the_shipped_file() -> None:
    params = read_text_proto(SHIPPED_BATCHING, parse_batching_parameters)
    assert params.DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"
    assert params.max_batch_size.value == params.allowed_batch_sizes[-1]
    validate_batching_parameters(params)  # raises on anything TF Serving would refuse


@pytest.mark.parametrize(
    "text",
    [
        "max_batch_size { value: 8 } allowed_batch_sizes: [1, 2, 4, 8]",
        "max_batch_size { value: 8 }",  # no allowed sizes: batches of any size up to 8
        "allowed_batch_sizes: [10, 1000]",  # max_batch_size unset: the scheduler's 1000
        "max_batch_size { value: 64 } max_execution_batch_size { value: 16 }"
        " enable_large_batch_splitting { value: true } allowed_batch_sizes: [8, 16]",
    ],
    ids=["powers-of-two", "no-allowed-sizes", "default-max", "split-large-batches"],
)
def test_validate_batching_parameters_accepts(text: str) -> None:
    validate_batching_parameters(parse_batching_parameters(text))


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("max_batch_size { value: 8 } allowed_batch_sizes: [1, 4, 4, 8]", "strictly increasing"),
        ("max_batch_size { value: 8 } allowed_batch_sizes: [1, 8, 4]", "strictly increasing"),
        ("max_batch_size { value: 8 } allowed_batch_sizes: [0, 8]", "positive"),
        ("max_batch_size { value: 8 } allowed_batch_sizes: [1, 2, 4]", "max_batch_size (8), got 4"),
        ("allowed_batch_sizes: [1, 64]", "max_batch_size (1000), got 64"),
        (
            "max_batch_size { value: 64 } max_execution_batch_size { value: 16 }"
            " enable_large_batch_splitting { value: true } allowed_batch_sizes: [8, 64]",
            "max_execution_batch_size (16), got 64",
        ),
        ("max_batch_size { value: 0 }", "max_batch_size must be at least 1"),
        ("num_batch_threads { value: 0 }", "num_batch_threads must be at least 1"),
        ("max_enqueued_batches { value: -1 }", "max_enqueued_batches must be at least 1"),
    ],
    ids=[
        "repeated-size",
        "decreasing",
        "zero-size",
        "last-below-max",
        "last-below-default-max",
        "last-above-execution-max",
        "zero-max",
        "zero-threads",
        "negative-queue",
    ],
)
def test_validate_batching_parameters_refuses(text: str, complaint: str) -> None:
    params = parse_batching_parameters(text)
    with pytest.raises(ConfigError) as caught:
        validate_batching_parameters(params, "batching.config")
    assert str(caught.value).startswith("batching.config: ")
    assert complaint in str(caught.value)


# --- the tensorflow_serving install -------------------------------------------------------------


def test_only_tensorflow_cpu_is_installed() -> None:
    # tensorflow-serving-api depends on `tensorflow`; installed with its dependencies it would
    # put a second, full TensorFlow over tensorflow-cpu's files.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("tensorflow")
    cpu = importlib.metadata.distribution("tensorflow-cpu")
    serving_api = importlib.metadata.distribution("tensorflow-serving-api")
    # Release lines move together: the serving messages match the TensorFlow protos they embed.
    assert serving_api.version.split(".")[:2] == cpu.version.split(".")[:2]


def test_serving_messages_carry_the_installed_tensorflows_tensors() -> None:
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    assert tf.__version__ == importlib.metadata.version("tensorflow-cpu")
    inputs_value = predict_pb2.PredictRequest.DESCRIPTOR.fields_by_name["inputs"].message_type
    # One TensorProto descriptor: TF Serving's messages import TensorFlow's, not a copy.
    assert inputs_value.fields_by_name["value"].message_type is tensor_pb2.TensorProto.DESCRIPTOR

    array = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, -1.5]], dtype=np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "image_classifier"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(array))
    parsed = predict_pb2.PredictRequest()
    parsed.ParseFromString(request.SerializeToString())
    assert parsed == request
    assert parsed.model_spec.signature_name == "serving_default"
    assert parsed.inputs["images"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in parsed.inputs["images"].tensor_shape.dim] == [2, 3]
    np.testing.assert_array_equal(tf.make_ndarray(parsed.inputs["images"]), array)


def test_prediction_service_stub_builds_on_the_installed_grpcio() -> None:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    # Creating a channel does not connect; nothing listens on port 1 and nothing is sent.
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert callable(stub.Predict)
        assert callable(stub.GetModelMetadata)


def test_prometheus_path_follows_tf_servings_monitoring_config(tmp_path: Path) -> None:
    from image_classifier.errors import ConfigError
    from image_classifier.tfserving.config import DEFAULT_PROMETHEUS_PATH, prometheus_path

    cases = {
        "default": ("prometheus_config { enable: true }", DEFAULT_PROMETHEUS_PATH),
        "custom": ('prometheus_config { enable: true path: "/metrics" }', "/metrics"),
        "off": ('prometheus_config { enable: false path: "/metrics" }', None),
    }
    for name, (text, expected) in cases.items():
        config = tmp_path / f"{name}.config"
        config.write_text(text, encoding="utf-8")
        assert prometheus_path(config) == expected, name

    clash = tmp_path / "clash.config"
    clash.write_text('prometheus_config { enable: true path: "/v1/metrics" }', encoding="utf-8")
    with pytest.raises(ConfigError, match="outside /v1/"):
        prometheus_path(clash)
