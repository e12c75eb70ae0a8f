"""Chaos on real processes: the model server killed, restarted and frozen under load.

A gateway (our uvicorn configuration, in a thread) sends uploads from several client threads to a
model server process while ``/ready`` is polled every 0.2 s, as a load balancer would. The model
server is SIGKILLed and started again, and separately SIGSTOPped and resumed. What must hold:
no request waits past its timeout, nothing but 200/503/504 is answered, and predictions and
readiness recover within a second of the model being AVAILABLE again.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from image_classifier.constants import MODEL_NAME
from image_classifier.gateway import GatewaySettings, build_server
from image_classifier.tfserving.status import AVAILABLE, parse_status_body
from servers import server_in_thread

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 2.0
# One predict is at most a status call and a predict call (each bounded by the timeout), plus
# thread and scheduling slack on a loaded 2-core machine.
LONGEST_WAIT_S = 2 * REQUEST_TIMEOUT_S + 1.5
RECOVERY_S = 1.0


@dataclass
class ModelServer:
    base: Path
    port: int
    log: Path
    grpc_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait until the model is AVAILABLE; returns that moment."""
        command = [
            sys.executable, "-m", "image_classifier", "model-server",
            "--rest_api_port", str(self.port),
            "--port", str(self.grpc_port),
            "--model_base_path", str(self.base),
            "--file_system_poll_wait_seconds", "0",
        ]  # fmt: skip
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text(errors="replace")
            try:
                body = httpx.get(f"http://127.0.0.1:{self.port}/v1/models/{MODEL_NAME}").json()
                if any(s.state == AVAILABLE for s in parse_status_body(body)):
                    return time.monotonic()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError("the model server did not become AVAILABLE")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        if signum == signal.SIGKILL:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class Traffic:
    """Closed-loop uploads from a few threads, and a /ready poller, all recorded."""

    url: str
    picture: bytes
    requests: list[tuple[float, float, int]] = field(default_factory=list)  # start, end, status
    probes: list[tuple[float, int]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _upload(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    status = client.post(
                        "/predict-image", files={"file": ("a.png", self.picture, "image/png")}
                    ).status_code
                except httpx.HTTPError:
                    status = -1  # the gateway itself failed to answer: never acceptable
                self.requests.append((started, time.monotonic(), status))

    def _probe(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopping.wait(0.2):
                try:
                    status = client.get("/ready").status_code
                except httpx.HTTPError:
                    status = -1
                self.probes.append((time.monotonic(), status))

    def __enter__(self) -> Traffic:
        self.threads = [threading.Thread(target=self._upload, daemon=True) for _ in range(4)]
        self.threads.append(threading.Thread(target=self._probe, daemon=True))
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=LONGEST_WAIT_S + 5)

    def started_after(self, moment: float) -> list[int]:
        return [status for start, _, status in self.requests if start >= moment]

    def probed_after(self, moment: float) -> list[int]:
        return [status for at, status in self.probes if at >= moment]


@pytest.fixture
def stack(
    tmp_path: Path,
    tiny_export: Callable[..., Any],
    gateway_free_port: Callable[[], int],
) -> Iterator[tuple[ModelServer, str]]:
    base = tmp_path / MODEL_NAME
    tiny_export(base, version=1)
    model = ModelServer(
        base, gateway_free_port(), tmp_path / "model_server.log", gateway_free_port()
    )
    model.start()
    settings = GatewaySettings(
        port=gateway_free_port(),
        tf_serving_url=f"http://127.0.0.1:{model.port}",
        request_timeout_s=REQUEST_TIMEOUT_S,
        connect_timeout_s=0.5,
        log_level="warning",
    )
    try:
        with server_in_thread(build_server(settings)):
            yield model, f"http://127.0.0.1:{settings.port}"
    finally:
        model.stop()


def _picture() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 120, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def _assert_bounded(traffic: Traffic) -> None:
    statuses = {status for _, _, status in traffic.requests}
    assert statuses <= {200, 503, 504}, statuses
    longest = max(end - start for start, end, _ in traffic.requests)
    assert longest <= LONGEST_WAIT_S, f"a request waited {longest:.1f}s"


def test_a_killed_model_server_is_recovered_from_within_a_second(
    stack: tuple[ModelServer, str],
) -> None:
    model, url = stack
    with Traffic(url, _picture()) as traffic:
        time.sleep(1.5)
        killed = time.monotonic()
        model.signal(signal.SIGKILL)
        time.sleep(1.5)
        available = model.start()
        time.sleep(RECOVERY_S + 2.0)

    _assert_bounded(traffic)
    during = [s for start, end, s in traffic.requests if killed < start and end < available]
    assert 503 in during  # the outage was seen, as 503s
    after = traffic.started_after(available + RECOVERY_S)
    assert after and set(after) == {200}, after
    probes = traffic.probed_after(available + RECOVERY_S)
    assert probes and set(probes) == {200}, probes
    assert 503 in [s for at, s in traffic.probes if killed < at < available]


def test_a_frozen_model_server_costs_timeouts_not_hangs(stack: tuple[ModelServer, str]) -> None:
    model, url = stack
    with Traffic(url, _picture()) as traffic:
        time.sleep(1.5)
        frozen = time.monotonic()
        model.signal(signal.SIGSTOP)
        time.sleep(2 * REQUEST_TIMEOUT_S + 1)
        resumed = time.monotonic()
        model.signal(signal.SIGCONT)
        time.sleep(RECOVERY_S + 2.0)

    _assert_bounded(traffic)
    during = [s for start, end, s in traffic.requests if frozen < start and end < resumed]
    assert during and set(during) <= {503, 504}  # answered on time, by the gateway alone
    after = traffic.started_after(resumed + RECOVERY_S)
    assert after and set(after) == {200}, after
    probes = traffic.probed_after(resumed + RECOVERY_S)
    assert probes and set(probes) == {200}, probes
