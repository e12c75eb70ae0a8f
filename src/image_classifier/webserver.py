"""What both HTTP servers (the gateway and the embedded model server) share to stay up.

Each guard exists because a hostile or broken client can otherwise hold a server's resources:

- :class:`BodyGuardMiddleware`: a request body over the limit is refused before it is read (a
  declared ``Content-Length``) or at the first byte over it (chunked), and a body that stops
  arriving for ``body_timeout_s`` is cut off with 408. Pure ASGI, because both have to act on
  body chunks as they arrive, before anything buffers them.
- :class:`GzipRequestMiddleware`: ``Content-Encoding: gzip`` bodies inflated with the same
  size limit applied to the decompressed bytes (a gzip bomb is refused, not inflated).
- :class:`HeaderTimeoutH11Protocol`: uvicorn's HTTP/1.1 protocol plus a deadline for a request's
  headers, so a client trickling headers byte by byte cannot keep a connection open forever
  (uvicorn only bounds the idle time between requests).
- :class:`SecurityHeadersMiddleware`: ``X-Content-Type-Options: nosniff`` on every response.
- :class:`SafeJSONResponse`: JSON that always encodes, even when a message echoes a lone
  surrogate a client sent (``"\\ud800"``), so that cannot turn a 400 into a 500.
- :class:`DecodeBudget`: a cap on the pixels decoded at once across requests, so a burst of
  large images waits its turn instead of multiplying peak memory; freed memory is handed back
  to the operating system afterwards (:func:`release_memory`).
- :func:`uvicorn_config`: the server settings both use (no ``server`` header, a connection cap,
  the protocol above).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import json
import logging
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import anyio
import anyio.lowlevel
import h11
import uvicorn
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from image_classifier.constants import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
)
from image_classifier.errors import OverloadedError, PayloadTooLargeError, RequestTimeoutError

logger = logging.getLogger("image_classifier.webserver")


# A JSON body and extra response headers.
BadRequestAnswer = tuple[bytes, dict[str, str]]


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send a request, and how many connections are served."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS


# Releasing a reservation this large hands freed heap memory back to the operating system.
_RELEASE_AFTER_PIXELS = 4_000_000


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps the pages of freed large buffers mapped in its arenas, so after one big decode
    a process would otherwise keep its peak RSS for good.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def freeze_heap() -> None:
    """Take every object alive now out of the garbage collector's rounds (``gc.freeze``).

    A serving process holds hundreds of thousands of long-lived objects (the model server
    ~400,000: TensorFlow's modules and the loaded graphs), and every full collection walks them
    all: 186 ms measured, a stall for every request in flight. Frozen, they are skipped and
    only what requests create is collected. Called when a server is ready and again whenever
    models are loaded or unloaded; the full collection before freezing (once, then) keeps
    garbage from being pinned for good.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class DecodeBudget:
    """At most ``capacity`` decoded pixels at once, across threads; a FIFO-fair-enough wait.

    A reservation larger than the whole budget is clamped to it (one such image decodes alone).
    Waiting longer than ``wait_s`` raises :class:`~image_classifier.errors.OverloadedError`.
    """

    def __init__(self, capacity: int, *, wait_s: float = 10.0, setting: str = "") -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.setting = setting
        self.in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        amount = max(0, min(pixels, self.capacity))
        with self._changed:
            if not self._changed.wait_for(
                lambda: self.in_use + amount <= self.capacity, timeout=self.wait_s
            ):
                raise OverloadedError(
                    f"the server is decoding other large images; retry shortly "
                    f"({self.setting or 'decode budget'}: {self.capacity:,} pixels)"
                )
            self.in_use += amount
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= amount
                self._changed.notify_all()
            if amount >= _RELEASE_AFTER_PIXELS:
                release_memory()


class SafeJSONResponse(JSONResponse):
    """Starlette's JSONResponse, falling back to ASCII escapes for text UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            # A lone surrogate from the client's JSON, echoed in a message: escape it.
            return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def too_large(size: int | None, max_bytes: int, setting: str) -> PayloadTooLargeError:
    """``size`` is the declared length, or None for a streamed body cut off at the limit."""
    body = "the request body" if size is None else f"the request body of {size:,} bytes"
    return PayloadTooLargeError(
        f"{body} is larger than the limit of {max_bytes:,} bytes ({setting})"
    )


class BodyGuardMiddleware:
    """Refuse request bodies over ``max_bytes``, or that stall, without holding more than that.

    A refusal goes through ``respond``, so each server answers in its own error shape; whatever
    the app made of a cut-off body (an error of its own) is discarded.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        setting: str,
        respond: Callable[[PayloadTooLargeError | RequestTimeoutError], Response],
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting  # the flag or variable that raises the limit, for the message
        self.respond = respond
        self.body_timeout_s = body_timeout_s

    async def _reject(
        self, exc: PayloadTooLargeError | RequestTimeoutError, scope: Scope, send: Send
    ) -> None:
        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        response = self.respond(exc)
        # The unread rest of the body is still on the socket: close rather than try to skip it.
        response.headers["Connection"] = "close"
        await response(scope, no_body, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(too_large(int(declared), self.max_bytes, self.setting), scope, send)
            return

        received = 0
        refused: PayloadTooLargeError | RequestTimeoutError | None = None
        app_responded = False

        async def guarded_receive() -> Message:
            nonlocal received, refused
            if refused is not None:
                raise refused
            try:
                with anyio.fail_after(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                refused = RequestTimeoutError(
                    f"no request body data for {self.body_timeout_s:g}s; the request was cut off"
                )
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = too_large(None, self.max_bytes, self.setting)
                    raise refused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_responded
            if refused is not None and not app_responded:
                return  # the app's answer to a cut-off body is dropped; ours follows
            if message["type"] == "http.response.start":
                app_responded = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            # Once the body is cut off, whatever the app raised follows from that.
            if refused is None or app_responded:
                raise
        if refused is not None and not app_responded:
            await self._reject(refused, scope, send)


class GzipRequestMiddleware:
    """Decompress ``Content-Encoding: gzip`` request bodies, as TF Serving does, with a cap.

    The body is inflated as it arrives, at most ``max_bytes`` of output (``setting`` names the
    flag that raises it): a small gzip bomb expanding to gigabytes is refused with 413 after
    ``max_bytes`` of work, never held in memory. A body that is not valid gzip is a 400. Both
    answers go through ``respond(status, message)``, in the server's error shape. The app then
    sees the plain body, without the Content-Encoding header. Put it inside
    :class:`BodyGuardMiddleware`, which limits the compressed bytes and their pace.
    """

    # Inflate this much per step, letting other requests run between steps: a 64 MiB body does
    # not hold the event loop for its whole decompression.
    STEP_BYTES = 1024 * 1024

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        setting: str,
        respond: Callable[[int, str], Response],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # TF Serving's test: the header contains "gzip" (so "x-gzip" and lists count too).
        if "gzip" not in headers.get("content-encoding", "").lower():
            await self.app(scope, receive, send)
            return
        try:
            body = await self._inflate(receive)
        except _GzipRefusalError as refusal:

            async def no_body() -> Message:
                return {"type": "http.disconnect"}

            response = self.respond(refusal.status, refusal.message)
            # The rest of the compressed body may still be on the socket: close the connection.
            response.headers["Connection"] = "close"
            await response(scope, no_body, send)
            return
        plain_scope = dict(scope)
        plain_scope["headers"] = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
        ] + [(b"content-length", str(len(body)).encode())]
        delivered = False

        async def plain_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, as usual

        await self.app(plain_scope, plain_receive, send)

    async def _inflate(self, receive: Receive) -> bytes:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
        parts: list[bytes] = []
        size = 0
        received_any = False
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                raise _GzipRefusalError(400, "the client disconnected during the request body")
            more_body = message.get("more_body", False)
            data = message.get("body", b"")
            received_any = received_any or bool(data)
            while True:
                if inflater.eof and data:
                    # Another gzip member follows: concatenated members are one body (RFC 1952,
                    # and gzip.decompress agrees).
                    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                limit = min(self.STEP_BYTES, self.max_bytes - size + 1)
                try:
                    chunk = inflater.decompress(data, limit)
                except zlib.error as exc:
                    raise _GzipRefusalError(
                        400, f"the request body is not valid gzip (Content-Encoding: gzip): {exc}"
                    ) from None
                size += len(chunk)
                if size > self.max_bytes:
                    raise _GzipRefusalError(
                        413,
                        f"the decompressed request body is larger than the limit of "
                        f"{self.max_bytes:,} bytes ({self.setting})",
                    )
                parts.append(chunk)
                data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
                # A full step may leave output pending even with no input left: go on until a
                # step comes back short.
                if not data and (inflater.eof or len(chunk) < limit):
                    break
                await anyio.lowlevel.checkpoint()
        if received_any and not inflater.eof:
            raise _GzipRefusalError(
                400, "the request body is not valid gzip (Content-Encoding: gzip): it is truncated"
            )
        return b"".join(parts)


class _GzipRefusalError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SecurityHeadersMiddleware:
    """``X-Content-Type-Options: nosniff`` on every response: JSON must never be sniffed as HTML.

    ``policies`` adds a Content-Security-Policy to the pages at the given paths.
    """

    def __init__(self, app: ASGIApp, policies: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.policies = dict(policies or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policies.get(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                if policy is not None:
                    headers.setdefault("Content-Security-Policy", policy)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take too long.

    The deadline starts when the connection opens and again after each response, and ends when a
    request's headers are complete; uvicorn's own keep-alive timeout still closes idle ones
    sooner. ``header_timeout_s`` is set per server by :func:`uvicorn_config`.
    """

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None
    # The server's JSON error body (and extra headers) for a message: uvicorn answers a request
    # it cannot even parse (bad Content-Length, bad chunk size...) before any app code runs.
    bad_request: Callable[[str], BadRequestAnswer] = staticmethod(
        lambda message: (json.dumps({"error": message}).encode(), {})
    )

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer, in the server's JSON error shape instead of text/plain.
        body, extra = self.bad_request(f"malformed HTTP request: {msg}")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"close"),
            *((name.encode(), value.encode()) for name, value in extra.items()),
        ]
        try:
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # the connection is past the point of an answer: just close it
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info(
                "closing a connection from %s: no complete request headers within %gs",
                f"{self.client[0]}:{self.client[1]}" if self.client else "-",
                self.header_timeout_s,
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # the headers are in; the body has its own timeout

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def uvicorn_config(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    limits: ConnectionLimits,
    bad_request: Callable[[str], BadRequestAnswer] | None = None,
    **options: Any,
) -> uvicorn.Config:
    """uvicorn's Config with the guards above; ``options`` go to uvicorn unchanged.

    ``bad_request`` renders the server's error shape for requests too malformed to reach the app
    (default: ``{"error": message}``, TF Serving's shape).
    """
    attributes: dict[str, Any] = {"header_timeout_s": limits.header_timeout_s}
    if bad_request is not None:
        attributes["bad_request"] = staticmethod(bad_request)
    protocol = type("BoundedH11Protocol", (HeaderTimeoutH11Protocol,), attributes)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        # Beyond this many connections (or requests in progress) uvicorn answers 503 at once,
        # so a flood of idle sockets cannot exhaust file descriptors.
        limit_concurrency=limits.max_connections,
        server_header=False,
        **options,
    )
