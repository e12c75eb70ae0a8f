"""One request-body limit for both HTTP servers (the gateway and the embedded model server).

Pure ASGI, because the limit has to count body chunks as they arrive, before anything buffers
them. A declared ``Content-Length`` over the limit is refused before the body is read at all
(with ``Expect: 100-continue``, as curl sends for big bodies, the client never even sends it). A
chunked (or lying) body is counted as it streams in; at the first byte over the limit the app's
``receive`` raises, whatever the app made of that is discarded, and the refusal is sent. Each
server renders :class:`~image_classifier.errors.PayloadTooLargeError` in its own error shape
through the ``respond`` callback.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_classifier.errors import PayloadTooLargeError


def too_large(size: int | None, max_bytes: int, setting: str) -> PayloadTooLargeError:
    """``size`` is the declared length, or None for a streamed body cut off at the limit."""
    body = "the request body" if size is None else f"the request body of {size:,} bytes"
    return PayloadTooLargeError(
        f"{body} is larger than the limit of {max_bytes:,} bytes ({setting})"
    )


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` without ever holding more than that."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        setting: str,
        respond: Callable[[PayloadTooLargeError], Response],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting  # the flag or variable that raises the limit, for the message
        self.respond = respond

    async def _reject(self, exc: PayloadTooLargeError, scope: Scope, send: Send) -> None:
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
            error = too_large(int(declared), self.max_bytes, self.setting)
            await self._reject(error, scope, send)
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
                    exceeded = too_large(None, self.max_bytes, self.setting)
                    raise exceeded
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_responded
            if exceeded is not None and not app_responded:
                return  # the app's answer to a cut-off body (an error of its own) is dropped
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
