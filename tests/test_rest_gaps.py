"""The model server's REST API where TF Serving's own behaviour is easy to miss.

JSON conformance (``NaN``/``Infinity`` in and out, a float literal beyond float32 taken as
infinity), gzip request bodies (and the decompressed-size limit that stops a gzip bomb),
``--rest_api_enable_cors_support`` and ``--rest_api_timeout_in_ms``. One real server process
serves a tiny SavedModel built here, whose outputs can be non-finite (``1 / x``) and whose
``slow`` signature sleeps, so the timeout has something to cut short.
"""

from __future__ import annotations

import gzip
import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from image_classifier.constants import CLASS_NAMES_ASSET, MODEL_NAME

# Each module starts one real model server process.
pytestmark = pytest.mark.slow

PREDICT = f"/v1/models/{MODEL_NAME}:predict"
MAX_REQUEST_BYTES = 1_000_000  # small, so the over-the-limit bodies stay cheap
TIMEOUT_MS = 400
CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST, GET",
    "access-control-allow-headers": "Content-Type",
}


def _build_gaps_model(version_dir: Path) -> None:
    """``serving_default``: x -> {same: x, reciprocal: 1/x}; ``slow``: sleeps ``seconds``."""
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops import testing

    class Gaps(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"same": x * 1.0, "reciprocal": 1.0 / x}

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="seconds")])
        def slow(self, seconds: Any) -> dict[str, Any]:
            # A graph op that waits without burning CPU: tf.data's sleep transformation.
            micros = tf.cast(seconds * 1e6, tf.int64)
            waited = tf.data.Dataset.from_tensors(seconds).apply(testing.sleep(micros))
            return {"seconds": waited.reduce(tf.constant(0.0), lambda total, s: total + s)}

    module = Gaps()
    signatures = {"serving_default": module.serve, "slow": module.slow}
    tf.saved_model.save(module, str(version_dir), signatures=signatures)
    (version_dir / "assets").mkdir(exist_ok=True)
    (version_dir / "assets" / CLASS_NAMES_ASSET).write_text("a\nb\n", encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, start_model_server: Any) -> Any:
    base = tmp_path_factory.mktemp("gaps") / MODEL_NAME
    _build_gaps_model(base / "1")
    return start_model_server(
        base,
        "--port", str(_free_port()),
        "--rest_api_enable_cors_support",
        f"--rest_api_timeout_in_ms={TIMEOUT_MS}",
        "--max_request_bytes", str(MAX_REQUEST_BYTES),
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _values(text: str) -> list[float]:
    # json.loads reads NaN/Infinity/-Infinity, as TF Serving's clients must.
    return [float(v) for v in json.loads(text)["outputs"]["same"]]


def _assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert fragment in response.json()["error"]


# --- JSON conformance ----------------------------------------------------------------------------


def test_nan_and_infinities_are_taken_in_and_written_back_as_tf_serving_writes_them(
    client: httpx.Client,
) -> None:
    body = b'{"inputs": [NaN, Infinity, -Infinity, 2.0, 0.0, -0.0]}'
    response = client.post(PREDICT, content=body)
    assert response.status_code == 200, response.text
    # Bare tokens, exactly: not null, not strings, not 1e999.
    assert '"same":[NaN,Infinity,-Infinity,2.0,0.0,-0.0]' in response.text
    assert '"reciprocal":[NaN,0.0,-0.0,0.5,Infinity,-Infinity]' in response.text


def test_a_float_literal_beyond_float32_becomes_infinity(client: httpx.Client) -> None:
    response = client.post(PREDICT, content=b'{"instances": [1e39, -3.5e38, 3.4e38, 1e999]}')
    assert response.status_code == 200, response.text
    same = [row["same"] for row in response.json()["predictions"]]
    assert same[:2] == [math.inf, -math.inf]
    assert same[2] == pytest.approx(3.4e38, rel=1e-6)  # still in range: kept
    assert same[3] == math.inf


# --- gzip request bodies -------------------------------------------------------------------------


def test_a_gzip_body_is_decompressed(client: httpx.Client) -> None:
    values = np.random.default_rng(3).random(1000, dtype=np.float32)
    plain = json.dumps({"inputs": values.tolist()}).encode()
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    response = client.post(PREDICT, content=gzip.compress(plain), headers=headers)
    assert response.status_code == 200, response.text
    assert np.array_equal(np.asarray(_values(response.text), dtype=np.float32), values)
    assert response.text == client.post(PREDICT, content=plain).text


def test_a_gzip_bomb_is_refused_with_413_without_inflating_it(
    client: httpx.Client, server: Any
) -> None:
    # 200 MB of zeros in ~200 KB: under the body limit compressed, far over it decompressed.
    bomb = gzip.compress(b"0" * 200_000_000, compresslevel=9)
    assert len(bomb) < MAX_REQUEST_BYTES
    started = time.monotonic()
    response = client.post(PREDICT, content=bomb, headers={"Content-Encoding": "gzip"})
    _assert_error(response, 413, f"larger than the limit of {MAX_REQUEST_BYTES:,} bytes")
    assert "decompressed" in response.json()["error"]
    assert time.monotonic() - started < 5  # stopped at the limit, not after 200 MB
    assert "Traceback" not in server.log()


def test_a_decompressed_body_just_under_the_limit_is_served(client: httpx.Client) -> None:
    body = b'{"inputs": [1.0]}'
    padded = body + b" " * (MAX_REQUEST_BYTES - len(body))
    response = client.post(
        PREDICT, content=gzip.compress(padded), headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    over = gzip.compress(padded + b" ")
    response = client.post(PREDICT, content=over, headers={"Content-Encoding": "gzip"})
    _assert_error(response, 413, "decompressed request body is larger than the limit")


@pytest.mark.parametrize(
    "body",
    [b'{"inputs": [1.0]}', gzip.compress(b'{"inputs": [1.0]}')[:-6], b"\x1f\x8b\x08garbage"],
    ids=["not-gzip", "truncated", "bad-deflate-stream"],
)
def test_a_corrupt_gzip_body_is_400(client: httpx.Client, server: Any, body: bytes) -> None:
    response = client.post(PREDICT, content=body, headers={"Content-Encoding": "gzip"})
    _assert_error(response, 400, "not valid gzip")
    assert "Traceback" not in server.log()


# --- CORS ----------------------------------------------------------------------------------------


def test_cors_preflight_is_answered_as_tf_serving_does(client: httpx.Client) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    response = client.options(PREDICT, headers=preflight)
    assert response.status_code == 200
    assert {k: response.headers.get(k) for k in CORS} == CORS

    refused = client.options(PREDICT, headers={"Origin": "null"})
    _assert_error(refused, 400, "Origin header is missing in CORS preflight")
    assert refused.headers["access-control-allow-origin"] == "*"


def test_cors_headers_are_on_answers_and_errors(client: httpx.Client) -> None:
    ok = client.post(PREDICT, json={"inputs": [1.0]}, headers={"Origin": "http://x.test"})
    error = client.get(f"/v1/models/{MODEL_NAME}/versions/9")
    for response in (ok, error):
        assert {k: response.headers.get(k) for k in CORS} == CORS
    v2 = client.options(f"/v2/models/{MODEL_NAME}/infer", headers={"Origin": "http://x.test"})
    assert v2.status_code == 200
    assert "Inference-Header-Content-Length" in v2.headers["access-control-allow-headers"]


def test_without_the_flag_there_is_no_cors() -> None:
    from image_classifier.model_server import ModelServerSettings, create_app

    # Routing only (no lifespan, nothing loaded): OPTIONS stays a 405 and no CORS header shows.
    app = create_app(ModelServerSettings())

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.options(PREDICT, headers={"Origin": "https://app.example"})

    import anyio

    response = anyio.run(call)
    _assert_error(response, 405, "Method Not Allowed")
    assert not any(name.startswith("access-control-") for name in response.headers)


# --- --rest_api_timeout_in_ms ---------------------------------------------------------------------


def test_a_predict_over_the_timeout_is_504_deadline_exceeded(
    client: httpx.Client, server: Any
) -> None:
    started = time.monotonic()
    response = client.post(PREDICT, json={"signature_name": "slow", "inputs": 2.0})
    elapsed = time.monotonic() - started
    _assert_error(response, 504, f"timed out after {TIMEOUT_MS} ms (--rest_api_timeout_in_ms)")
    assert elapsed < 1.5  # answered at the deadline, not when the 2 s sleep ends
    # The server goes on answering while the abandoned call finishes in its thread.
    quick = client.post(PREDICT, json={"inputs": [4.0]})
    assert quick.status_code == 200, quick.text
    assert quick.json() == {"outputs": {"reciprocal": [0.25], "same": [4.0]}}


def test_timeout_zero_means_no_deadline_and_the_cors_flag_parses() -> None:
    from image_classifier.cli import build_parser
    from image_classifier.cli.model_server import settings_from_args
    from image_classifier.errors import ConfigError
    from image_classifier.model_server import ModelServerSettings

    assert ModelServerSettings(rest_api_timeout_in_ms=0).rest_api_timeout_in_ms == 0
    with pytest.raises(ConfigError, match="rest_api_timeout_in_ms must be >= 0"):
        ModelServerSettings(rest_api_timeout_in_ms=-1)
    for flags, expected in (([], False), (["--rest_api_enable_cors_support"], True),
                            (["--rest_api_enable_cors_support=false"], False)):  # fmt: skip
        args = build_parser().parse_args(["model-server", *flags])
        assert settings_from_args(args).rest_api_enable_cors_support is expected
