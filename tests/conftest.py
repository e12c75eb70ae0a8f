"""Shared pytest fixtures, and the strict-skip rule the test command runs under."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
from PIL import Image

# scripts/test.sh installs everything the suite needs (TensorFlow, Chromium, curl is on the
# machine), so there a skip means a broken setup, not an optional feature: it fails instead.
# Only tests marked `real_data` may skip: the CIFAR-10 batches in ../shared are not installable.
STRICT_SKIPS = os.environ.get("IMAGE_CLASSIFIER_STRICT_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    allowed = item.get_closest_marker("real_data") is not None or hasattr(report, "wasxfail")
    if STRICT_SKIPS and report.skipped and not allowed:
        report.outcome = "failed"
        report.longrepr = f"skipped under IMAGE_CLASSIFIER_STRICT_SKIPS=1: {report.longrepr}"


def _encode(image: Image.Image, fmt: str, **save_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


# Mid grey (opaque where there is alpha) in each mode's own units.
_DEFAULT_COLORS: dict[str, Any] = {
    "1": 1,
    "LA": (128, 255),
    "PA": (128, 255),
    "RGB": (128, 128, 128),
    "RGBA": (128, 128, 128, 255),
    "CMYK": (0, 0, 0, 127),
    "I;16": 32896,
    "I": 32896,
    "F": 0.5,
}


@pytest.fixture
def encode_image() -> Callable[..., bytes]:
    """``encode_image(image, fmt="PNG", **save_kwargs) -> bytes``: a Pillow image, encoded."""

    def encode(image: Image.Image, fmt: str = "PNG", **save_kwargs: Any) -> bytes:
        return _encode(image, fmt, **save_kwargs)

    return encode


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(fmt="PNG", mode="RGB", size=(32, 32), color=None, **save_kwargs) -> bytes``.

    A solid-colour image made by Pillow and encoded in ``fmt`` ("PNG", "JPEG", "WEBP", ...).
    ``color`` is anything ``Image.new`` accepts for ``mode``; None gives a mid grey/colour.
    """

    def make(
        fmt: str = "PNG",
        mode: str = "RGB",
        size: tuple[int, int] = (32, 32),
        color: Any = None,
        **save_kwargs: Any,
    ) -> bytes:
        if color is None:
            color = _DEFAULT_COLORS.get(mode, 128)
        return _encode(Image.new(mode, size, color), fmt, **save_kwargs)

    return make


# --- Gateway fixtures (tests/test_gateway*.py) ---------------------------------------------------
# One tiny export per session, the loaded servable for expected answers, sample pictures in the
# formats users send, and a gateway served over real HTTP (for the browser and the CLI client).


def _gateway_free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def gateway_free_port() -> Callable[[], int]:
    """``gateway_free_port() -> int``: a TCP port on 127.0.0.1 that was free a moment ago."""
    return _gateway_free_port


@pytest.fixture(scope="session")
def gateway_model_base_path(
    tmp_path_factory: pytest.TempPathFactory, tiny_export: Callable[..., Any]
) -> Any:
    """Base path of a tiny untrained export (version 1), built once per session."""
    base = tmp_path_factory.mktemp("gateway_model") / "image_classifier"
    tiny_export(base, version=1)
    return base


@pytest.fixture(scope="session")
def gateway_servable(gateway_model_base_path: Any) -> Any:
    """The tiny export loaded in-process: the reference every served answer must match."""
    from image_classifier.servable import load_servable

    return load_servable(gateway_model_base_path)


@pytest.fixture(scope="session")
def gateway_expected(gateway_servable: Any) -> Callable[[bytes], Any]:
    """``gateway_expected(image_bytes) -> probabilities``: serving_default on preprocess_image."""
    from image_classifier.preprocess import preprocess_image

    def expected(data: bytes) -> Any:
        return gateway_servable.predict(preprocess_image(data)[None])[0]

    return expected


@pytest.fixture(scope="session")
def gateway_pictures() -> dict[str, tuple[str, bytes, str]]:
    """name -> (filename, bytes, content type): JPEG, PNG, WebP, grayscale, RGBA, a 4000x3000
    photo-like JPEG, and a drawn scene (sky, sea, boat) standing in for a real photo."""
    import numpy as np
    from PIL import ImageDraw

    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    rgb = Image.fromarray(small)
    gray = Image.fromarray(rng.integers(0, 256, size=(40, 40), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, size=(36, 36, 4), dtype=np.uint8))

    # A smooth "photo" with texture, so the JPEG is megabytes like a camera's, not kilobytes.
    yy, xx = np.mgrid[0:3000, 0:4000].astype(np.float32)
    big = np.stack(
        [
            127 + 100 * np.sin(xx / 300.0),
            127 + 100 * np.cos(yy / 250.0),
            (xx + yy) / 7000.0 * 255,
        ],
        axis=-1,
    )
    big += rng.normal(0, 12, size=(3000, 4000, 1)).astype(np.float32)
    photo = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))

    scene = Image.new("RGB", (320, 240), (135, 190, 235))
    draw = ImageDraw.Draw(scene)
    draw.rectangle((0, 150, 320, 240), fill=(30, 80, 140))
    draw.polygon([(70, 150), (250, 150), (220, 185), (100, 185)], fill=(120, 60, 40))
    draw.rectangle((150, 70, 158, 150), fill=(90, 90, 90))
    draw.polygon([(160, 75), (160, 140), (225, 140)], fill=(245, 245, 245))

    return {
        "jpeg": ("photo.jpg", _encode(rgb, "JPEG", quality=90), "image/jpeg"),
        "png": ("image.png", _encode(rgb, "PNG"), "image/png"),
        "webp": ("image.webp", _encode(rgb, "WEBP", quality=90), "image/webp"),
        "gray": ("gray.png", _encode(gray, "PNG"), "image/png"),
        "rgba": ("alpha.png", _encode(rgba, "PNG"), "image/png"),
        "large": ("large.jpg", _encode(photo, "JPEG", quality=85), "image/jpeg"),
        "scene": ("boat.jpg", _encode(scene, "JPEG", quality=92), "image/jpeg"),
    }


@pytest.fixture(scope="session")
def live_gateway(
    gateway_model_base_path: Any, gateway_servable: Any
) -> Callable[..., AbstractContextManager[str]]:
    """``with live_gateway(**settings) as url``: a gateway (local backend, tiny export) served
    by uvicorn in a thread, with these GatewaySettings overrides."""
    import uvicorn

    from image_classifier.gateway import GatewaySettings, create_app
    from image_classifier.gateway.backends import LocalBackend

    @contextmanager
    def start(**overrides: Any) -> Iterator[str]:
        settings = GatewaySettings(
            backend="local", model_base_path=gateway_model_base_path, **overrides
        )
        backend = LocalBackend(settings, loader=lambda _path: gateway_servable)
        port = _gateway_free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, backend=backend),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                access_log=False,
            )
        )
        from servers import server_in_thread

        with server_in_thread(server):
            yield f"http://127.0.0.1:{port}"

    return start


@pytest.fixture(scope="session")
def gateway_live_url(live_gateway: Callable[..., AbstractContextManager[str]]) -> Iterator[str]:
    """Base URL of a gateway with default settings (local backend, tiny export)."""
    with live_gateway() as url:
        yield url


# --- Model server fixtures (tests/test_model_server.py) ------------------------------------------
# Tiny exports on demand, and the embedded model server started as a real subprocess, the way
# `image-classifier model-server` runs, so tests talk to it over HTTP exactly as TF Serving
# clients do.


@pytest.fixture(scope="session")
def tiny_export() -> Callable[..., Any]:
    """``tiny_export(base, *, seed=0, version=None) -> Path``: export an untrained tiny model.

    ModelConfig(stem_filters=(8, 16), tcn_filters=16), weights drawn from ``seed`` (so two
    seeds give two models with different answers), written to ``base/<version>`` (next free by
    default) with :func:`export.export_model`. Returns the version directory.
    """

    def export(base: Any, *, seed: int = 0, version: int | None = None) -> Any:
        import keras

        from image_classifier.constants import CIFAR10_CLASSES
        from image_classifier.export import export_model
        from image_classifier.model import ModelConfig, build_model

        keras.utils.set_random_seed(seed)
        config = ModelConfig(stem_filters=(8, 16), tcn_filters=16)
        return export_model(
            build_model(config),
            config,
            base,
            class_names=CIFAR10_CLASSES,
            metadata={"note": "tiny untrained test export", "seed": seed},
            version=version,
        )

    return export


@dataclasses.dataclass
class RunningModelServer:
    """A ``python -m image_classifier model-server`` subprocess listening on 127.0.0.1."""

    url: str  # http://127.0.0.1:PORT
    port: int
    base_path: Any
    process: subprocess.Popen[bytes]
    log_path: Any
    grpc_port: int = 0  # TF Serving's --port: the gRPC API on 127.0.0.1

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: uvicorn's graceful shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def start_model_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RunningModelServer]]:
    """``start_model_server(base, *flags, timeout=180.0) -> RunningModelServer``.

    Starts the model server on a free port with ``--file_system_poll_wait_seconds 1`` plus
    ``flags``, and returns once ``GET /v1/models/image_classifier`` reports a version AVAILABLE
    (failing with the server's log if it exits or times out first). Servers still running at
    the end of the session are stopped.
    """
    import time

    import httpx

    from image_classifier.constants import MODEL_NAME
    from image_classifier.tfserving.status import AVAILABLE, parse_status_body

    started: list[RunningModelServer] = []

    def start(base: Any, *flags: str, timeout: float = 180.0) -> RunningModelServer:
        port = grpc_port = _gateway_free_port()
        while grpc_port == port:
            grpc_port = _gateway_free_port()
        log_path = tmp_path_factory.mktemp("model_server_log") / "server.log"
        command = [
            sys.executable, "-m", "image_classifier", "model-server",
            "--rest_api_port", str(port),
            # A port of its own: servers run side by side, and 8500 may be taken.
            "--port", str(grpc_port),
            "--model_name", MODEL_NAME,
            "--model_base_path", str(base),
            "--file_system_poll_wait_seconds", "1",
            *flags,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = RunningModelServer(
            f"http://127.0.0.1:{port}", port, base, process, log_path, grpc_port
        )
        started.append(server)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"model server exited with {process.returncode}:\n{server.log()}")
            try:
                body = httpx.get(f"{server.url}/v1/models/{MODEL_NAME}", timeout=5).json()
                if any(s.state == AVAILABLE for s in parse_status_body(body)):
                    return server
            except (httpx.HTTPError, ValueError):
                pass  # not listening yet (it loads the model before opening the port)
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"model server not AVAILABLE after {timeout:.0f} s:\n{server.log()}")
            time.sleep(0.25)

    yield start
    for server in started:
        server.stop()
