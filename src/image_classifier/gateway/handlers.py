"""The one JSON error body of the gateway API, and the handlers that produce it.

Every error leaves the gateway as ``{"error": {"code", "message", "request_id"[, "details"]}}``,
with the status :func:`image_classifier.gateway.errors.status_for` gives it. Foreign exceptions
(FastAPI's validation errors, Starlette's HTTP errors, bugs) are mapped here, once.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from image_classifier.errors import ImageClassifierError
from image_classifier.gateway.context import current_request_id
from image_classifier.gateway.errors import GatewayError, status_for
from image_classifier.gateway.schemas import ErrorBody, ErrorInfo, ErrorResponse

logger = logging.getLogger("image_classifier.gateway")


def error_info(exc: ImageClassifierError) -> ErrorInfo:
    """The per-item error of a batch result (no request id: the response carries it)."""
    return ErrorInfo(code=exc.code, message=str(exc) or type(exc).__doc__ or exc.code)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    502: "backend_error",
    503: "service_unavailable",
    504: "backend_timeout",
}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(
            code=code, message=message, request_id=current_request_id(), details=details
        )
    )
    extra = dict(headers or {})
    if status == 401:
        extra.setdefault("WWW-Authenticate", 'ApiKey header="X-API-Key"')
    if status == 503:
        # Backends come back on their own (restart, model load); tell well-behaved clients when
        # to try again instead of letting them hammer the gateway.
        extra.setdefault("Retry-After", "5")
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=extra)


def internal_error_response() -> JSONResponse:
    return error_response(
        500,
        "internal_error",
        "internal server error; the gateway log has the details under this request id",
    )


async def _package_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageClassifierError)
    status = status_for(exc)
    if status >= 500:
        logger.warning("%s: %s", exc.code, exc)  # the whole story, for operators
    return error_response(status, exc.code, public_message(exc))


def public_message(exc: ImageClassifierError) -> str:
    """What a client is told about ``exc`` (see :attr:`GatewayError.public_message`)."""
    if isinstance(exc, GatewayError) and exc.public_message is not None:
        return exc.public_message
    return str(exc)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # The offending input is left out: it may be a whole file or a long base64 string.
    details = [
        {"loc": _loc(err.get("loc", ())), "message": err.get("msg", ""), "type": err.get("type")}
        for err in exc.errors()
    ]
    summary = "; ".join(f"{d['loc']}: {d['message']}" for d in details[:3]) or "invalid request"
    if len(details) > 3:
        summary += f" (and {len(details) - 3} more)"
    return error_response(422, "validation_error", summary, details=details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
    if status == 404:
        message = f"no route {request.method} {request.url.path}; see /docs"
    code = _STATUS_CODES.get(status, phrase.lower().replace(" ", "_").replace("-", "_"))
    return error_response(status, code, message, headers=dict(exc.headers or {}))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return internal_error_response()


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the one JSON body; never a bare HTML or text error page."""
    app.add_exception_handler(ImageClassifierError, _package_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error body for each status."""
    described = {
        400: "The image content is unusable (not an image, truncated, too many pixels...).",
        401: "API key missing or wrong.",
        413: "Request body over the upload limit, or too many images.",
        415: "Wrong content type for this route, or a file that is declared not to be an image.",
        422: "Malformed request: a field is missing or out of range.",
        502: "The model backend answered something unusable.",
        503: "The model backend is unreachable or the model is not loaded.",
        504: "The model backend timed out.",
    }
    return {
        status: {"model": ErrorResponse, "description": described.get(status, "Error.")}
        for status in statuses
    }
