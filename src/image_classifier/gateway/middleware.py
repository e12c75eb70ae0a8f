"""Pure-ASGI middleware: request ids, access log, metrics, the last-resort 500, upload limit.

Pure ASGI (not ``BaseHTTPMiddleware``) because both jobs need the raw message stream: the id
goes into the response's start message whatever produced it, and the upload limit has to count
body chunks as they arrive, before anything buffers them.
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
from image_classifier.gateway.errors import (
    PayloadTooLargeError,
    error_response,
    internal_error_response,
)
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


class BodySizeLimitMiddleware:
    """413 for a request body over ``max_bytes``, without ever holding more than that.

    A declared ``Content-Length`` over the limit is refused before the body is read at all. A
    chunked (or lying) body is counted as it streams in; at the first byte over the limit the
    app's ``receive`` raises, whatever the app made of that is discarded, and the 413 is sent.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is {size}; the limit is {self.max_bytes:,} bytes "
            "(GATEWAY_MAX_UPLOAD_BYTES)"
        )

    async def _reject(self, exc: PayloadTooLargeError, scope: Scope, send: Send) -> None:
        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        # `Connection: close` because the unread rest of the body is still on the socket.
        response = error_response(
            exc.status_code, exc.code, str(exc), headers={"Connection": "close"}
        )
        await response(scope, no_body, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(self._too_large(f"{int(declared):,} bytes"), scope, send)
            return

        received = 0
        exceeded: PayloadTooLargeError | None = None
        app_responded = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded is not None:
                raise exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = self._too_large(f"over {self.max_bytes:,} bytes")
                    raise exceeded
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_responded
            if exceeded is not None and not app_responded:
                return  # the app's answer to a cut-off body (FastAPI makes it a 400) is dropped
            if message["type"] == "http.response.start":
                app_responded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            # Once the body is cut off, whatever the app raised follows from that.
            if exceeded is None or app_responded:
                raise
        if exceeded is not None and not app_responded:
            await self._reject(exceeded, scope, send)
