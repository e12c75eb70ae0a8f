"""Memory under decompression-bomb-like uploads: what blank 7000x7000 PNGs cost each process.

    .venv/bin/python benchmarks/memory.py [--model-base-path saved_models/image_classifier]

Spawns ``image-classifier serve`` on free ports (127.0.0.1 only), samples both processes' RSS
every 20 ms, and sends: one request with 16 such PNGs (6 KB each, 49 MP decoded) to the gateway,
one such PNG to the gateway, then the same PNG three times to the model server's in-graph
``serving_bytes`` decoder. Prints status codes and RSS before, at peak and after each step.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-base-path", type=Path, default=ROOT / "saved_models" / "image_classifier"
    )
    args = parser.parse_args()

    port, model_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "image_classifier", "serve",
        "--port", str(port), "--model-port", str(model_port),
        "--model-base-path", str(args.model_base_path), "--log-level", "warning",
    ]  # fmt: skip
    serve = subprocess.Popen(
        command,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", serve)
        children = Path(f"/proc/{serve.pid}/task/{serve.pid}/children").read_text().split()
        model_server = int(children[0])
        buffer = io.BytesIO()
        Image.new("1", (7000, 7000)).save(buffer, "PNG")
        png = buffer.getvalue()

        peak = {"gateway": 0, "model server": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak["gateway"] = max(peak["gateway"], rss_mb(serve.pid))
                peak["model server"] = max(peak["model server"], rss_mb(model_server))
                time.sleep(0.02)

        threading.Thread(target=sample, daemon=True).start()
        print(f"blank 7000x7000 PNG: {len(png):,} bytes, 49 MP decoded")
        print(f"start: gateway {rss_mb(serve.pid)} MB, model server {rss_mb(model_server)} MB")

        gateway = f"http://127.0.0.1:{port}"
        files = [("files", (f"{i}.png", png, "image/png")) for i in range(16)]
        answer = httpx.post(f"{gateway}/predict-images", files=files, timeout=120)
        code = answer.json().get("error", {}).get("code", "") if answer.status_code >= 400 else ""
        print(f"16 PNGs in one request to the gateway: {answer.status_code} {code}")
        answer = httpx.post(
            f"{gateway}/predict-image", files={"file": ("a.png", png, "image/png")}, timeout=120
        )
        time.sleep(1)
        print(
            f"one PNG to the gateway: {answer.status_code}; gateway RSS now "
            f"{rss_mb(serve.pid)} MB, peak {peak['gateway']} MB"
        )
        body = {
            "signature_name": "serving_bytes",
            "instances": [{"b64": base64.b64encode(png).decode("ascii")}],
        }
        for attempt in range(1, 4):
            answer = httpx.post(
                f"http://127.0.0.1:{model_port}/v1/models/image_classifier:predict",
                json=body,
                timeout=120,
            )
            time.sleep(1)
            print(
                f"model server serving_bytes #{attempt}: {answer.status_code}; RSS now "
                f"{rss_mb(model_server)} MB, peak {peak['model server']} MB"
            )
        stop.set()
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
