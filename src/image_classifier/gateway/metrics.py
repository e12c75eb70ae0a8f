"""Prometheus metrics, one ``CollectorRegistry`` per app.

A registry per app (not prometheus_client's global one) lets several apps live in one process,
as they do in the tests, without "Duplicated timeseries" errors.

Route labels are route templates (``/predict-image``), never raw paths, so a scanner probing
random URLs cannot grow the number of series; unknown paths share the label ``unmatched``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Requests span 1 ms (health) to seconds (a 16-image batch on a busy CPU).
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BACKEND_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_http_request_duration_seconds",
            "Time from request start to the last response byte.",
            ["route", "method", "status"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_http_requests_in_flight", "Requests being handled now.", registry=r
        )
        self.backend_seconds = Histogram(
            "gateway_backend_request_duration_seconds",
            "Time spent in the model backend per operation (predict, status, metadata).",
            ["backend", "operation"],
            buckets=_BACKEND_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "gateway_backend_errors",
            "Failed backend operations, by error code (backend_unavailable, backend_timeout...).",
            ["backend", "operation", "code"],
            registry=r,
        )
        self.images_classified = Counter(
            "gateway_images_classified",
            "Images classified, by top-1 label (watch it for drift in what users send).",
            ["label"],
            registry=r,
        )
        self.top1_probability = Histogram(
            "gateway_top1_probability",
            "Top-1 probability of each classified image: a shift to the left means users send "
            "pictures the model is unsure of (drift, or a new kind of picture).",
            buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.images_rejected = Counter(
            "gateway_images_rejected",
            "Images refused before reaching the model, by error code.",
            ["code"],
            registry=r,
        )
        self.backend_batch_images = Histogram(
            "gateway_backend_batch_images",
            "Images per backend predict call (concurrent uploads are merged into one call).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.backend_batch_requests = Histogram(
            "gateway_backend_batch_requests",
            "Client requests merged into one backend predict call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.upload_bytes = Histogram(
            "gateway_image_upload_bytes",
            "Size of each uploaded image file.",
            buckets=(1e3, 1e4, 1e5, 5e5, 1e6, 2e6, 5e6, 1e7, 2e7),
            registry=r,
        )
        ProcessCollector(registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method, str(status))
        self.requests.labels(*labels).inc()
        self.request_seconds.labels(*labels).observe(seconds)

    def observe_backend(
        self, backend: str, operation: str, seconds: float, error: str | None
    ) -> None:
        self.backend_seconds.labels(backend, operation).observe(seconds)
        if error is not None:
            self.backend_errors.labels(backend, operation, error).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
