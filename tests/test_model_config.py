"""``--model_config_file``: several models, version policies and labels, changed without restart.

One real model server process serves three models from a ``ModelServerConfig`` file: two
versions of a tiny export (different weights, so answers tell versions apart) under ``all``,
``specific`` and ``latest`` policies, the second base path a symlink to the first. Labels are
added and moved by editing the file (polled every second) and by the ModelService's
HandleReloadConfigRequest, and read over REST (``/labels/L``), over gRPC
(``model_spec.version_label``) and through the gateway's TF Serving backend. The label rules
themselves (TF Serving's checks) get fast in-process tests on a registry with fake versions.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from image_classifier.constants import MODEL_NAME
from image_classifier.errors import ConfigError
from image_classifier.model_server._manager import LoadedVersion, ModelManager, ModelRegistry
from image_classifier.tfserving.config import (
    ModelEntry,
    VersionPolicy,
    model_entries,
    parse_model_server_config,
)
from image_classifier.tfserving.errors import InvalidArgumentError, NotFoundError, ServingError

PARITY = 1e-6


def _config(models: dict[str, tuple[Path, str, dict[str, int]]]) -> str:
    """A ModelServerConfig text: name -> (base path, version policy text, labels)."""
    entries = []
    for name, (base, policy, labels) in models.items():
        label_text = "".join(
            f"    version_labels {{ key: '{k}' value: {v} }}\n" for k, v in labels.items()
        )
        entries.append(
            f"  config {{\n    name: '{name}'\n    base_path: '{base}'\n"
            f"    model_platform: 'tensorflow'\n{policy}{label_text}  }}\n"
        )
    return "model_config_list {\n" + "".join(entries) + "}\n"


# --- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(
    tiny_export: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
    gateway_model_base_path: Path,
) -> Any:
    root = tmp_path_factory.mktemp("model_config")
    base = root / "exports"
    # Version 1 is the session's shared tiny export (built once for the suite), version 2 a
    # model with other weights, so every answer says which version computed it.
    shutil.copytree(gateway_model_base_path / "1", base / "1", symlinks=True)
    tiny_export(base, seed=12, version=2)
    link = root / "same_exports"
    link.symlink_to(base, target_is_directory=True)
    return root, base, link


def _models(base: Path, link: Path, labels: dict[str, int]) -> str:
    return _config(
        {
            MODEL_NAME: (base, "    model_version_policy { all {} }\n", labels),
            "beta": (link, "    model_version_policy { specific { versions: 1 } }\n", {}),
            "gamma": (base, "", {}),  # no policy: latest, one version
        }
    )


@pytest.fixture(scope="module")
def server(start_model_server: Callable[..., Any], bases: Any) -> Iterator[Any]:
    root, base, link = bases
    config = root / "models.config"
    config.write_text(_models(base, link, {}))
    running = start_model_server(
        base,  # also passed as --model_base_path: ignored beside the config file, as in TF Serving
        "--model_config_file", str(config),
        "--model_config_file_poll_wait_seconds", "1",
    )  # fmt: skip
    running.config = config
    yield running
    running.stop()


@pytest.fixture(scope="module")
def expected(bases: Any) -> dict[int, Callable[[np.ndarray], np.ndarray]]:
    from image_classifier.servable import load_servable

    _, base, _ = bases
    return {version: load_servable(base, version).predict for version in (1, 2)}


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as opened:
        yield opened


IMAGES = np.random.default_rng(4).random((2, 32, 32, 3), dtype=np.float32)


def _rest_predict(server: Any, path: str) -> np.ndarray:
    response = httpx.post(
        f"{server.url}/v1/models/{path}:predict", json={"instances": IMAGES.tolist()}, timeout=30
    )
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["predictions"], dtype=np.float32)


def _grpc_predict(channel: grpc.Channel, name: str, label: str) -> tuple[int, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(IMAGES))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        request, timeout=30
    )
    return response.model_spec.version.value, tf.make_ndarray(response.outputs["probabilities"])


def _label_version(server: Any, label: str) -> int | None:
    response = httpx.get(f"{server.url}/v1/models/{MODEL_NAME}/labels/{label}/metadata")
    return int(response.json()["model_spec"]["version"]) if response.status_code == 200 else None


def _wait_for_label(server: Any, label: str, version: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _label_version(server, label) != version:
        assert time.monotonic() < deadline, f"label {label} never reached {version}"
        time.sleep(0.2)


def _states(server: Any, name: str) -> dict[int, str]:
    body = httpx.get(f"{server.url}/v1/models/{name}", timeout=10).json()
    return {int(s["version"]): s["state"] for s in body["model_version_status"]}


def _reload(channel: grpc.Channel, text: str) -> Any:
    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(parse_model_server_config(text))
    return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
        request, timeout=60
    )


# --- policies ------------------------------------------------------------------------------------


def test_each_model_serves_the_versions_its_policy_names(server: Any, expected: Any) -> None:
    assert _states(server, MODEL_NAME) == {1: "AVAILABLE", 2: "AVAILABLE"}  # all {}
    assert _states(server, "beta") == {1: "AVAILABLE"}  # specific { versions: 1 }
    assert _states(server, "gamma") == {2: "AVAILABLE"}  # latest, one version

    for path, version in (
        (f"{MODEL_NAME}/versions/1", 1),
        (MODEL_NAME, 2),  # Latest: the highest of the two
        ("beta", 1),
        ("gamma", 2),
    ):
        reference = expected[version](IMAGES)
        np.testing.assert_allclose(_rest_predict(server, path), reference, atol=PARITY)
    missing = httpx.get(f"{server.url}/v1/models/gamma/versions/1", timeout=10)
    assert (missing.status_code, missing.json()) == (
        404,
        {"error": "Could not find version 1 of model gamma"},
    )


# --- labels, moved without a restart -------------------------------------------------------------


def test_labels_follow_the_config_file_and_the_reload_rpc(
    server: Any, bases: Any, channel: grpc.Channel, expected: Any
) -> None:
    _, base, link = bases
    pid = server.process.pid
    unknown = httpx.get(f"{server.url}/v1/models/{MODEL_NAME}/labels/stable", timeout=10)
    assert (unknown.status_code, unknown.json()) == (
        400,
        {"error": "Unrecognized servable version label: stable"},
    )
    assert _label_version(server, "stable") is None

    # Labels added by editing the polled file.
    server.config.write_text(_models(base, link, {"stable": 1, "canary": 2}))
    _wait_for_label(server, "stable", 1)
    status = httpx.get(f"{server.url}/v1/models/{MODEL_NAME}/labels/stable", timeout=10).json()
    assert [s["version"] for s in status["model_version_status"]] == ["1"]
    np.testing.assert_allclose(
        _rest_predict(server, f"{MODEL_NAME}/labels/stable"), expected[1](IMAGES), atol=PARITY
    )
    version, probs = _grpc_predict(channel, MODEL_NAME, "canary")
    assert version == 2
    np.testing.assert_allclose(probs, expected[2](IMAGES), atol=PARITY)

    # Moved by editing the file again.
    server.config.write_text(_models(base, link, {"stable": 2, "canary": 2}))
    _wait_for_label(server, "stable", 2)
    version, probs = _grpc_predict(channel, MODEL_NAME, "stable")
    assert version == 2
    np.testing.assert_allclose(probs, expected[2](IMAGES), atol=PARITY)

    # Moved back by HandleReloadConfigRequest: in effect when the call returns.
    response = _reload(channel, _models(base, link, {"stable": 1, "canary": 2}))
    assert (response.status.error_code, response.status.error_message) == (0, "")
    assert _label_version(server, "stable") == 1
    time.sleep(2.5)  # a few polls of the unchanged file do not undo it
    version, probs = _grpc_predict(channel, MODEL_NAME, "stable")
    assert version == 1
    np.testing.assert_allclose(probs, expected[1](IMAGES), atol=PARITY)
    assert server.process.pid == pid and server.process.poll() is None  # never restarted


def test_the_gateway_backend_predicts_with_the_labelled_version(
    server: Any, bases: Any, channel: grpc.Channel, expected: Any
) -> None:
    from image_classifier.gateway import GatewaySettings
    from image_classifier.gateway.backends import TFServingBackend

    _, base, link = bases
    _reload(channel, _models(base, link, {"stable": 1, "canary": 2}))
    pixels = np.random.default_rng(8).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)

    async def ask(label: str, *, predict: bool = True) -> Any:
        settings = GatewaySettings(
            backend="tfserving", tf_serving_url=server.url, model_version_label=label
        )
        backend = TFServingBackend(settings)
        await backend.start()
        try:
            status = await backend.status()
            return status, (await backend.predict(pixels) if predict else None)
        finally:
            await backend.close()

    for label, version in (("stable", 1), ("canary", 2)):
        status, prediction = anyio.run(ask, label)
        assert (status.version, status.state) == (str(version), "AVAILABLE")
        assert prediction.model_version == str(version)
        reference = expected[version](pixels.astype(np.float32) / 255)
        np.testing.assert_allclose(prediction.probabilities, reference, atol=1e-5)
    status, _ = anyio.run(lambda: ask("nope", predict=False))
    assert (status.version, status.state) == (None, "NOT_FOUND")
    assert "Unrecognized servable version label: nope" in status.message


@pytest.mark.parametrize(
    ("labels", "code", "message"),
    [
        (
            {"beta": {"stable": 2}},  # version 2 of beta is not loaded (specific { versions: 1 })
            grpc.StatusCode.FAILED_PRECONDITION,
            "Request to assign label to version 2 of model beta, which is not currently "
            "available for inference",
        ),
    ],
)
def test_the_reload_rpc_refuses_a_label_on_a_version_not_available(
    server: Any,
    bases: Any,
    channel: grpc.Channel,
    labels: dict[str, dict[str, int]],
    code: grpc.StatusCode,
    message: str,
) -> None:
    _, base, link = bases
    _reload(channel, _models(base, link, {"stable": 1}))
    text = _config(
        {
            MODEL_NAME: (base, "    model_version_policy { all {} }\n", {"stable": 1}),
            "beta": (link, "    model_version_policy { specific { versions: 1 } }\n",
                     labels["beta"]),
            "gamma": (base, "", {}),
        }
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as caught:
        _reload(channel, text)
    assert (caught.value.code(), caught.value.details()) == (code, message)
    assert _label_version(server, "stable") == 1  # the refused config changed nothing


def test_the_reload_rpc_refuses_a_relative_base_path(server: Any, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _reload(channel, _config({"delta": (Path("models/delta"), "", {})}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "Expected model delta to have an absolute path or URI; got base_path()=models/delta"
    )
    assert _states(server, "gamma") == {2: "AVAILABLE"}


def test_a_label_at_startup_needs_allow_version_labels_for_unavailable_models(
    bases: Any, tmp_path: Path
) -> None:
    from image_classifier.model_server import ModelServerSettings
    from image_classifier.model_server._manager import check_startup_config

    _, base, _ = bases
    config = tmp_path / "labels.config"
    config.write_text(_config({MODEL_NAME: (base, "", {"stable": 1})}))
    # run_model_server calls this before anything binds or loads: nothing is available yet.
    with pytest.raises(ConfigError) as caught:
        check_startup_config(ModelServerSettings(model_config_file=config))
    assert str(caught.value).startswith(
        f"{config}: Request to assign label to version 1 of model image_classifier, which is "
        "not currently available for inference"
    )
    assert "--allow_version_labels_for_unavailable_models" in str(caught.value)
    allowed = ModelServerSettings(
        model_config_file=config, allow_version_labels_for_unavailable_models=True
    )
    check_startup_config(allowed)


# --- fast: the parsed config and the label rules --------------------------------------------


@pytest.mark.parametrize(
    ("policy", "on_disk", "aspired"),
    [
        ("", [1, 3, 7], [7]),
        ("model_version_policy { latest { num_versions: 2 } }", [1, 3, 7], [3, 7]),
        ("model_version_policy { latest { num_versions: 0 } }", [1, 3, 7], [7]),
        ("model_version_policy { all {} }", [1, 3, 7], [1, 3, 7]),
        ("model_version_policy { specific { versions: 3 versions: 9 } }", [1, 3, 7], [3]),
    ],
)
def test_version_policies_pick_tf_servings_versions(
    policy: str, on_disk: list[int], aspired: list[int]
) -> None:
    text = f"model_config_list {{ config {{ name: 'm' base_path: '/m' model_platform: 'tensorflow' {policy} }} }}"  # noqa: E501
    (entry,) = model_entries(parse_model_server_config(text))
    assert entry.policy.aspired(on_disk) == aspired


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model_config_list { config { name: 'm' base_path: '/a' model_platform: 'tensorflow' }"
            " config { name: 'm' base_path: '/b' model_platform: 'tensorflow' } }",
            "Illegal to list model m multiple times in config list",
        ),
        (
            "model_config_list { config { name: 'm' base_path: '/a' } }",
            "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
            "ModelServerConfig::model_platform, model name is m",
        ),
        (
            "model_config_list { config { name: 'm' base_path: '/a' model_platform: 'onnx' } }",
            "Model m requests unsupported platform onnx",
        ),
        ("custom_model_config { }", "ModelServer does not yet support custom model config."),
    ],
)
def test_configs_tf_serving_refuses_are_refused_in_its_words(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        model_entries(parse_model_server_config(text))
    assert str(caught.value) == message


class _Fake:
    def __init__(self, version: int) -> None:
        self.version = version


def _registry(root: Path, *, allow: bool) -> ModelRegistry:
    for version in (1, 2):
        (root / str(version)).mkdir(parents=True, exist_ok=True)

    def make(entry: ModelEntry) -> ModelManager:
        def loader(version_dir: Path) -> LoadedVersion:
            return cast(LoadedVersion, _Fake(int(version_dir.name)))

        return ModelManager(entry.name, entry.base_path, policy=entry.policy, loader=loader)

    return ModelRegistry(make, allow_version_labels_for_unavailable_models=allow)


def test_labels_may_name_only_available_versions_unless_allowed(tmp_path: Path) -> None:
    only_1 = VersionPolicy("specific", versions=frozenset({1}))
    strict = _registry(tmp_path, allow=False)
    with pytest.raises(ServingError) as caught:  # nothing is loaded before the first config
        strict.configure([ModelEntry("m", tmp_path, only_1, {"stable": 1})])
    assert caught.value.status == "FAILED_PRECONDITION"
    strict.configure([ModelEntry("m", tmp_path, only_1)])
    strict.configure([ModelEntry("m", tmp_path, only_1, {"stable": 1})])
    assert strict.servable("m", None, "stable").version == 1
    with pytest.raises(ServingError, match="version 2 of model m"):
        strict.configure([ModelEntry("m", tmp_path, only_1, {"stable": 2})])
    with pytest.raises(InvalidArgumentError, match="Unrecognized servable version label: x"):
        strict.servable("m", None, "x")

    lenient = _registry(tmp_path, allow=True)
    lenient.configure([ModelEntry("m", tmp_path, only_1, {"stable": 1, "next": 2})])
    assert lenient.labels("m") == {"next": 2, "stable": 1}
    # Still refused: moving an existing label onto a version that is not available.
    with pytest.raises(ServingError, match="version 2 of model m"):
        lenient.configure([ModelEntry("m", tmp_path, only_1, {"stable": 2, "next": 2})])


def test_a_reload_unloads_dropped_models_and_applies_new_policies(tmp_path: Path) -> None:
    registry = _registry(tmp_path, allow=False)
    registry.configure([ModelEntry("m", tmp_path), ModelEntry("n", tmp_path)])
    assert [s.version for s in registry.statuses("m")] == [2]
    registry.configure([ModelEntry("m", tmp_path, VersionPolicy("all"))])
    assert [(s.version, s.state) for s in registry.statuses("m")] == [
        (2, "AVAILABLE"),
        (1, "AVAILABLE"),
    ]
    with pytest.raises(NotFoundError, match=r"Latest\(n\)"):
        registry.servable("n", None)
