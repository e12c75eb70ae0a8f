"""Prometheus scrape endpoint (this app's own registry)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from image_classifier.gateway.deps import MetricsDep
from image_classifier.gateway.metrics import PROMETHEUS_CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {PROMETHEUS_CONTENT_TYPE: {}}, "description": "Metrics."}},
    summary="Prometheus metrics in the text exposition format",
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)
