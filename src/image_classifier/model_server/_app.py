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
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from image_classifier.errors import ConfigError, PayloadTooLargeError, RequestTimeoutError
from image_classifier.model_server import _service, _v2
from image_classifier.model_server._batching import Batcher
from image_classifier.model_server._cors import CORSMiddleware
from image_classifier.model_server._grpc import GrpcServer, Serving
from image_classifier.model_server._manager import (
    ModelManager,
    ModelRegistry,
    build_registry,
    load_models,
    run_config_poller,
)
from image_classifier.model_server._monitoring import ServerMetrics
from image_classifier.model_server._settings import ModelServerSettings
from image_classifier.tfserving.errors import ServingError
from image_classifier.tfserving.json_tensor import encode_predict_response
from image_classifier.tfserving.rest import ApiCall, parse_path
from image_classifier.webserver import (
    BodyGuardMiddleware,
    DecodeBudget,
    GzipRequestMiddleware,
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
    settings: ModelServerSettings | None = None,
    *,
    manager: ModelManager | None = None,
    grpc_server: GrpcServer | None = None,
) -> FastAPI:
    """The model server app; nothing is loaded until the lifespan starts.

    ``manager`` replaces the one built from ``settings`` (tests inject a preloaded one).
    ``grpc_server`` (bound by :func:`._grpc.bind`) starts serving once the models are loaded
    and stops with the app.
    """
    settings = settings or ModelServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = ModelRegistry.single(manager) if manager else build_registry(settings)
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
            await anyio.to_thread.run_sync(functools.partial(load_models, model, settings))
        except ConfigError:
            raise  # a --model_config_file TF Serving would not start with either
        except Exception:  # e.g. an unreadable base path: report it, keep polling
            logger.exception("initial look at %s failed", settings.model_base_path)
        stop = threading.Event()
        pollers: list[threading.Thread] = []
        if settings.file_system_poll_wait_seconds > 0:
            pollers.append(
                threading.Thread(
                    target=model.run_poller,
                    args=(stop, settings.file_system_poll_wait_seconds),
                    name="model-server-poller",
                    daemon=True,  # a load in progress must not hold the process at exit
                )
            )
        if settings.model_config_file and settings.model_config_file_poll_wait_seconds > 0:
            pollers.append(
                threading.Thread(
                    target=run_config_poller,
                    args=(
                        model,
                        settings.model_config_file,
                        stop,
                        settings.model_config_file_poll_wait_seconds,
                    ),
                    name="model-config-poller",
                    daemon=True,
                )
            )
        for poller in pollers:
            poller.start()
        if grpc_server is not None:
            grpc_server.start(
                Serving(
                    model,
                    app.state.run_signature,
                    app.state.batcher,
                    app.state.metrics,
                    app.state.decode_budget,
                    settings,
                )
            )
        logger.info(
            "serving %s on http://%s:%d",
            settings.model_config_file
            or f"model {settings.model_name!r} from {settings.model_base_path}",
            settings.host,
            settings.rest_api_port,
        )
        try:
            yield
        finally:
            stop.set()
            if grpc_server is not None:
                await anyio.to_thread.run_sync(grpc_server.stop)
            if app.state.batcher is not None:
                await anyio.to_thread.run_sync(app.state.batcher.stop)
            for poller in pollers:
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
    # The Open Inference Protocol (KServe v2) beside it, through the same models and predict path.
    _v2.add_routes(app, read_body=_read_body, run=_run_prepared)
    # Innermost first: gzip bodies are inflated (within the same size limit) inside the guard
    # that limits the compressed bytes; CORS, outermost, marks every answer, refusals included.
    app.add_middleware(
        GzipRequestMiddleware,
        max_bytes=settings.max_request_bytes,
        setting="--max_request_bytes",
        respond=_error,
    )
    app.add_middleware(
        BodyGuardMiddleware,
        max_bytes=settings.max_request_bytes,
        setting="--max_request_bytes",
        respond=_refused,
        body_timeout_s=settings.http_body_timeout_seconds,
    )
    app.add_middleware(SecurityHeadersMiddleware)
    if settings.rest_api_enable_cors_support:
        app.add_middleware(CORSMiddleware, error=_error)
    return app


async def _prometheus(request: Request) -> Response:
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _v1(request: Request) -> Response:
    call = parse_path(request.method, request.url.path)
    if call.kind in ("status", "metadata"):
        return await _answer(request, call)
    # Predictions are counted and timed under TF Serving's metric names, errors included.
    metrics: ServerMetrics = request.app.state.metrics
    with metrics.timed_request(call.model_name, call.kind.capitalize(), "REST"):
        return await _answer(request, call)


async def _answer(request: Request, call: ApiCall) -> Response:
    settings: ModelServerSettings = request.app.state.settings
    manager: ModelRegistry = request.app.state.manager
    if call.kind == "status":
        return SafeJSONResponse(_service.model_status(manager, call))
    if call.kind == "metadata":
        return SafeJSONResponse(_service.model_metadata(manager, call))
    body = await _read_body(request)
    prepare = functools.partial(
        _service.prepare_predict,
        manager,
        call,
        body,
        max_batch_size=settings.max_batch_size,
        max_request_pixels=request.app.state.decode_budget.capacity,
    )
    prepared, outputs = await _run_prepared(request, prepare, len(body))
    encode = functools.partial(encode_predict_response, outputs, row_format=prepared.row_format)
    if sum(value.size for value in outputs.values()) <= _INLINE_OUTPUT_VALUES:
        content = encode()
    else:
        content = await anyio.to_thread.run_sync(encode, limiter=request.app.state.limiter)
    return Response(content, media_type="application/json")


async def _read_body(request: Request) -> bytes:
    try:
        return await request.body()  # BodyGuardMiddleware cuts it off at the limit
    except ClientDisconnect:
        # A body cut short by the client (or a framing error uvicorn has already answered):
        # nothing to answer and nothing broken, so no traceback in the log either.
        raise ServingError(
            "Client disconnected before the request body was complete", status="CANCELLED"
        ) from None


async def _run_prepared(
    request: Request, prepare: Callable[[], _service.PreparedPredict], body_size: int
) -> tuple[_service.PreparedPredict, dict[str, np.ndarray]]:
    """Parse (``prepare``) and run one predict within --rest_api_timeout_in_ms: v1 and v2 alike."""
    settings: ModelServerSettings = request.app.state.settings
    # 0 is TF Serving's "no deadline"; fail_after(None) and an infinite deadline mean the same.
    timeout = settings.rest_api_timeout_in_ms / 1000 or None
    deadline = time.monotonic() + (math.inf if timeout is None else timeout)
    limiter = request.app.state.limiter
    batcher: Batcher | None = request.app.state.batcher
    try:
        with anyio.fail_after(timeout):
            if body_size <= _INLINE_BODY_BYTES:
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
                outputs: dict[str, np.ndarray] = await asyncio.wrap_future(future)
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
    return prepared, outputs


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
