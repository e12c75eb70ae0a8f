"""The ASGI app: TF Serving's REST routes on FastAPI, the model loaded in the lifespan.

One catch-all route per method takes every ``/v1/...`` path and hands it to
:func:`image_classifier.tfserving.rest.parse_path`, because TF Serving's
``/v1/models/NAME:predict`` puts a colon right after a path segment, which Starlette's path
parameters cannot express. Everything slow
(JSON parsing, TensorFlow, encoding) runs in worker threads, bounded by ``rest_api_num_threads``,
so the event loop keeps answering status probes while a big batch is computed.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from image_classifier.errors import PayloadTooLargeError, RequestTimeoutError
from image_classifier.model_server import _service
from image_classifier.model_server._manager import ModelManager, load_version
from image_classifier.model_server._settings import ModelServerSettings
from image_classifier.tfserving.errors import ServingError
from image_classifier.tfserving.rest import parse_path
from image_classifier.webserver import (
    BodyGuardMiddleware,
    DecodeBudget,
    SafeJSONResponse,
    SecurityHeadersMiddleware,
)

logger = logging.getLogger("image_classifier.model_server")

_JOIN_TIMEOUT_SECONDS = 5.0


def create_app(
    settings: ModelServerSettings | None = None, *, manager: ModelManager | None = None
) -> FastAPI:
    """The model server app; nothing is loaded until the lifespan starts.

    ``manager`` replaces the one built from ``settings`` (tests inject a preloaded one).
    """
    settings = settings or ModelServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = manager or ModelManager(
            settings.model_name,
            settings.model_base_path,
            max_num_load_retries=settings.max_num_load_retries,
            load_retry_interval_seconds=settings.load_retry_interval_seconds,
            loader=functools.partial(load_version, warmup=settings.enable_model_warmup),
        )
        app.state.manager = model
        app.state.limiter = anyio.CapacityLimiter(settings.rest_api_num_threads)
        app.state.decode_budget = DecodeBudget(
            settings.max_decoded_pixels, setting="--max_decoded_pixels"
        )
        # Like tensorflow_model_server, load before accepting connections, so "port open"
        # usually means "model AVAILABLE"; a missing or broken version still lets the server
        # start (and report it in the status endpoint) rather than exit.
        try:
            await anyio.to_thread.run_sync(model.poll)
        except Exception:  # e.g. an unreadable base path: report it, keep polling
            logger.exception("initial look at %s failed", settings.model_base_path)
        stop = threading.Event()
        poller: threading.Thread | None = None
        if settings.file_system_poll_wait_seconds > 0:
            poller = threading.Thread(
                target=model.run_poller,
                args=(stop, settings.file_system_poll_wait_seconds),
                name="model-server-poller",
                daemon=True,  # a load in progress must not hold the process at exit
            )
            poller.start()
        logger.info(
            "serving model %r from %s on http://%s:%d",
            settings.model_name,
            settings.model_base_path,
            settings.host,
            settings.rest_api_port,
        )
        try:
            yield
        finally:
            stop.set()
            if poller is not None:
                await anyio.to_thread.run_sync(
                    functools.partial(poller.join, _JOIN_TIMEOUT_SECONDS)
                )

    app = FastAPI(
        title="image_classifier model server",
        summary="TensorFlow Serving's REST API for the exported SavedModel",
        lifespan=lifespan,
        # TF Serving exposes nothing but /v1: no docs pages on the model port.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.add_exception_handler(ServingError, _serving_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/v1/{path:path}", _v1, methods=["GET", "POST"])
    app.add_middleware(
        BodyGuardMiddleware,
        max_bytes=settings.max_request_bytes,
        setting="--max_request_bytes",
        respond=_refused,
        body_timeout_s=settings.http_body_timeout_seconds,
    )
    app.add_middleware(SecurityHeadersMiddleware)
    return app


async def _v1(request: Request) -> Response:
    settings: ModelServerSettings = request.app.state.settings
    manager: ModelManager = request.app.state.manager
    call = parse_path(request.method, request.url.path)
    if call.kind == "status":
        return SafeJSONResponse(_service.model_status(manager, call))
    if call.kind == "metadata":
        return SafeJSONResponse(_service.model_metadata(manager, call))
    body = await request.body()  # BodyGuardMiddleware cuts it off at the limit
    content = await anyio.to_thread.run_sync(
        functools.partial(
            _service.predict,
            manager,
            call,
            body,
            max_batch_size=settings.max_batch_size,
            decode_budget=request.app.state.decode_budget,
        ),
        limiter=request.app.state.limiter,
    )
    return Response(content, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse({"error": message}, status_code=status, headers=headers)


def _refused(exc: PayloadTooLargeError | RequestTimeoutError) -> JSONResponse:
    # TF Serving has no body limit or body timeout, so no status for them; these are HTTP's.
    return _error(413 if isinstance(exc, PayloadTooLargeError) else 408, str(exc))


async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
    if exc.http_status >= 500:
        logger.error("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc)
    return _error(exc.http_status, exc.message)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Paths outside /v1 (404) and other methods (405), in TF Serving's error shape.
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug: its text is for the log (Starlette re-raises after this response, so uvicorn logs
    # the traceback), never for the client.
    return _error(500, "Internal error; the model server's log has the details")
