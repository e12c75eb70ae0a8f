"""Load test for ``POST /predict-image``: throughput and latency percentiles per concurrency level.

Against a gateway on this machine only (127.0.0.1 / localhost / ::1): it is a measuring tool,
not something to point at other people's servers.

    # a running gateway (image-classifier serve, or gateway + TF Serving)
    python benchmarks/load_test.py --url http://127.0.0.1:8000

    # or let it start `image-classifier serve` on free ports for the run, then stop it
    python benchmarks/load_test.py --spawn-serve saved_models/image_classifier

Each level runs ``--requests`` uploads (after ``--warmup`` unmeasured ones) with that many
requests in flight, over one pooled HTTP/1.1 client. Latency is per request, from sending to
the last byte; throughput is completed requests per wall-clock second. Non-200 answers are
counted and reported, never silently averaged in.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def sample_image(path: str | None) -> tuple[str, bytes, str]:
    if path:
        data = Path(path).read_bytes()
        kind = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
        return Path(path).name, data, kind
    from PIL import Image

    # A phone-sized JPEG (about 200 kB), so decoding is part of what is measured.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:960, 0:1280]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.float32)
    pixels += rng.normal(0, 8, size=pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return "sample.jpg", buffer.getvalue(), "image/jpeg"


async def run_level(
    client: httpx.AsyncClient,
    image: tuple[str, bytes, str],
    concurrency: int,
    requests: int,
    warmup: int,
) -> LevelResult:
    async def one() -> tuple[float, bool]:
        started = time.perf_counter()
        try:
            response = await client.post("/predict-image", files={"file": image})
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - started, ok

    async def worker(queue: asyncio.Queue[int], sink: list[tuple[float, bool]]) -> None:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            sink.append(await one())

    async def drive(count: int) -> tuple[list[tuple[float, bool]], float]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(count):
            queue.put_nowait(index)
        sink: list[tuple[float, bool]] = []
        started = time.perf_counter()
        await asyncio.gather(*(worker(queue, sink) for _ in range(concurrency)))
        return sink, time.perf_counter() - started

    await drive(warmup)
    results, seconds = await drive(requests)
    latencies = np.array([latency for latency, ok in results if ok]) * 1000
    errors = sum(not ok for _, ok in results)
    percentiles = np.percentile(latencies, [50, 95, 99]) if len(latencies) else [float("nan")] * 3
    return LevelResult(
        concurrency=concurrency,
        requests=requests,
        errors=errors,
        seconds=seconds,
        throughput_rps=(requests - errors) / seconds,
        p50_ms=float(percentiles[0]),
        p95_ms=float(percentiles[1]),
        p99_ms=float(percentiles[2]),
        max_ms=float(latencies.max()) if len(latencies) else float("nan"),
    )


async def run(
    url: str, image: tuple[str, bytes, str], levels: Sequence[int], requests: int, warmup: int
) -> list[LevelResult]:
    limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=limits, trust_env=False
    ) as client:
        ready = await client.get("/ready")
        if ready.status_code != 200:
            raise SystemExit(f"{url}/ready answered {ready.status_code}: {ready.text}")
        return [await run_level(client, image, level, requests, warmup) for level in levels]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def spawned_serve(model_base_path: str) -> Iterator[str]:
    port, model_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "image_classifier",
            "serve",
            "--port",
            str(port),
            "--model-port",
            str(model_port),
            "--model-base-path",
            model_base_path,
            "--log-level",
            "warning",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"serve exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/ready", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve did not become ready within 180 s")
            time.sleep(0.3)
        yield url
    finally:
        process.send_signal(2)  # SIGINT: the same clean stop as Ctrl-C
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def print_table(url: str, image: tuple[str, bytes, str], results: list[LevelResult]) -> None:
    print(f"POST {url}/predict-image with {image[0]} ({len(image[1]) / 1024:.0f} KiB)")
    print(
        f"{'conc':>5} {'requests':>9} {'errors':>7} {'req/s':>8} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    )
    for r in results:
        print(
            f"{r.concurrency:>5} {r.requests:>9} {r.errors:>7} {r.throughput_rps:>8.1f} "
            f"{r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f} {r.max_ms:>8.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000", help="gateway on this machine")
    target.add_argument(
        "--spawn-serve",
        metavar="MODEL_BASE_PATH",
        help="start `serve` on this export for the run, then stop it",
    )
    parser.add_argument(
        "--concurrency", default="1,8,32,64", help="comma-separated levels (default 1,8,32,64)"
    )
    parser.add_argument("--requests", type=int, default=400, help="measured requests per level")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per level")
    parser.add_argument("--image", help="image file to upload (default: a generated 1280x960 JPEG)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)

    levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if not levels or min(levels) < 1:
        parser.error("--concurrency needs positive integers")
    image = sample_image(args.image)

    def measure(url: str) -> list[LevelResult]:
        host = urlsplit(url).hostname
        if host not in LOOPBACK:
            parser.error(f"refusing to load-test {host!r}: only 127.0.0.1/localhost/::1")
        return asyncio.run(run(url.rstrip("/"), image, levels, args.requests, args.warmup))

    if args.spawn_serve:
        with spawned_serve(args.spawn_serve) as url:
            results = measure(url)
    else:
        url = args.url
        results = measure(url)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print_table(url.rstrip("/"), image, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
