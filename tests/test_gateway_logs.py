"""The gateway's logs as a log shipper reads them: ``--log-format json`` on a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest


@pytest.mark.slow
def test_json_logs_are_one_object_per_line_with_the_access_fields(
    gateway_model_base_path: Path,
    gateway_free_port: Callable[[], int],
    gateway_pictures: dict[str, tuple[str, bytes, str]],
) -> None:
    port = gateway_free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "image_classifier",
            "gateway",
            "--backend",
            "local",
            "--model-base-path",
            str(gateway_model_base_path),
            "--port",
            str(port),
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()
            try:
                if httpx.get(f"{url}/ready", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.2)
        answer = httpx.post(
            f"{url}/predict-image", files={"file": gateway_pictures["png"]}, trust_env=False
        )
        refused = httpx.post(f"{url}/predict-image", files={"file": ("a.png", b"x", "image/png")})
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)

    assert answer.status_code == 200 and refused.status_code == 400
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records, stderr
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "image_classifier.gateway.access"]
    by_id = {r["request_id"]: r for r in access}
    ok = by_id[answer.headers["x-request-id"]]
    assert (ok["method"], ok["path"], ok["route"], ok["status"]) == (
        "POST",
        "/predict-image",
        "/predict-image",
        200,
    )
    assert isinstance(ok["duration_ms"], float) and ok["duration_ms"] > 0
    assert by_id[refused.headers["x-request-id"]]["status"] == 400
    # One line per request: the two predictions, nothing from uvicorn's own access log.
    assert [r["path"] for r in access if r["path"] == "/predict-image"] == ["/predict-image"] * 2
