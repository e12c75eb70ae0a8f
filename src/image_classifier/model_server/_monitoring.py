"""Prometheus metrics under TF Serving's names (``--monitoring_config_file``).

TF Serving exports its TensorFlow monitoring metrics with ``/`` turned into ``:``
(``/tensorflow/serving/request_count`` -> ``:tensorflow:serving:request_count``), counters
without a ``_total`` suffix and samplers as histograms with their own bucket bounds. The same
names, labels and buckets here let one Prometheus configuration and one set of dashboards
serve both servers:

- ``:tensorflow:serving:request_count{model_name, status}``
- ``:tensorflow:serving:request_latency{model_name, API, entrypoint}`` (microseconds)
- ``:tensorflow:serving:runtime_latency{model_name, API, runtime}`` (microseconds)
- ``:tensorflow:serving:batching_session:queuing_latency{thread_pool_name}`` (microseconds)
- ``:tensorflow:serving:batching_session:wrapped_run_count``
- ``:tensorflow:serving:batching_session:processed_batch_size`` (examples per batch run,
  padding included; TF Serving keeps this one as a percentile metric, here a histogram)

Built on prometheus_client's metric families in a collector of its own, because its ready-made
Counter would add the ``_total`` suffix TF Serving's names do not have.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from image_classifier.model_server._batching import BatchObserver
from image_classifier.tfserving.errors import ServingError


def _exponential(scale: float, growth: float, count: int) -> tuple[float, ...]:
    # tensorflow::monitoring::Buckets::Exponential: scale * growth^i, then +Inf.
    return tuple(scale * growth**i for i in range(count - 1))


LATENCY_BUCKETS: Final = _exponential(10, 1.8, 33)
QUEUING_BUCKETS: Final = _exponential(100, 1.2, 52)
BATCH_SIZE_BUCKETS: Final = _exponential(1, 2, 15)
BATCH_THREAD_POOL: Final = "batch_threads"


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return cumulative


class ServerMetrics(BatchObserver, Collector):
    """The model server's metrics; thread-safe, observed from request and batch threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._request_latency: dict[tuple[str, str, str], _Histogram] = {}
        self._runtime_latency: dict[tuple[str, str, str], _Histogram] = {}
        self._queuing = _Histogram(QUEUING_BUCKETS)
        self._batch_sizes = _Histogram(BATCH_SIZE_BUCKETS)
        self._wrapped_runs = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # --- observations ---------------------------------------------------------------------------

    def observe_request(
        self, model_name: str, status: str, api: str, entrypoint: str, micros: float
    ) -> None:
        with self._lock:
            key = (model_name, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            histogram = self._request_latency.setdefault(
                (model_name, api, entrypoint), _Histogram(LATENCY_BUCKETS)
            )
            histogram.observe(micros)

    @contextmanager
    def timed_request(self, model_name: str, api: str, entrypoint: str) -> Iterator[None]:
        """Count and time the request in the block under TF Serving's names, errors included
        (a :class:`ServingError` by its canonical status, anything else as INTERNAL)."""
        started = time.perf_counter()
        status = "OK"
        try:
            yield
        except ServingError as exc:
            status = exc.status
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            micros = (time.perf_counter() - started) * 1e6
            self.observe_request(model_name, status, api, entrypoint, micros)

    def observe_runtime(self, model_name: str, api: str, micros: float) -> None:
        with self._lock:
            histogram = self._runtime_latency.setdefault(
                (model_name, api, "TF2"), _Histogram(LATENCY_BUCKETS)
            )
            histogram.observe(micros)

    def observe_queuing(self, micros: float) -> None:
        with self._lock:
            self._queuing.observe(micros)

    def observe_batch(self, signature_name: str, tasks: int, size: int, padded: int) -> None:
        with self._lock:
            self._wrapped_runs += 1
            self._batch_sizes.observe(padded)

    # --- exposition -----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            requests = Metric(
                ":tensorflow:serving:request_count", "The total number of requests.", "counter"
            )
            for (model, status), count in sorted(self._requests.items()):
                requests.add_sample(
                    ":tensorflow:serving:request_count",
                    {"model_name": model, "status": status},
                    count,
                )
            yield requests
            yield self._histograms(
                ":tensorflow:serving:request_latency",
                "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
                ["model_name", "API", "entrypoint"],
                self._request_latency,
            )
            yield self._histograms(
                ":tensorflow:serving:runtime_latency",
                "Distribution of wall time (in microseconds) for Tensorflow runtime.",
                ["model_name", "API", "runtime"],
                self._runtime_latency,
            )
            yield self._histograms(
                ":tensorflow:serving:batching_session:queuing_latency",
                "Distribution of wall time spent (in microseconds) in queuing",
                ["thread_pool_name"],
                {(BATCH_THREAD_POOL,): self._queuing} if self._queuing.total else {},
            )
            runs = Metric(
                ":tensorflow:serving:batching_session:wrapped_run_count",
                "Total count of run calls on the wrapped session",
                "counter",
            )
            runs.add_sample(
                ":tensorflow:serving:batching_session:wrapped_run_count", {}, self._wrapped_runs
            )
            yield runs
            yield self._histograms(
                ":tensorflow:serving:batching_session:processed_batch_size",
                "Tracks the batch size distribution on processing.",
                [],
                {(): self._batch_sizes} if self._wrapped_runs else {},
            )

    @staticmethod
    def _histograms(
        name: str,
        documentation: str,
        labels: list[str],
        cells: Mapping[Any, _Histogram],
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=labels)
        for values, histogram in sorted(cells.items()):
            family.add_metric(list(values), histogram.buckets(), histogram.total)
        return family

    def render(self) -> bytes:
        return generate_latest(self.registry)
