"""``create_app(settings)``: the gateway's FastAPI application, and nothing created at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from image_classifier import __version__
from image_classifier.errors import ImageClassifierError
from image_classifier.gateway.backends import Backend, create_backend
from image_classifier.gateway.context import REQUEST_ID_HEADER
from image_classifier.gateway.errors import status_for
from image_classifier.gateway.handlers import error_response, install_error_handlers
from image_classifier.gateway.metrics import GatewayMetrics
from image_classifier.gateway.middleware import ApiKeyMiddleware, RequestContextMiddleware
from image_classifier.gateway.pipeline import Pipeline
from image_classifier.gateway.routes import classes, health, metrics, model, predict, web
from image_classifier.gateway.settings import GatewaySettings
from image_classifier.webserver import (
    BodyGuardMiddleware,
    SafeJSONResponse,
    SecurityHeadersMiddleware,
    freeze_heap,
)

logger = logging.getLogger("image_classifier.gateway")

DESCRIPTION = """
Classifies pictures into the ten CIFAR-10 classes with the project's TCN.

* Upload a file to **POST /predict-image** (multipart field `file`), several to
  **POST /predict-images** (field `files`), or base64 in JSON to **POST /predict**.
* Every error has the body `{"error": {"code", "message", "request_id"}}`.
* Every response carries `X-Request-ID` (yours if you sent one).
* When an API key is configured, send it as `X-API-Key` (or `Authorization: Bearer`) to the
  prediction and model routes; health, readiness, metrics and the web page stay open.
"""


def create_app(
    settings: GatewaySettings,
    *,
    backend: Backend | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the app. ``backend`` replaces the configured one (tests); ``transport`` is handed
    to the tfserving backend's httpx client (tests use ``httpx.MockTransport``)."""
    app_metrics = GatewayMetrics()
    model_backend = backend or create_backend(settings, app_metrics, transport=transport)
    if model_backend.observer is None:
        model_backend.observer = app_metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await model_backend.start()
        freeze_heap()  # what the process holds from here on is not garbage: see freeze_heap
        logger.info(
            "gateway ready to serve model %r with the %s backend%s",
            settings.model_name,
            model_backend.kind,
            f" at {settings.tf_serving_url}" if model_backend.kind == "tfserving" else "",
        )
        try:
            yield
        finally:
            await model_backend.close()

    # FastAPIOffline serves Swagger UI's and ReDoc's files from the installed fastapi-offline
    # package: FastAPI's own /docs loads them from a CDN and is blank without internet.
    app = FastAPIOffline(
        title="image_classifier gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.settings = settings
    app.state.backend = model_backend
    app.state.metrics = app_metrics
    app.state.pipeline = Pipeline(settings, model_backend, app_metrics)

    install_error_handlers(app)
    routers = [module.router for module in (predict, classes, model, health, metrics, web)]
    for router in routers:
        app.include_router(router)
    # The routes themselves, for middleware that must know a request's route before routing
    # (metrics labels and the API key for requests refused unread).
    routes = [route for router in routers for route in router.routes]

    # Added innermost first: the request context wraps everything, so even a 413 from the body
    # limit, a 401 or a CORS preflight gets a request id, a log line and a metrics sample. The
    # API key is checked outside the body guard: a request without it is refused unread.
    app.add_middleware(
        BodyGuardMiddleware,
        max_bytes=settings.max_upload_bytes,
        setting="GATEWAY_MAX_UPLOAD_BYTES",
        respond=_refused,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key_value, routers=routers)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, metrics=app_metrics, routes=routes)
    # The API docs pages load only the gateway's own files; ReDoc's branding logo, which it
    # would fetch from its CDN, is blocked rather than leaking a request off the machine.
    docs_policy = (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'"
    )
    app.add_middleware(
        SecurityHeadersMiddleware, policies={"/docs": docs_policy, "/redoc": docs_policy}
    )
    return app


def _refused(exc: ImageClassifierError) -> JSONResponse:
    return error_response(status_for(exc), exc.code, str(exc))
