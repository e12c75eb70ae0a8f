"""Side by side on this machine: ``image-classifier serve``, a tutorial-style peer, the limit.

    .venv/bin/python benchmarks/serving.py [--seconds 10] [--levels 1,8,32,64] [--json out.json]

- **serve**: ``image-classifier serve`` with the shipped model (spawned on free ports).
- **peer**: what a tutorial writes: FastAPI, ``tf.saved_model.load``, Pillow decode and resize,
  one ``serving_default`` call per request, no batching (its 25 lines are below, run under
  uvicorn in its own process, same export and same cores).
- **limit**: the in-process ceiling: decode + preprocess + ``serving_default`` batched at 64,
  in one process, no HTTP, with the TensorFlow threading ``serve`` uses.

Two workloads: CIFAR-size JPEGs (validation images from ``../shared`` when present, else
synthetic) and ~1280x960 photos (those images upscaled with mild noise, ~200 KB). For each
workload and concurrency level the two servers run in turn, ``--rounds`` times (A B A B ...),
so drift hits both; a closed-loop client on 127.0.0.1 (``--seconds`` per run) measures req/s
and latency. Never run it while something else uses the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar-10-batches-py"

PEER_APP = textwrap.dedent(
    """
    import io, os
    import numpy as np, tensorflow as tf
    from fastapi import FastAPI, File, UploadFile
    from PIL import Image

    CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]
    model = tf.saved_model.load(os.environ["MODEL_DIR"])
    predict = model.signatures["serving_default"]
    app = FastAPI()

    @app.post("/predict-image")
    async def predict_image(file: UploadFile = File(...)):
        image = Image.open(io.BytesIO(await file.read())).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((32, 32))
        x = np.asarray(image, dtype=np.float32)[None] / 255.0
        probs = predict(images=tf.constant(x))["probabilities"].numpy()[0]
        order = np.argsort(-probs)[:3]
        return {"predictions": [{"label": CLASSES[i], "probability": float(probs[i])}
                                for i in order]}
    """
)


@dataclass
class Run:
    system: str
    workload: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pictures(count: int) -> dict[str, list[bytes]]:
    """The two workloads' uploads, encoded once."""
    if (CIFAR / "data_batch_5").exists():
        with (CIFAR / "data_batch_5").open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images = batch[b"data"][:count].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    else:
        images = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    small, photos = [], []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        small.append(buffer.getvalue())
        big = np.asarray(Image.fromarray(pixels).resize((1280, 960), Image.Resampling.BICUBIC))
        noisy = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, "JPEG", quality=85)
        photos.append(buffer.getvalue())
    return {"cifar": small, "photo": photos}


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def spawned(command: list[str], ready_url: str, env: dict[str, str]) -> Iterator[None]:
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_http(ready_url, process)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


Upload = Callable[[bytes], Awaitable[bool]]


@asynccontextmanager
async def aiohttp_uploader(url: str) -> AsyncIterator[Upload]:
    session = aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=1),
        timeout=aiohttp.ClientTimeout(total=60),
    )

    async def upload(data: bytes) -> bool:
        form = aiohttp.FormData()
        form.add_field("file", data, filename="a.jpg", content_type="image/jpeg")
        try:
            async with session.post("/predict-image", data=form) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    try:
        yield upload
    finally:
        await session.close()


@asynccontextmanager
async def httpx_uploader(url: str) -> AsyncIterator[Upload]:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def upload(data: bytes) -> bool:
            try:
                response = await client.post(
                    "/predict-image", files={"file": ("a.jpg", data, "image/jpeg")}
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        yield upload


CLIENTS = {"aiohttp": aiohttp_uploader, "httpx": httpx_uploader}


async def closed_loop(
    url: str,
    uploads: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
    client: str = "aiohttp",
) -> Run:
    """``concurrency`` users, each with its own connection, uploading back to back.

    One client and connection per user, like independent callers. aiohttp by default: it
    spends about a third of httpx's CPU per request (0.5 against 1.6 ms measured), and on two
    cores every millisecond the load generator spends is taken from the server it measures
    (``--client httpx`` gives the earlier yardstick). Every user is connected and has uploaded
    for ``warmup`` seconds before the measured window opens, and the load generator's garbage
    collector is off inside it: a full collection here (~50-90 ms) would otherwise be counted
    as the server's latency.
    """
    latencies: list[float] = []
    errors = 0
    began = time.monotonic()
    measure_from = began + warmup
    stop_at = measure_from + seconds

    async def user(offset: int) -> None:
        nonlocal errors
        async with CLIENTS[client](url) as upload:
            index = offset
            while time.monotonic() < stop_at:
                data = uploads[index % len(uploads)]
                index += concurrency
                measured = time.monotonic() >= measure_from
                started = time.perf_counter()
                ok = await upload(data)
                if measured:
                    latencies.append(time.perf_counter() - started)
                    errors += not ok

    async def collector_off_while_measuring() -> None:
        # Halfway through the warm-up: the collection itself blocks this loop for ~50-90 ms,
        # which must land outside the window too.
        await asyncio.sleep(max(0.0, began + warmup / 2 - time.monotonic()))
        gc.collect()
        gc.disable()

    try:
        await asyncio.gather(
            collector_off_while_measuring(), *(user(i) for i in range(concurrency))
        )
    finally:
        gc.enable()
    elapsed = time.monotonic() - measure_from
    ms = np.asarray(latencies) * 1000
    return Run(
        "",
        "",
        concurrency,
        len(latencies),
        errors,
        len(latencies) / elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 95)),
        float(np.percentile(ms, 99)),
    )


def in_process_limit(model_dir: Path, uploads: list[bytes], seconds: float) -> float:
    """Images per second: decode + preprocess + serving_default batched at 64, one process."""
    code = textwrap.dedent(
        f"""
        import pickle, sys, time
        import numpy as np
        import tensorflow as tf
        from image_classifier.preprocess import preprocess_image
        from image_classifier.servable import load_servable, tuned_thread_counts
        intra, inter = tuned_thread_counts()  # the threading serve runs the model with
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        uploads = pickle.load(sys.stdin.buffer)
        servable = load_servable({str(model_dir)!r})
        servable.predict(np.zeros((64, 32, 32, 3), np.float32))
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < {seconds}:
            batch = [uploads[(done + i) % len(uploads)] for i in range(64)]
            servable.predict(np.stack([preprocess_image(b) for b in batch]))
            done += 64
        print(done / (time.perf_counter() - began))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(uploads),
        capture_output=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return float(result.stdout.decode().strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-base-path", type=Path, default=ROOT / "saved_models" / "image_classifier"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (default 10)")
    parser.add_argument("--levels", default="1,8,32,64", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=1, help="A/B alternations per level")
    parser.add_argument("--workloads", default="cifar,photo")
    parser.add_argument("--images", type=int, default=50, help="distinct pictures per workload")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--client", choices=sorted(CLIENTS), default="aiohttp", help="load generator's HTTP client"
    )
    args = parser.parse_args()

    from image_classifier.servable import resolve_version_dir

    version_dir = resolve_version_dir(args.model_base_path)
    levels = [int(level) for level in args.levels.split(",")]
    workloads = pictures(args.images)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}

    limits = {
        name: in_process_limit(version_dir, workloads[name], args.seconds)
        for name in args.workloads.split(",")
    }
    print(f"in-process limit (img/s): {limits}", flush=True)

    serve_port, model_port, peer_port = free_port(), free_port(), free_port()
    serve_cmd = [
        sys.executable, "-m", "image_classifier", "serve",
        "--port", str(serve_port), "--model-port", str(model_port),
        "--model-base-path", str(args.model_base_path), "--log-level", "warning",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        peer_file = Path(scratch) / "peer_app.py"
        peer_file.write_text(PEER_APP, encoding="utf-8")
        peer_cmd = [
            sys.executable, "-m", "uvicorn", "peer_app:app",
            "--host", "127.0.0.1", "--port", str(peer_port), "--log-level", "warning",
            "--app-dir", scratch,
        ]  # fmt: skip
        peer_env = {**env, "MODEL_DIR": str(version_dir)}
        systems = {
            "serve": (serve_cmd, f"http://127.0.0.1:{serve_port}", "/ready", env),
            "peer": (peer_cmd, f"http://127.0.0.1:{peer_port}", "/docs", peer_env),
        }
        runs: list[Run] = []
        with (
            spawned(serve_cmd, systems["serve"][1] + "/ready", env),
            spawned(peer_cmd, systems["peer"][1] + "/docs", peer_env),
        ):
            for workload in args.workloads.split(","):
                uploads = workloads[workload]
                for level in levels:
                    for _ in range(args.rounds):
                        for system in ("serve", "peer"):
                            url = systems[system][1]
                            run = asyncio.run(
                                closed_loop(url, uploads, level, args.seconds, client=args.client)
                            )
                            run.system, run.workload = system, workload
                            runs.append(run)
                            print(json.dumps(asdict(run)), flush=True)

    print()
    print(
        "| workload | c | serve req/s (p50/p95/p99 ms) | peer req/s (p50/p95/p99 ms) | "
        "ratio | of limit | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    table = []
    for workload in args.workloads.split(","):
        for level in levels:
            mine = [
                r
                for r in runs
                if (r.system, r.workload, r.concurrency) == ("serve", workload, level)
            ]
            peer = [
                r
                for r in runs
                if (r.system, r.workload, r.concurrency) == ("peer", workload, level)
            ]
            rps = float(np.median([r.rps for r in mine]))
            peer_rps = float(np.median([r.rps for r in peer]))
            ratio = float(np.median([a.rps / b.rps for a, b in zip(mine, peer, strict=True)]))
            fraction = rps / limits[workload]
            errors = sum(r.errors for r in mine + peer)

            def cell(rs: list[Run]) -> str:
                # The median over the rounds of each figure.
                rate, p50, p95, p99 = (
                    float(np.median([getattr(x, name) for x in rs]))
                    for name in ("rps", "p50_ms", "p95_ms", "p99_ms")
                )
                return f"{rate:.0f} ({p50:.0f}/{p95:.0f}/{p99:.0f})"

            print(
                f"| {workload} | {level} | {cell(mine)} | {cell(peer)} | {ratio:.2f}x | "
                f"{fraction:.0%} | {errors} |"
            )
            table.append(
                {
                    "workload": workload,
                    "concurrency": level,
                    "serve_rps": rps,
                    "peer_rps": peer_rps,
                    "ratio": ratio,
                    "fraction_of_limit": fraction,
                    "errors": errors,
                }
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"limits": limits, "runs": [asdict(r) for r in runs], "table": table}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
