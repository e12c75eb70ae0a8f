"""FastAPI dependencies as typed aliases, so route signatures stay short."""

from __future__ import annotations

import hmac
from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from image_classifier.gateway.backends import Backend
from image_classifier.gateway.errors import UnauthorizedError, UnsupportedMediaTypeError
from image_classifier.gateway.metrics import GatewayMetrics
from image_classifier.gateway.pipeline import Pipeline
from image_classifier.gateway.settings import GatewaySettings


# Every dependency is `async def`: FastAPI runs a plain `def` one in a worker thread, a thread
# hop per dependency per request for what is an attribute lookup.
# create_app() puts these on app.state; Starlette types that state as Any.
async def get_settings(request: Request) -> GatewaySettings:
    return cast(GatewaySettings, request.app.state.settings)


async def get_backend(request: Request) -> Backend:
    return cast(Backend, request.app.state.backend)


async def get_metrics(request: Request) -> GatewayMetrics:
    return cast(GatewayMetrics, request.app.state.metrics)


async def get_pipeline(request: Request) -> Pipeline:
    return cast(Pipeline, request.app.state.pipeline)


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
BackendDep = Annotated[Backend, Depends(get_backend)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]

# auto_error=False: a missing key is our 401 in our error shape, and no key is needed at all
# when none is configured. Declaring both schemes puts an "Authorize" button in /docs.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey")
_bearer = HTTPBearer(auto_error=False, scheme_name="Bearer")


def check_api_key(expected: str | None, header_key: str | None, bearer: str | None) -> None:
    """Raise :class:`UnauthorizedError` unless the key (header or bearer token) is ``expected``.

    The one rule, used by :class:`~.middleware.ApiKeyMiddleware` on the raw headers (before any
    body is read) and by :func:`require_api_key` (which also documents the schemes in /docs).
    """
    if expected is None:
        return
    given = header_key or bearer
    if not given:
        raise UnauthorizedError("an API key is required: send it in the X-API-Key header")
    # Constant-time comparison: response timing must not reveal how much of a guess was right.
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise UnauthorizedError("the API key is not valid")


async def require_api_key(
    settings: SettingsDep,
    header_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    check_api_key(
        settings.api_key_value, header_key, bearer.credentials if bearer is not None else None
    )


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def require_multipart(request: Request) -> None:
    media = _media_type(request)
    if media != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"this route takes multipart/form-data (a file upload), not {media or 'no body'}; "
            "JSON clients can send base64 images to POST /predict"
        )


async def require_json(request: Request) -> None:
    media = _media_type(request)
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"this route takes application/json, not {media or 'no body'}; "
            "file uploads go to POST /predict-image or /predict-images"
        )
