"""The Open Inference Protocol (KServe v2) routes, on the same port and models as the v1 API.

Models and versions are looked up through the same registry as the v1 routes, and an infer
runs through the same path as a v1 ``:predict`` (``run``, given by the app: its deadline, worker
threads, batcher and :func:`_service.run_signature`), so both APIs give the same numbers. The
wire format itself is :mod:`image_classifier.kserve_v2`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Final

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from image_classifier import kserve_v2
from image_classifier.constants import SERVING_DEFAULT
from image_classifier.model_server import _service
from image_classifier.model_server._manager import ModelRegistry
from image_classifier.model_server._monitoring import ServerMetrics
from image_classifier.model_server._service import PreparedPredict
from image_classifier.preprocess import MAX_PIXELS
from image_classifier.tfserving.errors import NotFoundError
from image_classifier.tfserving.status import AVAILABLE
from image_classifier.webserver import SafeJSONResponse

# What the app provides: read a request's body, and run a prepared predict (deadline, threads,
# batcher) returning the signature's outputs.
ReadBody = Callable[[Request], Awaitable[bytes]]
RunPrepared = Callable[
    [Request, Callable[[], PreparedPredict], int],
    Awaitable[tuple[PreparedPredict, dict[str, np.ndarray]]],
]

_SERVER_NAME: Final = "image_classifier"
# Above this many output values the response is encoded in a worker thread (as in the v1 path).
_INLINE_OUTPUT_VALUES: Final = 4096


def add_routes(app: FastAPI, *, read_body: ReadBody, run: RunPrepared) -> None:
    """Register ``/v2`` (server metadata), health, model metadata and readiness, and infer."""
    app.add_api_route("/v2", _server_metadata, methods=["GET"])
    app.add_api_route("/v2/health/live", _live, methods=["GET"])
    app.add_api_route("/v2/health/ready", _server_ready, methods=["GET"])
    for suffix in ("", "/versions/{version}"):
        base = "/v2/models/{model_name}" + suffix
        app.add_api_route(base, _model_metadata, methods=["GET"])
        app.add_api_route(base + "/ready", _model_ready, methods=["GET"])
        app.add_api_route(
            base + "/infer",
            functools.partial(_infer, read_body=read_body, run=run),
            methods=["POST"],
        )


def _models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.manager  # the registry the v1 routes use
    return models


def _is_ready(models: ModelRegistry, name: str, version: int | None) -> bool:
    try:
        models.servable(name, version)
    except NotFoundError:
        return False
    return True


async def _server_metadata(request: Request) -> Response:
    try:
        version = metadata.version("image-classifier")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        version = "0"
    return SafeJSONResponse(
        {"name": _SERVER_NAME, "version": version, "extensions": list(kserve_v2.EXTENSIONS)}
    )


async def _live(request: Request) -> Response:
    # Answering at all is being live: the event loop runs and routes requests.
    return SafeJSONResponse({"live": True})


async def _server_ready(request: Request) -> Response:
    # Ready when every configured model has a version to serve; 4xx otherwise, as the
    # protocol asks (a readiness probe only looks at the status).
    models = _models(request)
    names = models.names
    ready = bool(names) and all(_is_ready(models, name, None) for name in names)
    return SafeJSONResponse({"ready": ready}, status_code=200 if ready else 400)


async def _model_metadata(
    request: Request, model_name: str, version: str | None = None
) -> Response:
    models = _models(request)
    number = kserve_v2.parse_version(version)
    loaded = models.servable(model_name, number)
    available = sorted(
        status.version for status in models.statuses(model_name) if status.state == AVAILABLE
    )
    body = kserve_v2.model_metadata(
        model_name, available or [loaded.version], loaded.signature(SERVING_DEFAULT)
    )
    return SafeJSONResponse(body)


async def _model_ready(request: Request, model_name: str, version: str | None = None) -> Response:
    models = _models(request)
    number = kserve_v2.parse_version(version)
    if _is_ready(models, model_name, number):
        return SafeJSONResponse({"name": model_name, "ready": True})
    models.statuses(model_name, number)  # an unknown model or version: 404
    return SafeJSONResponse({"name": model_name, "ready": False}, status_code=400)


async def _infer(
    request: Request,
    model_name: str,
    version: str | None = None,
    *,
    read_body: ReadBody,
    run: RunPrepared,
) -> Response:
    # Counted and timed like a v1 predict, errors included.
    metrics: ServerMetrics = request.app.state.metrics
    with metrics.timed_request(model_name, "Predict", "REST"):
        return await _answer_infer(request, model_name, version, read_body=read_body, run=run)


async def _answer_infer(
    request: Request, model_name: str, version: str | None, *, read_body: ReadBody, run: RunPrepared
) -> Response:
    number = kserve_v2.parse_version(version)
    body = await read_body(request)
    settings = request.app.state.settings
    budget = request.app.state.decode_budget
    # What prepare() learns besides the tensors: id, outputs wanted, binary default.
    parsed: list[tuple[str | None, list[kserve_v2.RequestedOutput], bool]] = []

    def prepare() -> PreparedPredict:
        infer = kserve_v2.split_body(body, request.headers.get(kserve_v2.HEADER_LENGTH))
        # One reference for the whole request, as in v1: a version swap does not affect it.
        loaded = _models(request).servable(model_name, number)
        signature = loaded.signature(infer.signature_name(SERVING_DEFAULT))
        inputs = kserve_v2.decode_inputs(
            infer, signature, model_name=model_name, max_batch_size=settings.max_batch_size
        )
        requested = kserve_v2.requested_outputs(infer, signature, model_name=model_name)
        parsed.append((infer.id, requested, kserve_v2.binary_output_default(infer)))
        pixels = _service.check_encoded_images(
            inputs, max_image_pixels=MAX_PIXELS, max_request_pixels=budget.capacity
        )
        return PreparedPredict(loaded, signature.name, inputs, False, pixels)

    prepared, outputs = await run(request, prepare, len(body))
    request_id, requested, binary_default = parsed[0]
    encode = functools.partial(
        kserve_v2.encode_infer_response,
        model_name=model_name,
        model_version=prepared.loaded.version,
        request_id=request_id,
        outputs=outputs,
        requested=requested,
        binary_default=binary_default,
    )
    if sum(value.size for value in outputs.values()) <= _INLINE_OUTPUT_VALUES:
        content, header_length = encode()
    else:
        content, header_length = await anyio.to_thread.run_sync(
            encode, limiter=request.app.state.limiter
        )
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={kserve_v2.HEADER_LENGTH: str(header_length)},
    )
