"""Server-side batching, the compact wire, warmup and monitoring of the embedded model server.

The scheduler's rules are pinned on :class:`Batcher` itself with a recording run function (the
model is not the point there); the rest runs against the model server as a real process.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from image_classifier.constants import MODEL_NAME, PIXELS_BYTES, SERVING_PIXELS, WARMUP_FILE
from image_classifier.model_server._batching import Batcher, BatchingOptions
from image_classifier.tfserving.errors import InvalidArgumentError, ServingError

PREDICT = f"/v1/models/{MODEL_NAME}:predict"


class Recorder:
    """A run function that doubles its input and remembers every batch it was given."""

    def __init__(self, delay_s: float = 0.0, poison: float | None = None) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(
        self, loaded: Any, signature: str, inputs: Mapping[str, np.ndarray], pixels: int
    ) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self.lock:
            self.batches.append(len(x))
        time.sleep(self.delay_s)
        if self.poison is not None and (x == self.poison).any():
            raise InvalidArgumentError("poisoned input")
        return {"y": x * 2}


def _options(**overrides: Any) -> BatchingOptions:
    values = {
        "max_batch_size": 8,
        "batch_timeout_micros": 50_000,
        "num_batch_threads": 1,
        "max_enqueued_batches": 4,
        "allowed_batch_sizes": (2, 4, 8),
    }
    return BatchingOptions(**{**values, **overrides})


def _submit(batcher: Batcher, value: float, rows: int = 1, deadline_s: float = 10.0) -> Any:
    inputs = {"x": np.full((rows, 3), value, dtype=np.float32)}
    return batcher.submit(
        "version", "serving_default", inputs, deadline=time.monotonic() + deadline_s
    )


def test_concurrent_tasks_are_merged_padded_and_split_back() -> None:
    recorder = Recorder()
    batcher = Batcher(_options(), recorder)
    try:
        futures = [_submit(batcher, float(i)) for i in range(3)]
        results = [f.result(timeout=5)["y"] for f in futures]
    finally:
        batcher.stop()

    assert recorder.batches == [4]  # 3 tasks in one call, padded to the allowed size 4
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, np.full((1, 3), 2.0 * i))


def test_a_full_batch_runs_without_waiting_for_the_timeout() -> None:
    recorder = Recorder()
    batcher = Batcher(_options(batch_timeout_micros=5_000_000), recorder)
    try:
        started = time.monotonic()
        futures = [_submit(batcher, 1.0, rows=4) for _ in range(2)]
        for future in futures:
            future.result(timeout=5)
        elapsed = time.monotonic() - started
    finally:
        batcher.stop()

    assert recorder.batches == [8]
    assert elapsed < 2.0  # not the 5 s timeout


def test_a_task_larger_than_the_batch_is_refused() -> None:
    batcher = Batcher(_options(), Recorder())
    try:
        with pytest.raises(InvalidArgumentError, match="Task size 9 is larger than maximum"):
            _submit(batcher, 1.0, rows=9)
    finally:
        batcher.stop()


def test_a_full_queue_answers_unavailable_at_once() -> None:
    recorder = Recorder(delay_s=0.5)
    batcher = Batcher(_options(max_enqueued_batches=1, batch_timeout_micros=0), recorder)
    try:
        running = _submit(batcher, 1.0, rows=8)  # taken by the only thread, which sleeps
        time.sleep(0.1)
        queued = _submit(batcher, 1.0, rows=8)  # fills the one allowed batch
        started = time.monotonic()
        with pytest.raises(ServingError) as refused:
            _submit(batcher, 1.0, rows=1)
        waited = time.monotonic() - started
        running.result(timeout=5)
        queued.result(timeout=5)
    finally:
        batcher.stop()

    assert refused.value.status == "UNAVAILABLE"
    assert refused.value.http_status == 503
    assert "queue" in str(refused.value) and waited < 0.1


def test_one_bad_request_fails_alone() -> None:
    recorder = Recorder(poison=-1.0)
    batcher = Batcher(_options(), recorder)
    try:
        good = [_submit(batcher, 1.0), _submit(batcher, 2.0)]
        bad = _submit(batcher, -1.0)
        answers = [f.result(timeout=5)["y"][0, 0] for f in good]
        with pytest.raises(InvalidArgumentError, match="poisoned"):
            bad.result(timeout=5)
    finally:
        batcher.stop()

    assert answers == [2.0, 4.0]
    assert recorder.batches[0] == 4  # tried together first, then one by one


def test_a_task_past_its_deadline_is_not_run() -> None:
    recorder = Recorder()
    batcher = Batcher(_options(batch_timeout_micros=300_000), recorder)
    try:
        late = _submit(batcher, 1.0, deadline_s=0.05)
        with pytest.raises(ServingError) as exceeded:
            late.result(timeout=5)
    finally:
        batcher.stop()

    assert exceeded.value.status == "DEADLINE_EXCEEDED"
    assert recorder.batches == []


def test_options_come_from_tf_servings_text_proto(tmp_path: Path) -> None:
    config = tmp_path / "batching.config"
    config.write_text(
        "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 1500 }\n"
        "num_batch_threads { value: 2 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16\n"
    )
    options = BatchingOptions.from_file(config)

    assert (options.max_batch_size, options.batch_timeout_micros) == (16, 1500)
    assert (options.num_batch_threads, options.max_enqueued_batches) == (2, 10)
    assert options.allowed_batch_sizes == (8, 16)


# --- the model server as a process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_export: Callable[..., Any],
    start_model_server: Callable[..., Any],
) -> Any:
    directory = tmp_path_factory.mktemp("batching")
    base = directory / MODEL_NAME
    tiny_export(base, version=1)
    batching = directory / "batching.config"
    batching.write_text(
        "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 20000 }\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 8 }\n"
        "allowed_batch_sizes: 8\nallowed_batch_sizes: 32\n"
    )
    monitoring = directory / "monitoring.config"
    monitoring.write_text(
        'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }'
    )
    return start_model_server(
        base,
        "--enable_batching",
        "--batching_parameters_file",
        str(batching),
        "--monitoring_config_file",
        str(monitoring),
    )


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in metrics"
    return float(match.group(1))


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_answered_exactly(
    batching_server: Any, gateway_servable: Any
) -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    expected = gateway_servable.predict(images.astype(np.float32) / 255)

    def send(index: int) -> np.ndarray:
        body = {"instances": (images[index : index + 1].astype(np.float32) / 255).tolist()}
        response = httpx.post(f"{batching_server.url}{PREDICT}", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["predictions"], dtype=np.float32)[0]

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(send, range(24)))
    metrics = httpx.get(f"{batching_server.url}/monitoring/prometheus/metrics", timeout=10).text

    np.testing.assert_allclose(np.stack(answers), expected, atol=1e-5)
    runs = _metric(metrics, ":tensorflow:serving:batching_session:wrapped_run_count")
    assert runs < 24  # merged: fewer model calls than requests
    ok = _metric(
        metrics, ":tensorflow:serving:request_count", f'model_name="{MODEL_NAME}",status="OK"'
    )
    assert ok >= 24
    assert ":tensorflow:serving:request_latency_bucket" in metrics
    assert ":tensorflow:serving:batching_session:queuing_latency_count" in metrics


@pytest.mark.slow
def test_errors_are_counted_by_status(batching_server: Any) -> None:
    url = f"{batching_server.url}{PREDICT}"
    httpx.post(url, content=b"{", timeout=10)
    metrics = httpx.get(f"{batching_server.url}/monitoring/prometheus/metrics", timeout=10).text

    status = f'model_name="{MODEL_NAME}",status="INVALID_ARGUMENT"'
    assert _metric(metrics, ":tensorflow:serving:request_count", status) >= 1


@pytest.mark.slow
def test_the_compact_wire_gives_the_float_paths_answers_in_under_5_kb(
    batching_server: Any,
) -> None:
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    compact = {
        "signature_name": SERVING_PIXELS,
        "instances": [{"b64": base64.b64encode(p.tobytes()).decode()} for p in pixels],
    }
    floats = {"instances": (pixels.astype(np.float32) / 255).tolist()}
    body = httpx.Request("POST", "http://x", json=compact).content

    a = httpx.post(f"{batching_server.url}{PREDICT}", json=compact, timeout=30)
    b = httpx.post(f"{batching_server.url}{PREDICT}", json=floats, timeout=30)

    assert len(body) / len(pixels) <= 5_000
    assert a.status_code == b.status_code == 200, a.text
    np.testing.assert_allclose(a.json()["predictions"], b.json()["predictions"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_wrong_size_pixel_string_is_a_400(batching_server: Any) -> None:
    short = base64.b64encode(b"\0" * (PIXELS_BYTES - 1)).decode()
    body = {"signature_name": SERVING_PIXELS, "instances": [{"b64": short}]}

    response = httpx.post(f"{batching_server.url}{PREDICT}", json=body, timeout=30)

    assert response.status_code == 400, response.text


@pytest.mark.slow
def test_the_warmup_file_is_replayed_before_the_version_is_available(batching_server: Any) -> None:
    assert (batching_server.base_path / "1" / WARMUP_FILE).is_file()
    assert "replayed 3 warmup requests" in batching_server.log()


@pytest.mark.slow
def test_a_version_with_a_broken_warmup_file_does_not_load(
    tmp_path: Path, tiny_export: Callable[..., Any]
) -> None:
    from image_classifier.model_server._manager import load_version
    from image_classifier.tfserving.warmup import WarmupError

    version = tiny_export(tmp_path / MODEL_NAME, version=1)
    (version / WARMUP_FILE).write_bytes(b"not a tfrecord at all")

    with pytest.raises(WarmupError, match="TFRecord"):
        load_version(version)


def test_serve_runs_the_model_server_with_the_packaged_batching_parameters() -> None:
    from image_classifier.cli import build_parser
    from image_classifier.cli.serve import _batching_flags

    args = build_parser().parse_args(["serve"])
    flags = _batching_flags(args.batching)
    config = Path(flags[1].removeprefix("--batching_parameters_file="))
    options = BatchingOptions.from_file(config)

    assert flags[0] == "--enable_batching"
    assert (options.max_batch_size, options.num_batch_threads) == (64, 1)
    assert _batching_flags(build_parser().parse_args(["serve", "--no-batching"]).batching) == ()
