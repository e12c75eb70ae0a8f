"""``image-classifier serve`` end to end: a subprocess running the model server and the gateway.

Real uploads over real sockets, a model server killed and brought back under a running gateway,
200 concurrent uploads, and Ctrl-C. The tests run in file order; the last one stops the service.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from servers import spawn_serve

Pictures = dict[str, tuple[str, bytes, str]]

SERVE = [sys.executable, "-m", "image_classifier", "serve"]


@dataclass
class Service:
    process: subprocess.Popen[str]
    url: str
    model_port: int
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)

    def model_pid(self) -> int:
        # The banner names the first model server, the watchdog's warning each restarted one.
        pids = re.findall(r"\(pid (\d+)\)", self.text())
        assert pids, self.text()
        return int(pids[-1])


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, service: Service) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if service.process.poll() is not None:
            raise AssertionError(f"serve exited ({service.process.returncode}):\n{service.text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{service.text()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def service(
    gateway_model_base_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    gateway_free_port: Callable[[], int],
) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("serve") / "image_classifier"
    shutil.copytree(gateway_model_base_path, base)
    port, model_port = gateway_free_port(), gateway_free_port()
    output: list[str] = []
    process = spawn_serve(
        *("--port", str(port), "--model-port", str(model_port)),
        *("--model-grpc-port", str(gateway_free_port()), "--model-base-path", str(base)),
        *("--log-level", "warning"),
        output=output,
    )
    running = Service(process, f"http://127.0.0.1:{port}", model_port, output)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _probabilities(body: dict) -> np.ndarray:
    probs = np.zeros(10)
    for p in body["predictions"]:
        probs[p["class_index"]] = p["probability"]
    return probs


def test_serve_prints_where_everything_is(service: Service) -> None:
    text = service.text()

    assert f"Web page:      {service.url}/" in text
    assert "/docs" in text
    assert f"http://127.0.0.1:{service.model_port}/v1/models/image_classifier" in text
    assert httpx.get(f"{service.url}/ready", trust_env=False).status_code == 200


@pytest.mark.parametrize("name", ["jpeg", "png", "webp", "gray", "rgba", "large"])
def test_real_uploads_of_every_format_match_the_export(
    service: Service,
    gateway_pictures: Pictures,
    gateway_expected: Callable[[bytes], np.ndarray],
    name: str,
) -> None:
    picture = gateway_pictures[name]
    response = httpx.post(
        f"{service.url}/predict-image?top_k=10",
        files={"file": picture},
        timeout=30,
        trust_env=False,
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == picture[0]
    np.testing.assert_allclose(_probabilities(body), gateway_expected(picture[1]), atol=1e-5)


def test_200_concurrent_uploads_are_all_answered_correctly(
    service: Service, gateway_servable: object
) -> None:
    from image_classifier.preprocess import preprocess_image

    rng = np.random.default_rng(3)
    pictures = []
    for index in range(200):
        pixels = rng.integers(0, 256, size=(24 + index % 9, 30, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        pictures.append((f"img-{index}.png", buffer.getvalue()))
    batch = np.stack([preprocess_image(data) for _, data in pictures])
    expected = gateway_servable.predict(batch)  # type: ignore[attr-defined]

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=service.url, timeout=120, limits=limits, trust_env=False
        ) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/predict-image?top_k=10",
                        files={"file": (name, data, "image/png")},
                        headers={"X-Request-ID": f"load-{i}"},
                    )
                    for i, (name, data) in enumerate(pictures)
                )
            )

    responses = asyncio.run(send_all())

    assert [r.status_code for r in responses] == [200] * 200
    for index, response in enumerate(responses):
        body = response.json()
        assert body["filename"] == f"img-{index}.png"  # no answers swapped between requests
        assert response.headers["x-request-id"] == f"load-{index}"
        np.testing.assert_allclose(_probabilities(body), expected[index], atol=1e-5)


def test_backend_killed_gives_503_then_200_again_without_restarting_the_gateway(
    service: Service, gateway_pictures: Pictures
) -> None:
    picture = gateway_pictures["png"]
    old_pid = service.model_pid()

    os.kill(old_pid, signal.SIGKILL)
    _wait_for(lambda: _port_closed(service.model_port), 10, "the model port to close", service)
    during = httpx.post(
        f"{service.url}/predict-image", files={"file": picture}, timeout=30, trust_env=False
    )
    ready = httpx.get(f"{service.url}/ready", timeout=30, trust_env=False)

    assert during.status_code == 503, during.text
    assert during.json()["error"]["code"] in {"backend_unavailable", "model_unavailable"}
    assert ready.status_code == 503

    def recovered() -> bool:
        response = httpx.post(
            f"{service.url}/predict-image", files={"file": picture}, timeout=30, trust_env=False
        )
        return response.status_code == 200

    _wait_for(recovered, 120, "the restarted model server", service)
    assert service.process.poll() is None  # the same gateway process throughout
    assert service.model_pid() != old_pid


def test_ctrl_c_stops_gateway_and_model_server(service: Service) -> None:
    model_pid = service.model_pid()

    service.process.send_signal(signal.SIGINT)
    service.process.wait(timeout=30)

    assert service.process.returncode == 0, service.text()
    assert _pid_gone(model_pid)
    assert _port_closed(service.model_port)
    assert _port_closed(int(service.url.rsplit(":", 1)[1]))
    assert "Stopped." in service.text()


def _port_closed(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _pid_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# --- refusals that need no model server -----------------------------------------------------------


def test_serve_without_an_export_explains_what_to_do(tmp_path: Path) -> None:
    result = subprocess.run(
        [*SERVE, "--model-base-path", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "no model version" in result.stderr
    assert "image-classifier train" in result.stderr


def test_serve_refuses_a_port_in_use(gateway_model_base_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*SERVE, "--model-base-path", str(gateway_model_base_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert result.returncode == 2
    assert f"port {port}" in result.stderr


def test_serve_reports_an_export_that_cannot_load(
    tmp_path: Path, gateway_free_port: Callable[[], int]
) -> None:
    version = tmp_path / "image_classifier" / "1"
    (version / "assets").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"not a protobuf")
    (version / "assets" / "class_names.txt").write_text("a\nb\n")

    result = subprocess.run(
        [
            *SERVE,
            "--model-base-path",
            str(version.parent),
            "--port",
            str(gateway_free_port()),
            "--model-port",
            str(gateway_free_port()),
            "--model-grpc-port",
            str(gateway_free_port()),
            "--log-level",
            "warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    assert "could not load the model" in result.stderr
    assert "Stopped." in result.stdout
