"""Pure-ASGI middleware: request ids, access log, metrics and the last-resort 500.

Pure ASGI (not ``BaseHTTPMiddleware``) because the id goes into the response's start message
whatever produced it, a 413 from the body limit (:mod:`image_classifier.body_limit`) included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_classifier.gateway.context import (
    REQUEST_ID_HEADER,
    accept_or_make_request_id,
    reset_request_id,
    set_request_id,
)
from image_classifier.gateway.handlers import internal_error_response
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
            access_logger.log(
                level,
                '%s "%s %s" %d %.1fms',
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                scope["path"],
                status,
                elapsed * 1000,
                extra={"request_id": request_id},
            )
            reset_request_id(token)
