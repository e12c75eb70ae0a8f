"""What a hostile or broken client cannot do to either server.

Each test pins one defect that was found by attacking the running services: an input that
crashed the model server, a 500 that leaked exception text, a key checked only after a 16 MiB
body was read, connections held open by trickled headers or bodies, two dimension rules, decoded
pixels without a bound, and details a client should not see. The model server runs as a real
process; the gateway runs in-process over ASGI where the point is what it reads, and as a real
uvicorn server where the point is the socket.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from image_classifier.constants import MODEL_NAME, SERVING_BYTES
from image_classifier.gateway import GatewaySettings, build_server, create_app
from image_classifier.gateway.backends import LocalBackend
from servers import run_asgi, server_in_thread

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

PREDICT = f"/v1/models/{MODEL_NAME}:predict"
STATUS = f"/v1/models/{MODEL_NAME}"


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode("ascii")}


def _animated_webp() -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    return _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])


def _raw_exchange(port: int, payload: bytes, *, wait_s: float) -> tuple[bytes, float]:
    """Send ``payload`` on a fresh socket, then read until the server answers or closes.

    Returns what came back and how long after sending the socket went quiet or closed.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(payload)
        started = time.monotonic()
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received, time.monotonic() - started


# --- the model server, as a process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_export: Callable[..., Any],
    start_model_server: Callable[..., Any],
) -> Any:
    base = tmp_path_factory.mktemp("reliability") / MODEL_NAME
    tiny_export(base, version=1)
    return start_model_server(
        base, "--http_header_timeout_seconds", "1", "--http_body_timeout_seconds", "1"
    )


@pytest.fixture
def http(model_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=model_server.url, timeout=30) as client:
        yield client


@pytest.mark.slow
def test_an_animated_webp_is_refused_and_the_server_lives_on(
    model_server: Any, http: httpx.Client
) -> None:
    body = {"signature_name": SERVING_BYTES, "instances": [_b64(_animated_webp())]}

    response = http.post(PREDICT, json=body)

    assert response.status_code == 400, response.text
    assert "animated WebP" in response.json()["error"]
    assert model_server.process.poll() is None
    assert http.get(STATUS).status_code == 200


@pytest.mark.slow
def test_a_lone_surrogate_is_a_400_that_leaks_nothing(http: httpx.Client) -> None:
    raw = b'{"signature_name":"\\ud800","instances":[1]}'

    response = http.post(PREDICT, content=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "not found in signature def" in message
    assert "Internal" not in message and "Error:" not in message


@pytest.mark.slow
@pytest.mark.parametrize(("size", "words"), [((20_001, 1_000), "side"), ((2_100, 100), "aspect")])
def test_the_model_server_applies_the_gateways_dimension_rule(
    http: httpx.Client, size: tuple[int, int], words: str
) -> None:
    picture = _encode(Image.new("1", size), "PNG")
    body = {"signature_name": SERVING_BYTES, "instances": [_b64(picture)]}

    response = http.post(PREDICT, json=body)

    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


@pytest.mark.slow
def test_a_request_over_the_decoded_pixel_cap_is_refused_before_decoding(
    http: httpx.Client,
) -> None:
    # 60 blank megapixels, twice: a few kB on the wire, 120 MP (and gigabytes in-graph) decoded.
    canvas = _b64(_encode(Image.new("1", (6_000, 5_000)), "PNG"))
    body = {"signature_name": SERVING_BYTES, "instances": [canvas] * 4}

    response = http.post(PREDICT, json=body)

    assert response.status_code == 400, response.text
    assert "per request" in response.json()["error"]


@pytest.mark.slow
def test_model_server_answers_carry_nosniff_and_no_server_header(http: httpx.Client) -> None:
    for response in (http.get(STATUS), http.post(PREDICT, content=b"{")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "server" not in response.headers


@pytest.mark.slow
def test_the_model_server_closes_a_connection_whose_headers_trickle(model_server: Any) -> None:
    received, waited = _raw_exchange(
        model_server.port, f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\n".encode(), wait_s=10
    )

    assert received == b""  # closed without an answer: there was no complete request
    assert waited < 5  # the 1 s header timeout, not the 10 s this client would wait


@pytest.mark.slow
def test_the_model_server_answers_408_to_a_stalled_body(model_server: Any) -> None:
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    received, waited = _raw_exchange(model_server.port, head.encode() + b'{"instances"', wait_s=10)

    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"Connection: close" in received or b"connection: close" in received
    assert waited < 5


@pytest.mark.slow
def test_connections_beyond_the_cap_get_503(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_export: Callable[..., Any],
    start_model_server: Callable[..., Any],
) -> None:
    base = tmp_path_factory.mktemp("capped") / MODEL_NAME
    tiny_export(base, version=1)
    server = start_model_server(base, "--max_connections", "3")
    held = []
    try:
        for _ in range(3):  # three idle connections fill the cap
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.2)
        refused = httpx.get(f"{server.url}{STATUS}", timeout=10)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    accepted = httpx.get(f"{server.url}{STATUS}", timeout=10)
    server.stop()

    assert refused.status_code == 503
    assert accepted.status_code == 200


# --- the gateway: what it reads before it refuses ------------------------------------------------


@pytest.fixture
def local_app(gateway_model_base_path: Path, gateway_servable: Any) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        settings = GatewaySettings(
            backend="local", model_base_path=gateway_model_base_path, **overrides
        )
        backend = LocalBackend(settings, loader=lambda _path: gateway_servable)
        return create_app(settings, backend=backend)

    return make


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(
    local_app: Callable[..., Any],
) -> None:
    app = local_app(api_key="s3cret-key")
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    chunks = [head] + [b"\0" * 100_000] * 150  # 15 MB that must never be pulled
    headers = [
        (b"content-type", b"multipart/form-data; boundary=xyz"),
        (b"content-length", str(sum(map(len, chunks))).encode()),
    ]

    status, pulled = run_asgi(app, chunks, headers)
    keyed, keyed_pulled = run_asgi(
        app, [head + b"x\r\n--xyz--\r\n"], [*headers[:1], (b"x-api-key", b"s3cret-key")]
    )

    assert (status, pulled) == (401, 0)
    assert keyed == 400 and keyed_pulled == 1  # with the key, the body is read (and refused)


def test_images_over_the_per_request_pixel_cap_are_413_before_decoding(
    local_app: Callable[..., Any],
) -> None:
    canvas = _encode(Image.new("1", (7_000, 7_000)), "PNG")  # 49 MP, a few kB
    files = [("files", (f"blank{i}.png", canvas, "image/png")) for i in range(3)]
    with TestClient(local_app()) as client:
        response = client.post("/predict-images", files=files)
        one = client.post("/predict-images", files=files[:1])

    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_many_pixels"
    assert "GATEWAY_MAX_REQUEST_PIXELS" in response.json()["error"]["message"]
    assert one.status_code == 200


def test_gateway_answers_carry_nosniff(local_app: Callable[..., Any]) -> None:
    with TestClient(local_app()) as client:
        answers = [client.get("/health"), client.get("/nope"), client.post("/predict", json={})]

    assert [a.headers["x-content-type-options"] for a in answers] == ["nosniff"] * 3


def test_prediction_errors_name_no_backend_address_but_ready_does() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    settings = GatewaySettings(tf_serving_url="http://tf-serving.internal:8501")
    picture = ("a.png", _encode(Image.new("RGB", (8, 8)), "PNG"), "image/png")
    with TestClient(create_app(settings, transport=httpx.MockTransport(refuse))) as client:
        predict = client.post("/predict-image", files={"file": picture})
        ready = client.get("/ready")

    assert predict.status_code == 503
    public = predict.json()["error"]["message"]
    assert "tf-serving.internal" not in public and "Errno" not in public
    assert ready.status_code == 503
    assert "tf-serving.internal" in ready.json()["error"]["message"]


# --- the gateway: its sockets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_port(gateway_free_port: Callable[[], int]) -> Iterator[int]:
    """A real gateway server (our uvicorn config) with 1 s header and body timeouts.

    Its backend points at a port nothing listens on: these tests never reach the model.
    """
    port = gateway_free_port()
    settings = GatewaySettings(
        port=port,
        tf_serving_url=f"http://127.0.0.1:{gateway_free_port()}",
        header_timeout_s=1,
        body_timeout_s=1,
        log_level="warning",
    )
    with server_in_thread(build_server(settings)):
        yield port


def test_the_gateway_closes_a_connection_whose_headers_trickle(gateway_port: int) -> None:
    received, waited = _raw_exchange(
        gateway_port, b"POST /predict-image HTTP/1.1\r\nHost: x\r\n", wait_s=10
    )

    assert received == b""
    assert waited < 5


def test_the_gateway_answers_408_to_a_stalled_upload(gateway_port: int) -> None:
    head = (
        b"POST /predict-image HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n"
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    )
    received, waited = _raw_exchange(gateway_port, head, wait_s=10)

    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), received[:300]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"
    assert waited < 5


def test_the_gateway_sends_no_server_header(gateway_port: int) -> None:
    response = httpx.get(f"http://127.0.0.1:{gateway_port}/health", timeout=10)

    assert response.status_code == 200
    assert "server" not in response.headers


def test_a_refused_upload_is_counted_under_its_route(local_app: Callable[..., Any]) -> None:
    picture = ("a.png", b"\0" * 5_000, "image/png")
    with TestClient(local_app(max_upload_bytes=1_024)) as client:
        refused = client.post("/predict-image", files={"file": picture})
        metrics = client.get("/metrics").text

    assert refused.status_code == 413
    assert 'route="/predict-image",status="413"' in metrics.replace('method="POST",', "")
