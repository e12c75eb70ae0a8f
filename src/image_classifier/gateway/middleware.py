"""Pure-ASGI middleware: request ids, access log, metrics, the last-resort 500, the API key.

Pure ASGI (not ``BaseHTTPMiddleware``) because the id goes into the response's start message
whatever produced it, a 413 from the body limit (:mod:`image_classifier.webserver`) included,
and because the API key has to be checked on the headers before the body is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_classifier.gateway.context import (
    REQUEST_ID_HEADER,
    accept_or_make_request_id,
    reset_request_id,
    set_request_id,
)
from image_classifier.gateway.deps import check_api_key, require_api_key
from image_classifier.gateway.errors import UnauthorizedError
from image_classifier.gateway.handlers import error_response, internal_error_response
from image_classifier.gateway.metrics import GatewayMetrics

logger = logging.getLogger("image_classifier.gateway")
access_logger = logging.getLogger("image_classifier.gateway.access")

# Probes hit these every few seconds; at INFO they would drown the requests that matter.
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})


def route_label(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The route template that handled (or would have handled) the request."""
    route = scope.get("route")
    if route is None:
        # Refused before routing (413 on Content-Length): find the route it was meant for.
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


class RequestContextMiddleware:
    """Request id in, id out; one access-log line and one metrics sample per request.

    Also the last resort for bugs: an exception nothing else handled becomes the JSON 500 body
    (with the request id header, which Starlette's own ServerErrorMiddleware would not add).
    """

    def __init__(
        self, app: ASGIApp, metrics: GatewayMetrics, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = accept_or_make_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        token = set_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception(
                "unhandled error on %s %s",
                scope["method"],
                scope["path"],
                extra={"request_id": request_id},
            )
            if response_started:
                raise  # half a response is out; only the server can end the connection
            status = 500
            await internal_error_response()(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = route_label(scope, self.routes)
            self.metrics.in_flight.dec()
            self.metrics.observe_request(route, scope["method"], status, elapsed)
            level = logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "-"
            duration_ms = round(elapsed * 1000, 1)
            access_logger.log(
                level,
                '%s "%s %s" %d %.1fms',
                peer,
                scope["method"],
                scope["path"],
                status,
                duration_ms,
                # Structured twins of the message's fields, for the JSON log format.
                extra={
                    "request_id": request_id,
                    "client": peer,
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": duration_ms,
                },
            )
            reset_request_id(token)


def protected_routes(routers: Sequence[APIRouter]) -> list[BaseRoute]:
    """The routes that depend on :func:`~.deps.require_api_key` (their router's or their own)."""

    def needs_key(dependencies: Sequence[Any]) -> bool:
        return any(d.dependency is require_api_key for d in dependencies)

    return [
        route
        for router in routers
        for route in router.routes
        if needs_key(router.dependencies) or needs_key(getattr(route, "dependencies", ()))
    ]


class ApiKeyMiddleware:
    """401 for a protected route without the right key, decided from the headers alone.

    An unauthenticated client must not make the gateway receive, buffer or parse a 16 MiB
    upload (or wait for one that never comes) just to be told no.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, routers: Sequence[APIRouter]) -> None:
        self.app = app
        self.api_key = api_key
        self.protected = protected_routes(routers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.api_key is None or not self._is_protected(scope):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        try:
            check_api_key(
                self.api_key,
                headers.get("x-api-key"),
                token.strip() if scheme.lower() == "bearer" else None,
            )
        except UnauthorizedError as exc:
            response = error_response(
                exc.status_code, exc.code, str(exc), headers={"Connection": "close"}
            )
            await response(scope, _no_body, send)  # the body stays unread on the socket
            return
        await self.app(scope, receive, send)

    def _is_protected(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is not Match.NONE for route in self.protected)


async def _no_body() -> Message:
    # Given to a response sent without reading the request: Starlette's responses may listen on
    # `receive` for a disconnect, which would otherwise drain the unread body.
    return {"type": "http.disconnect"}
