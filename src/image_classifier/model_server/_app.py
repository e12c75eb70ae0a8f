"""The ASGI app: TF Serving's REST routes on FastAPI, the model loaded in the lifespan.

One catch-all route per method takes every ``/v1/...`` path and hands it to
:func:`image_classifier.tfserving.rest.parse_path`, because TF Serving's
``/v1/models/NAME:predict`` puts a colon right after a path segment, which Starlette's path
parameters cannot express. Everything slow
(JSON parsing, TensorFlow, encoding) runs in worker threads, bounded by ``rest_api_num_threads``,
so the event loop keeps answering status probes while a big batch is computed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from image_classifier.errors import PayloadTooLargeError, RequestTimeoutError
from image_classifier.model_server import _service
from image_classifier.model_server._batching import Batcher
from image_classifier.model_server._manager import ModelManager, load_version
from image_classifier.model_server._monitoring import ServerMetrics
from image_classifier.model_server._settings import ModelServerSettings
from image_classifier.tfserving.errors import ServingError
from image_classifier.tfserving.json_tensor import encode_predict_response
from image_classifier.tfserving.rest import ApiCall, parse_path
from image_classifier.webserver import (
    BodyGuardMiddleware,
    DecodeBudget,
    SafeJSONResponse,
    SecurityHeadersMiddleware,
)

logger = logging.getLogger("image_classifier.model_server")

_JOIN_TIMEOUT_SECONDS = 5.0
# Below these sizes parsing a request or writing an answer takes well under a millisecond, less
# than handing it to a worker thread and back; larger ones go to threads so the event loop keeps
# answering while a 64 MiB body is parsed.
_INLINE_BODY_BYTES = 64 * 1024
_INLINE_OUTPUT_VALUES = 4096


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
        app.state.run_signature = functools.partial(
            _service.run_signature,
            app.state.decode_budget,
            app.state.metrics,
            settings.model_name,
        )
        app.state.batcher = None
        if settings.batching is not None:
            app.state.batcher = Batcher(
                settings.batching, app.state.run_signature, observer=app.state.metrics
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
            if app.state.batcher is not None:
                await anyio.to_thread.run_sync(app.state.batcher.stop)
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
    app.state.metrics = ServerMetrics()
    if settings.prometheus_path is not None:
        app.add_api_route(
            settings.prometheus_path, _prometheus, methods=["GET"], include_in_schema=False
        )
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


async def _prometheus(request: Request) -> Response:
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _v1(request: Request) -> Response:
    call = parse_path(request.method, request.url.path)
    if call.kind in ("status", "metadata"):
        return await _answer(request, call)
    # Predictions are counted and timed under TF Serving's metric names, errors included.
    started = time.perf_counter()
    status = "OK"
    try:
        return await _answer(request, call)
    except ServingError as exc:
        status = exc.status
        raise
    except Exception:
        status = "INTERNAL"
        raise
    finally:
        metrics: ServerMetrics = request.app.state.metrics
        micros = (time.perf_counter() - started) * 1e6
        metrics.observe_request(call.model_name, status, call.kind.capitalize(), "REST", micros)


async def _answer(request: Request, call: ApiCall) -> Response:
    settings: ModelServerSettings = request.app.state.settings
    manager: ModelManager = request.app.state.manager
    if call.kind == "status":
        return SafeJSONResponse(_service.model_status(manager, call))
    if call.kind == "metadata":
        return SafeJSONResponse(_service.model_metadata(manager, call))
    try:
        body = await request.body()  # BodyGuardMiddleware cuts it off at the limit
    except ClientDisconnect:
        # A body cut short by the client (or a framing error uvicorn has already answered):
        # nothing to answer and nothing broken, so no traceback in the log either.
        raise ServingError(
            "Client disconnected before the request body was complete", status="CANCELLED"
        ) from None
    timeout = settings.rest_api_timeout_in_ms / 1000
    deadline = time.monotonic() + timeout
    limiter = request.app.state.limiter
    budget = request.app.state.decode_budget
    batcher: Batcher | None = request.app.state.batcher
    prepare = functools.partial(
        _service.prepare_predict,
        manager,
        call,
        body,
        max_batch_size=settings.max_batch_size,
        max_request_pixels=budget.capacity,
    )
    try:
        with anyio.fail_after(timeout):
            if len(body) <= _INLINE_BODY_BYTES:
                prepared = prepare()  # a few kB of JSON: cheaper than a thread hop
            else:
                prepared = await anyio.to_thread.run_sync(prepare, limiter=limiter)
            if batcher is not None:
                future = batcher.submit(
                    prepared.loaded,
                    prepared.signature_name,
                    prepared.inputs,
                    pixels=prepared.pixels,
                    deadline=deadline,
                )
                outputs = await asyncio.wrap_future(future)
            else:
                outputs = await anyio.to_thread.run_sync(
                    functools.partial(
                        request.app.state.run_signature,
                        prepared.loaded,
                        prepared.signature_name,
                        prepared.inputs,
                        prepared.pixels,
                    ),
                    limiter=limiter,
                    abandon_on_cancel=True,  # the client gets its answer at the deadline
                )
    except TimeoutError:
        raise ServingError(
            f"Request timed out after {settings.rest_api_timeout_in_ms} ms "
            "(--rest_api_timeout_in_ms)",
            status="DEADLINE_EXCEEDED",
        ) from None
    encode = functools.partial(encode_predict_response, outputs, row_format=prepared.row_format)
    if sum(value.size for value in outputs.values()) <= _INLINE_OUTPUT_VALUES:
        content = encode()
    else:
        content = await anyio.to_thread.run_sync(encode, limiter=limiter)
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
