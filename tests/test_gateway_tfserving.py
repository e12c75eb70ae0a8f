"""The tfserving backend: TF Serving's REST protocol, its failures, and a real model server.

Protocol and failure handling use ``httpx.MockTransport`` (a real transport, scripted); parity,
metadata and version swaps use the embedded model server started as a subprocess, the same
server ``image-classifier serve`` runs.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from image_classifier.gateway import GatewaySettings, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's "install httpx2" notice
    from fastapi.testclient import TestClient

Pictures = dict[str, tuple[str, bytes, str]]
Handler = Callable[[httpx.Request], httpx.Response]

STATUS_PATH = "/v1/models/image_classifier"


def status_body(*entries: tuple[str, str]) -> dict[str, Any]:
    return {
        "model_version_status": [
            {"version": v, "state": s, "status": {"error_code": "OK", "error_message": ""}}
            for v, s in entries
        ]
    }


@contextmanager
def mocked_gateway(handler: Handler, **overrides: Any) -> Iterator[TestClient]:
    settings = GatewaySettings(tf_serving_url="http://tf-serving.test:8501", **overrides)
    app = create_app(settings, transport=httpx.MockTransport(handler))
    with TestClient(app) as client:
        yield client


class ScriptedServing:
    """A TF Serving stand-in: version 3 AVAILABLE, uniform predictions, every call recorded."""

    def __init__(self) -> None:
        self.calls: list[httpx.Request] = []
        self.predict_failures: list[Exception | httpx.Response] = []
        self.status: dict[str, Any] = status_body(("3", "AVAILABLE"))
        self.num_classes = 10

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        if request.url.path.endswith(":predict"):
            if self.predict_failures:
                failure = self.predict_failures.pop(0)
                if isinstance(failure, Exception):
                    raise failure
                return failure
            n = len(json.loads(request.content)["instances"])
            row = [1.0 / self.num_classes] * self.num_classes
            return httpx.Response(200, json={"predictions": [row] * n})
        if request.url.path.endswith("/metadata"):
            return httpx.Response(
                200,
                json={
                    "metadata": {
                        "signature_def": {
                            "signature_def": {"serving_default": {"inputs": {}, "outputs": {}}}
                        }
                    }
                },
            )
        return httpx.Response(200, json=self.status)

    def paths(self) -> list[str]:
        return [c.url.path for c in self.calls]


@pytest.fixture
def serving() -> ScriptedServing:
    return ScriptedServing()


# --- protocol, with a scripted TF Serving --------------------------------------------------------


def test_predict_sends_preprocessed_floats_pinned_to_the_served_version(
    serving: ScriptedServing, gateway_pictures: Pictures
) -> None:
    from image_classifier.preprocess import preprocess_image

    picture = gateway_pictures["jpeg"]
    with mocked_gateway(serving) as client:
        response = client.post("/predict-image", files={"file": picture})

    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "3"
    predict = next(c for c in serving.calls if c.url.path.endswith(":predict"))
    assert predict.url.path == "/v1/models/image_classifier/versions/3:predict"
    body = json.loads(predict.content)
    assert body["signature_name"] == "serving_default"
    sent = np.asarray(body["instances"], dtype=np.float32)
    np.testing.assert_array_equal(sent, preprocess_image(picture[1])[None])


def test_status_is_reused_within_its_ttl(
    serving: ScriptedServing, gateway_pictures: Pictures
) -> None:
    with mocked_gateway(serving, model_status_ttl_s=60) as client:
        for _ in range(3):
            client.post("/predict-image", files={"file": gateway_pictures["png"]})

    assert serving.paths().count(STATUS_PATH) == 1
    assert sum(p.endswith(":predict") for p in serving.paths()) == 3


def test_a_dropped_connection_is_retried_once(
    serving: ScriptedServing, gateway_pictures: Pictures
) -> None:
    serving.predict_failures = [httpx.RemoteProtocolError("Server disconnected")]
    with mocked_gateway(serving) as client:
        response = client.post("/predict-image", files={"file": gateway_pictures["png"]})

    assert response.status_code == 200
    assert sum(p.endswith(":predict") for p in serving.paths()) == 2


def test_backend_down_is_503_after_one_retry(
    serving: ScriptedServing, gateway_pictures: Pictures
) -> None:
    serving.predict_failures = [httpx.ConnectError("refused"), httpx.ConnectError("refused")]
    with mocked_gateway(serving) as client:
        response = client.post("/predict-image", files={"file": gateway_pictures["png"]})
        metrics = client.get("/metrics").text

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "backend_unavailable"
    assert sum(p.endswith(":predict") for p in serving.paths()) == 2
    assert (
        'gateway_backend_errors_total{backend="tfserving",code="backend_unavailable",'
        'operation="predict"} 1.0' in metrics
    )


def test_backend_timeout_is_504(serving: ScriptedServing, gateway_pictures: Pictures) -> None:
    serving.predict_failures = [httpx.ReadTimeout("slow")]
    with mocked_gateway(serving) as client:
        response = client.post("/predict-image", files={"file": gateway_pictures["png"]})

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "backend_timeout"
    assert sum(p.endswith(":predict") for p in serving.paths()) == 1  # a timeout is not retried


def test_unreachable_backend_makes_ready_503(gateway_pictures: Pictures) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    with mocked_gateway(refuse) as client:
        ready = client.get("/ready")
        health = client.get("/health")

    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "backend_unavailable"
    assert health.status_code == 200


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (status_body(("1", "LOADING")), "LOADING"),
        (status_body(("1", "END")), "END"),
    ],
)
def test_ready_needs_state_available(
    serving: ScriptedServing, status: dict[str, Any], state: str
) -> None:
    serving.status = status
    with mocked_gateway(serving) as client:
        response = client.get("/ready")

    assert response.status_code == 503
    assert state in response.json()["error"]["message"]


def test_ready_reports_the_highest_available_version(serving: ScriptedServing) -> None:
    serving.status = status_body(("2", "AVAILABLE"), ("4", "LOADING"), ("3", "AVAILABLE"))
    with mocked_gateway(serving) as client:
        body = client.get("/ready").json()

    assert body["model_version"] == "3"


def test_unknown_model_is_503(gateway_pictures: Pictures) -> None:
    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "Servable not found for request: Latest(x)"})

    with mocked_gateway(not_found) as client:
        ready = client.get("/ready")
        predict = client.post("/predict-image", files={"file": gateway_pictures["png"]})

    assert ready.status_code == 503
    assert "Servable not found" in ready.json()["error"]["message"]
    assert predict.status_code == 503
    assert predict.json()["error"]["code"] == "model_unavailable"


def test_an_unloaded_version_is_looked_up_again(
    serving: ScriptedServing, gateway_pictures: Pictures
) -> None:
    def swap_then_404(request: httpx.Request) -> httpx.Response:
        serving.status = status_body(("4", "AVAILABLE"))
        return httpx.Response(404, json={"error": "Servable not found: version 3"})

    serving.predict_failures = [swap_then_404]  # type: ignore[list-item]
    original = serving.__call__

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(":predict") and serving.predict_failures:
            serving.calls.append(request)
            return serving.predict_failures.pop(0)(request)  # type: ignore[operator]
        return original(request)

    with mocked_gateway(handler, model_status_ttl_s=60) as client:
        response = client.post("/predict-image", files={"file": gateway_pictures["png"]})

    assert response.status_code == 200
    assert response.json()["model_version"] == "4"
    predicts = [p for p in serving.paths() if p.endswith(":predict")]
    assert predicts == [
        "/v1/models/image_classifier/versions/3:predict",
        "/v1/models/image_classifier/versions/4:predict",
    ]


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        (httpx.Response(400, json={"error": "Expects arg[0] to be float"}), 502, "backend_error"),
        (httpx.Response(500, json={"error": "boom"}), 502, "backend_error"),
        (httpx.Response(503, json={"error": "overloaded"}), 503, "model_unavailable"),
        (httpx.Response(504, json={"error": "deadline"}), 504, "backend_timeout"),
        (httpx.Response(200, text="<html>proxy error</html>"), 502, "backend_error"),
        (httpx.Response(200, json={"outputs": []}), 502, "backend_error"),
        (httpx.Response(200, json={"predictions": [[0.5, 0.5]]}), 502, "backend_error"),
    ],
)
def test_backend_answers_map_to_gateway_statuses(
    serving: ScriptedServing,
    gateway_pictures: Pictures,
    answer: httpx.Response,
    status: int,
    code: str,
) -> None:
    serving.predict_failures = [answer]
    with mocked_gateway(serving) as client:
        response = client.post("/predict-image", files={"file": gateway_pictures["png"]})

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


# --- a real embedded model server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served_base_path(
    gateway_model_base_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the session export this module may add versions to."""
    base = tmp_path_factory.mktemp("served") / "image_classifier"
    shutil.copytree(gateway_model_base_path, base)
    return base


@pytest.fixture(scope="module")
def model_server(served_base_path: Path, start_model_server: Callable[..., Any]) -> Iterator[str]:
    server = start_model_server(served_base_path, "--log_level", "warning")
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def real_client(model_server: str, served_base_path: Path) -> Iterator[TestClient]:
    settings = GatewaySettings(
        tf_serving_url=model_server, model_card_path=served_base_path, model_status_ttl_s=0.2
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("name", ["jpeg", "png", "webp", "gray", "rgba", "large"])
def test_real_server_probabilities_equal_the_export_signature(
    real_client: TestClient,
    gateway_pictures: Pictures,
    gateway_expected: Callable[[bytes], np.ndarray],
    name: str,
) -> None:
    picture = gateway_pictures[name]
    response = real_client.post("/predict-image?top_k=10", files={"file": picture})

    assert response.status_code == 200, response.text
    got = np.zeros(10)
    for p in response.json()["predictions"]:
        got[p["class_index"]] = p["probability"]
    np.testing.assert_allclose(got, gateway_expected(picture[1]), atol=1e-5)


def test_real_server_batch_and_model_info(
    real_client: TestClient,
    gateway_pictures: Pictures,
    gateway_expected: Callable[[bytes], np.ndarray],
) -> None:
    names = ["png", "gray", "rgba"]
    files = [("files", gateway_pictures[n]) for n in names]
    batch = real_client.post("/predict-images?top_k=1", files=files).json()
    info = real_client.get("/model").json()
    ready = real_client.get("/ready").json()

    for name, result in zip(names, batch["results"], strict=True):
        assert result["predictions"][0]["class_index"] == int(
            np.argmax(gateway_expected(gateway_pictures[name][1]))
        )
    assert info["backend"] == "tfserving"
    assert info["state"] == "AVAILABLE"
    inputs = info["signatures"]["serving_default"]["inputs"]
    assert inputs["images"]["dtype"] == "DT_FLOAT"
    assert info["card"]["model_config"]["tcn_filters"] == 16
    assert ready["model_version"] == info["version"]


def test_real_server_new_version_is_picked_up_without_a_gateway_restart(
    real_client: TestClient, served_base_path: Path, gateway_pictures: Pictures
) -> None:
    before = real_client.post("/predict-image", files={"file": gateway_pictures["png"]}).json()
    newest = max(int(p.name) for p in served_base_path.iterdir() if p.name.isdigit())
    staging = served_base_path / ".tmp-copy"
    shutil.copytree(served_base_path / str(newest), staging)
    staging.rename(served_base_path / str(newest + 1))  # atomic, as export_model does

    deadline = time.monotonic() + 60
    after = before
    while time.monotonic() < deadline and after["model_version"] != str(newest + 1):
        time.sleep(0.3)
        after = real_client.post("/predict-image", files={"file": gateway_pictures["png"]}).json()

    assert after["model_version"] == str(newest + 1)
    assert after["predictions"] == before["predictions"]  # the same weights
    card = real_client.get("/model").json()
    assert card["card_source"].endswith(f"/{newest + 1}")


def test_a_dead_backend_is_not_asked_again_by_every_queued_request(
    gateway_pictures: Pictures,
) -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("Connection refused")

    with mocked_gateway(refuse) as client:
        answers = [
            client.post("/predict-image", files={"file": gateway_pictures["png"]}) for _ in range(3)
        ]

    assert [a.status_code for a in answers] == [503, 503, 503]
    assert calls == [STATUS_PATH, STATUS_PATH]  # one status call and its retry, then reused


def test_a_successful_status_answer_clears_a_recorded_failure(
    gateway_pictures: Pictures,
) -> None:
    # A load balancer polls /ready while the model server restarts: once /ready says 200,
    # predictions must succeed at once, not keep replaying the failure seen while it was down.
    serving = ScriptedServing()
    down = True

    def handler(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("Connection refused")
        return serving(request)

    with mocked_gateway(handler) as client:
        before = client.post("/predict-image", files={"file": gateway_pictures["png"]})
        down = False
        ready = client.get("/ready")
        after = client.post("/predict-image", files={"file": gateway_pictures["png"]})

    assert before.status_code == 503
    assert ready.status_code == 200
    assert after.status_code == 200, after.text
    assert after.json()["model_version"] == "3"
