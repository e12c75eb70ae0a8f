"""Helpers the tests share for driving the servers: raw ASGI calls, a gateway in a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def run_asgi(
    app: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]], path: str = "/predict-image"
) -> tuple[int, int]:
    """POST ``chunks`` to ``app`` as a streamed body; returns (status, chunks the app pulled).

    Counting pulled chunks is how tests see whether a refusal came before the body was read.
    """
    import anyio

    pulled = 0
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {
                "type": "http.request",
                "body": chunks[pulled - 1],
                "more_body": pulled < len(chunks),
            }
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }
    anyio.run(app, scope, receive, send)
    return status[0], pulled


@contextmanager
def server_in_thread(server: Any, timeout: float = 30.0) -> Iterator[Any]:
    """Run a ``uvicorn.Server`` in a daemon thread until the block ends."""
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def spawn_serve(*args: str, output: list[str], timeout: float = 180.0) -> subprocess.Popen[str]:
    """``image-classifier serve ARGS`` as a process, once its banner says it is up.

    Its stdout and stderr lines are appended to ``output`` as they come (the caller keeps the
    list, to read or to show on failure); the caller stops the process.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "image_classifier", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stream = process.stdout
    assert stream is not None
    threading.Thread(target=lambda: output.extend(stream), daemon=True).start()
    deadline = time.monotonic() + timeout
    while "Press Ctrl-C" not in "".join(output):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError("serve did not come up:\n" + "".join(output))
        time.sleep(0.1)
    return process
