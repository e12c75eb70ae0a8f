"""The gateway's routes, errors, auth, request ids and metrics, with the local backend.

The local backend runs the tiny session export in-process, so every answer can be compared with
the export's own ``serving_default`` output.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from image_classifier.constants import CIFAR10_CLASSES
from image_classifier.gateway import GatewaySettings, create_app
from image_classifier.gateway.backends import (
    Backend,
    BackendPrediction,
    LocalBackend,
    ModelCard,
    ModelStatus,
)
from image_classifier.gateway.errors import BackendTimeoutError, BackendUnavailableError
from servers import run_asgi

with warnings.catch_warnings():
    # Starlette nudges towards httpx2 on import; the TestClient works the same with httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

Pictures = dict[str, tuple[str, bytes, str]]


@pytest.fixture(scope="module")
def make_client(gateway_model_base_path: Path, gateway_servable: Any) -> Callable[..., Any]:
    """``with make_client(**settings) as client``: a TestClient on a fresh app (local backend,
    the session's already-loaded servable, so no reload per app)."""

    @contextmanager
    def make(backend: Backend | None = None, **overrides: Any) -> Iterator[TestClient]:
        settings = GatewaySettings(
            backend="local", model_base_path=gateway_model_base_path, **overrides
        )
        chosen = backend or LocalBackend(settings, loader=lambda _path: gateway_servable)
        with TestClient(create_app(settings, backend=chosen)) as client:
            yield client

    return make


@pytest.fixture(scope="module")
def client(make_client: Callable[..., Any]) -> Iterator[TestClient]:
    with make_client() as test_client:
        yield test_client


def upload(picture: tuple[str, bytes, str], field: str = "file") -> dict[str, Any]:
    return {field: picture}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return body["error"]


# --- predictions --------------------------------------------------------------------------------


def test_predict_image_returns_top_k_sorted_with_model_version(
    client: TestClient, gateway_pictures: Pictures
) -> None:
    response = client.post("/predict-image", files=upload(gateway_pictures["jpeg"]))

    assert response.status_code == 200
    body = response.json()
    assert body["filename"] == "photo.jpg"
    assert body["model_name"] == "image_classifier"
    assert body["model_version"] == "1"
    probabilities = [p["probability"] for p in body["predictions"]]
    assert len(probabilities) == 3
    assert probabilities == sorted(probabilities, reverse=True)
    for p in body["predictions"]:
        assert p["label"] == CIFAR10_CLASSES[p["class_index"]]


@pytest.mark.parametrize("name", ["jpeg", "png", "webp", "gray", "rgba", "large"])
def test_predict_image_probabilities_equal_the_export_signature(
    client: TestClient,
    gateway_pictures: Pictures,
    gateway_expected: Callable[[bytes], np.ndarray],
    name: str,
) -> None:
    picture = gateway_pictures[name]
    response = client.post("/predict-image?top_k=10", files=upload(picture))

    assert response.status_code == 200, response.text
    expected = gateway_expected(picture[1])
    got = np.zeros(10, dtype=np.float64)
    for p in response.json()["predictions"]:
        got[p["class_index"]] = p["probability"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_top_k_comes_from_query_form_or_settings(
    make_client: Callable[..., Any], gateway_pictures: Pictures
) -> None:
    picture = gateway_pictures["png"]
    with make_client(default_top_k=5) as client:
        default = client.post("/predict-image", files=upload(picture)).json()
        query = client.post("/predict-image?top_k=1", files=upload(picture)).json()
        form = client.post("/predict-image", files=upload(picture), data={"top_k": "10"}).json()

    assert len(default["predictions"]) == 5
    assert len(query["predictions"]) == 1
    assert len(form["predictions"]) == 10


def test_predict_images_answers_each_file_in_order_and_isolates_bad_ones(
    client: TestClient,
    gateway_pictures: Pictures,
    gateway_expected: Callable[[bytes], np.ndarray],
) -> None:
    files = [
        ("files", gateway_pictures["png"]),
        ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "image/png")),
        ("files", gateway_pictures["gray"]),
    ]
    response = client.post("/predict-images", files=files)

    assert response.status_code == 200
    body = response.json()
    results = body["results"]
    assert [r["filename"] for r in results] == ["image.png", "notes.txt", "broken.png", "gray.png"]
    assert results[1]["error"]["code"] == "unsupported_media_type"
    assert results[2]["error"]["code"] in {"not_an_image", "truncated_image"}
    assert results[1]["predictions"] is None and results[2]["predictions"] is None
    for index, key in ((0, "png"), (3, "gray")):
        assert results[index]["error"] is None
        top = results[index]["predictions"][0]
        expected = gateway_expected(gateway_pictures[key][1])
        assert top["class_index"] == int(np.argmax(expected))
        assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert body["model_version"] == "1"


def test_predict_images_with_only_bad_files_reports_them_without_a_model_call(
    client: TestClient,
) -> None:
    response = client.post("/predict-images", files=[("files", ("a.png", b"nope", "image/png"))])

    assert response.status_code == 200
    body = response.json()
    assert body["results"][0]["error"]["code"] == "not_an_image"
    assert body["model_version"] is None


def test_predict_json_base64_matches_multipart(
    client: TestClient, gateway_pictures: Pictures
) -> None:
    _, data, _ = gateway_pictures["webp"]
    encoded = base64.b64encode(data).decode()
    response = client.post(
        "/predict",
        json={
            "images": [
                {"data": encoded, "filename": "a.webp"},
                {"data": "data:image/webp;base64," + encoded},
                {"data": "not base64!"},
            ],
            "top_k": 2,
        },
    )
    multipart = client.post("/predict-image?top_k=2", files=upload(gateway_pictures["webp"]))

    assert response.status_code == 200
    results = response.json()["results"]
    assert results[0]["filename"] == "a.webp"
    assert results[0]["predictions"] == multipart.json()["predictions"]
    assert results[1]["predictions"] == multipart.json()["predictions"]
    assert results[2]["error"]["code"] == "invalid_base64"


def test_predict_json_takes_tf_serving_bodies(
    client: TestClient, gateway_pictures: Pictures
) -> None:
    # What a TF Serving client of the serving_bytes signature already sends, unchanged.
    pictures = [gateway_pictures["png"], gateway_pictures["jpeg"]]
    encoded = [base64.b64encode(data).decode() for _, data, _ in pictures]
    bare = client.post(
        "/predict",
        json={"signature_name": "serving_bytes", "instances": [{"b64": e} for e in encoded]},
    )
    named = client.post(
        "/predict", json={"instances": [{"image_bytes": {"b64": e}} for e in encoded]}
    )
    b64_images = client.post("/predict", json={"images": [{"b64": e} for e in encoded]})
    multipart = client.post("/predict-images", files=[("files", p) for p in pictures])

    expected = [r["predictions"] for r in multipart.json()["results"]]
    for response in (bare, named, b64_images):
        assert response.status_code == 200, response.text
        assert [r["predictions"] for r in response.json()["results"]] == expected


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "exactly one of `images`"),
        ({"images": [{"data": "aGk="}], "instances": [{"b64": "aGk="}]}, "exactly one of"),
        ({"instances": [{"pixels": {"b64": "aGk="}}]}, "image_bytes"),
        ({"images": [{"data": "aGk=", "b64": "aGk="}]}, "exactly one of `data` or `b64`"),
        ({"instances": []}, "at least 1"),
    ],
)
def test_predict_json_explains_a_malformed_body(
    client: TestClient, body: dict[str, Any], words: str
) -> None:
    error = assert_error(client.post("/predict", json=body), 422, "validation_error")
    assert words in str(error)


def test_openapi_shows_both_predict_json_spellings(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
    examples = schema["examples"]
    assert any("images" in e for e in examples)
    assert any("instances" in e for e in examples)


def test_classes_lists_labels_in_output_order(client: TestClient) -> None:
    response = client.get("/classes")

    assert response.status_code == 200
    classes = response.json()["classes"]
    assert [c["label"] for c in classes] == list(CIFAR10_CLASSES)
    assert [c["class_index"] for c in classes] == list(range(10))


def test_model_shows_version_contract_signatures_and_card(client: TestClient) -> None:
    body = client.get("/model").json()

    assert body["name"] == "image_classifier"
    assert body["version"] == "1"
    assert body["state"] == "AVAILABLE"
    assert body["backend"] == "local"
    assert body["input"]["model_input"]["shape"] == [-1, 32, 32, 3]
    assert body["input"]["max_upload_bytes"] == GatewaySettings().max_upload_bytes
    images = body["signatures"]["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    assert body["card"]["class_names"] == list(CIFAR10_CLASSES)
    assert body["card"]["model_config"]["tcn_filters"] == 16
    assert body["card_source"].endswith("/1")


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["model_version"] == "1"


# --- errors -------------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb's header."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _truncated_jpeg(gateway_pictures: Pictures) -> bytes:
    data = gateway_pictures["jpeg"][1]
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "empty_image"),
        (b"this is plain text, not a picture", "not_an_image"),
        (b"GIF89a", "not_an_image"),
        ("truncated", "truncated_image"),
        (_png_claiming(20_000, 20_000), "image_too_large"),
        (_png_claiming(20_000, 10), "invalid_dimensions"),
    ],
)
def test_invalid_image_content_is_400_with_its_code(
    client: TestClient, gateway_pictures: Pictures, content: Any, code: str
) -> None:
    data = _truncated_jpeg(gateway_pictures) if content == "truncated" else content
    response = client.post("/predict-image", files={"file": ("x.png", data, "image/png")})

    assert_error(response, 400, code)


def test_pixel_limit_setting_refuses_a_real_image(
    make_client: Callable[..., Any], gateway_pictures: Pictures
) -> None:
    with make_client(max_image_pixels=1024) as client:
        response = client.post("/predict-image", files=upload(gateway_pictures["jpeg"]))

    assert_error(response, 400, "image_too_large")


def test_garbage_never_gives_a_500(client: TestClient, gateway_pictures: Pictures) -> None:
    rng = np.random.default_rng(0)
    png = gateway_pictures["png"][1]
    samples = [rng.bytes(n) for n in (1, 10, 100, 5000)]
    samples += [png[:cut] for cut in (8, 16, 33, 50, len(png) - 12, len(png) - 1)]
    samples += [png[:40] + rng.bytes(200) + png[240:]]
    for data in samples:
        response = client.post("/predict-image", files={"file": ("g.png", data, "image/png")})
        # A PNG missing only its end marker still decodes; anything else must be refused.
        assert response.status_code in (200, 400), (len(data), response.text)
        if response.status_code == 400:
            assert response.json()["error"]["code"].endswith(("_image", "_dimensions"))


def test_missing_file_field_is_422(client: TestClient, gateway_pictures: Pictures) -> None:
    response = client.post("/predict-image", files=upload(gateway_pictures["png"], "picture"))

    error = assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"] == "body.file"


@pytest.mark.parametrize("top_k", ["0", "11", "three"])
def test_top_k_out_of_range_is_422(
    client: TestClient, gateway_pictures: Pictures, top_k: str
) -> None:
    response = client.post(f"/predict-image?top_k={top_k}", files=upload(gateway_pictures["png"]))

    assert_error(response, 422, "validation_error")


def test_json_body_to_a_multipart_route_is_415(client: TestClient) -> None:
    assert_error(client.post("/predict-image", json={"file": "x"}), 415, "unsupported_media_type")
    assert_error(client.post("/predict-images", content=b"raw"), 415, "unsupported_media_type")


def test_a_file_declared_as_text_is_415(client: TestClient) -> None:
    response = client.post("/predict-image", files={"file": ("a.txt", b"hi", "text/plain")})

    assert_error(response, 415, "unsupported_media_type")


def test_multipart_to_the_json_route_is_415(client: TestClient, gateway_pictures: Pictures) -> None:
    response = client.post("/predict", files=upload(gateway_pictures["png"]))

    assert_error(response, 415, "unsupported_media_type")


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/predict", content=b"{not json", headers={"Content-Type": "application/json"}
    )

    assert_error(response, 422, "validation_error")


def test_too_many_images_is_413(
    make_client: Callable[..., Any], gateway_pictures: Pictures
) -> None:
    with make_client(max_images_per_request=2) as client:
        files = [("files", gateway_pictures["png"])] * 3
        multipart = client.post("/predict-images", files=files)
        data = base64.b64encode(gateway_pictures["png"][1]).decode()
        json_route = client.post("/predict", json={"images": [{"data": data}] * 3})

    assert_error(multipart, 413, "too_many_images")
    assert_error(json_route, 413, "too_many_images")


def test_upload_over_the_limit_is_413(
    make_client: Callable[..., Any], gateway_pictures: Pictures
) -> None:
    with make_client(max_upload_bytes=100_000) as client:
        response = client.post("/predict-image", files=upload(gateway_pictures["large"]))
        small = client.post("/predict-image", files=upload(gateway_pictures["png"]))

    error = assert_error(response, 413, "payload_too_large")
    assert "100,000" in error["message"]
    assert small.status_code == 200


def test_api_key_is_required_when_configured(
    make_client: Callable[..., Any], gateway_pictures: Pictures
) -> None:
    picture = upload(gateway_pictures["png"])
    with make_client(api_key="s3cret-key") as client:
        missing = client.post("/predict-image", files=picture)
        wrong = client.post("/predict-image", files=picture, headers={"X-API-Key": "guess"})
        good = client.post("/predict-image", files=picture, headers={"X-API-Key": "s3cret-key"})
        bearer = client.get("/classes", headers={"Authorization": "Bearer s3cret-key"})
        model = client.get("/model")
        open_routes = [
            client.get(path).status_code for path in ("/health", "/ready", "/", "/metrics")
        ]

    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"]
    assert_error(wrong, 401, "unauthorized")
    assert good.status_code == 200
    assert bearer.status_code == 200
    assert_error(model, 401, "unauthorized")
    assert open_routes == [200, 200, 200, 200]


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/predict-image"), 405, "method_not_allowed")


# --- body limit at the ASGI level ----------------------------------------------------------------


def test_streamed_upload_is_cut_off_at_the_limit_not_read_to_the_end(
    gateway_model_base_path: Path, gateway_servable: Any
) -> None:
    settings = GatewaySettings(
        backend="local", model_base_path=gateway_model_base_path, max_upload_bytes=50_000
    )
    app = create_app(settings, backend=LocalBackend(settings, lambda _p: gateway_servable))
    boundary = b"xyz"
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    chunks = [head] + [b"\0" * 10_000] * 100  # 1 MB announced by nobody (chunked)
    headers = [(b"content-type", b"multipart/form-data; boundary=" + boundary)]

    status, pulled = run_asgi(app, chunks, headers)

    assert status == 413
    assert pulled <= 7  # 50 kB / 10 kB, plus the head: the other 94 chunks were never read


def test_declared_content_length_over_the_limit_is_refused_before_reading(
    gateway_model_base_path: Path, gateway_servable: Any
) -> None:
    settings = GatewaySettings(
        backend="local", model_base_path=gateway_model_base_path, max_upload_bytes=50_000
    )
    app = create_app(settings, backend=LocalBackend(settings, lambda _p: gateway_servable))
    headers = [
        (b"content-type", b"multipart/form-data; boundary=xyz"),
        (b"content-length", b"10000000"),
    ]

    status, pulled = run_asgi(app, [b"\0" * 10_000] * 3, headers)

    assert (status, pulled) == (413, 0)


# --- backend failures ---------------------------------------------------------------------------


class FakeBackend(Backend):
    """A backend that fails (or reports a state) on demand."""

    kind = "tfserving"

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        error: Exception | None = None,
        state: str = "AVAILABLE",
    ) -> None:
        super().__init__(settings)
        self.error = error
        self.state = state

    async def status(self) -> ModelStatus:
        if self.error is not None:
            raise self.error
        return ModelStatus(self.model_name, "7", self.state)

    async def predict(self, images: np.ndarray) -> BackendPrediction:
        if self.error is not None:
            raise self.error
        return BackendPrediction(np.full((len(images), 10), 0.1, np.float32), "7")

    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        return None

    def class_names(self, version: str | None) -> tuple[str, ...]:
        return tuple(CIFAR10_CLASSES)

    def model_card(self, version: str | None) -> ModelCard:
        return ModelCard(None, None)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (BackendUnavailableError("TF Serving is unreachable"), 503, "backend_unavailable"),
        (BackendTimeoutError("TF Serving did not answer"), 504, "backend_timeout"),
        (RuntimeError("a bug with a secret path /etc/x"), 500, "internal_error"),
    ],
)
def test_backend_failures_map_to_503_504_and_bugs_to_a_json_500(
    make_client: Callable[..., Any],
    gateway_pictures: Pictures,
    error: Exception,
    status: int,
    code: str,
) -> None:
    backend = FakeBackend(GatewaySettings(), error=error)
    with make_client(backend=backend) as client:
        response = client.post("/predict-image", files=upload(gateway_pictures["png"]))
        ready = client.get("/ready")

    body = assert_error(response, status, code)
    assert "/etc/x" not in body["message"]  # internals stay in the log
    assert ready.status_code == status
    if status == 503:
        assert response.headers["retry-after"]


def test_local_model_slower_than_the_timeout_is_504(
    gateway_model_base_path: Path, gateway_servable: Any, gateway_pictures: Pictures
) -> None:
    import time

    class SlowServable:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def predict(self, images: np.ndarray) -> np.ndarray:
            time.sleep(1.0)
            return self.inner.predict(images)

    settings = GatewaySettings(
        backend="local",
        model_base_path=gateway_model_base_path,
        request_timeout_s=0.2,
        connect_timeout_s=0.1,
    )
    backend = LocalBackend(settings, loader=lambda _p: SlowServable(gateway_servable))
    with TestClient(create_app(settings, backend=backend)) as client:
        started = time.monotonic()
        response = client.post("/predict-image", files=upload(gateway_pictures["png"]))
        elapsed = time.monotonic() - started

    assert_error(response, 504, "backend_timeout")
    assert elapsed < 0.9  # answered at the timeout, not when the model finished


def test_ready_is_503_until_the_model_is_available(make_client: Callable[..., Any]) -> None:
    with make_client(backend=FakeBackend(GatewaySettings(), state="LOADING")) as client:
        response = client.get("/ready")
        health = client.get("/health")

    error = assert_error(response, 503, "model_unavailable")
    assert "LOADING" in error["message"]
    assert health.status_code == 200


# --- request ids, CORS, metrics, docs, page -------------------------------------------------------


def test_request_id_is_made_kept_or_replaced_when_unsafe(client: TestClient) -> None:
    made = client.get("/health").headers["x-request-id"]
    kept = client.get("/health", headers={"X-Request-ID": "trace-42.a"}).headers["x-request-id"]
    unsafe = client.get("/health", headers={"X-Request-ID": "a b\tc"}).headers["x-request-id"]
    on_error = client.get("/nope", headers={"X-Request-ID": "err-1"})

    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert kept == "trace-42.a"
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe)
    assert on_error.headers["x-request-id"] == "err-1"
    assert on_error.json()["error"]["request_id"] == "err-1"


def test_request_id_is_in_the_access_log(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="image_classifier.gateway.access"):
        client.get("/classes", headers={"X-Request-ID": "log-me-123"})

    lines = [r for r in caplog.records if r.name == "image_classifier.gateway.access"]
    assert lines, "no access log line"
    assert lines[-1].request_id == "log-me-123"  # type: ignore[attr-defined]
    assert '"GET /classes" 200' in lines[-1].getMessage()


def test_log_records_inside_a_request_carry_its_id(
    make_client: Callable[..., Any], gateway_pictures: Pictures
) -> None:
    import logging

    from image_classifier.gateway.context import RequestIdLogFilter

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    handler.addFilter(RequestIdLogFilter())
    logger = logging.getLogger("image_classifier.gateway")
    logger.addHandler(handler)
    try:
        backend = FakeBackend(GatewaySettings(), error=BackendUnavailableError("down"))
        with make_client(backend=backend) as client:
            client.post(
                "/predict-image",
                files=upload(gateway_pictures["png"]),
                headers={"X-Request-ID": "req-77"},
            )
    finally:
        logger.removeHandler(handler)

    warning = [r for r in seen if r.name == "image_classifier.gateway" and "down" in r.getMessage()]
    assert warning and warning[0].request_id == "req-77"  # type: ignore[attr-defined]


def test_cors_allows_only_configured_origins(make_client: Callable[..., Any]) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    with make_client(cors_origins="https://app.example.com") as client:
        allowed = client.options(
            "/predict-image", headers={"Origin": "https://app.example.com", **preflight}
        )
        denied = client.options(
            "/predict-image", headers={"Origin": "https://evil.example", **preflight}
        )

    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-origin" not in denied.headers


def test_metrics_count_requests_latency_backend_and_images(
    make_client: Callable[..., Any], gateway_pictures: Pictures
) -> None:
    with make_client() as client:
        client.post("/predict-image", files=upload(gateway_pictures["png"]))
        client.post("/predict-image", files={"file": ("x.png", b"nope", "image/png")})
        text = client.get("/metrics").text
    with make_client() as other:  # a second app in the same process: its own registry
        other_text = other.get("/metrics").text

    assert (
        'gateway_http_requests_total{method="POST",route="/predict-image",status="200"} 1.0' in text
    )
    assert (
        'gateway_http_requests_total{method="POST",route="/predict-image",status="400"} 1.0' in text
    )
    assert "gateway_http_request_duration_seconds_bucket{" in text
    assert (
        'gateway_backend_request_duration_seconds_count{backend="local",operation="predict"} 1.0'
        in text
    )
    assert 'gateway_images_rejected_total{code="not_an_image"} 1.0' in text
    assert re.search(r'gateway_images_classified_total\{label="\w+"\} 1\.0', text)
    assert "gateway_top1_probability_count 1.0" in text
    assert 'gateway_top1_probability_bucket{le="1.0"} 1.0' in text
    assert "gateway_http_requests_in_flight" in text
    assert 'route="/predict-image"' not in other_text


def test_openapi_documents_every_route_with_typed_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]

    for path in (
        "/predict-image",
        "/predict-images",
        "/predict",
        "/classes",
        "/model",
        "/health",
        "/ready",
    ):
        operation = next(iter(paths[path].values()))
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, path
    assert "413" in paths["/predict-image"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


def test_web_page_is_self_contained(client: TestClient) -> None:
    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'type="file"' in page
    # Nothing loaded from elsewhere: works offline and under the page's CSP.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page


def test_the_web_page_is_declared_as_package_data() -> None:
    # Tests run from the source tree, where the page is always there; an installed wheel (the
    # gateway Docker image) has it only if setuptools is told to ship it.
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    package_data = config["tool"]["setuptools"].get("package-data", {})
    patterns = [
        f"{package.replace('.', '/')}/{glob}"
        for package, globs in package_data.items()
        for glob in globs
    ]

    page = "image_classifier/gateway/static/index.html"
    assert any(fnmatch.fnmatch(page, pattern) for pattern in patterns), patterns
