"""``--rest_api_enable_cors_support``: the CORS headers and preflight answer TF Serving gives.

TF Serving (``model_servers/http_server.cc``) answers an ``OPTIONS`` request on its REST paths
itself: 200 when the ``Origin`` header holds an ``http://`` or ``https://`` origin, else 400
("Origin header is missing in CORS preflight"). With the flag, every answer on those paths, errors
included, carries ``Access-Control-Allow-Origin: *``, ``Access-Control-Allow-Methods: POST,
GET`` and ``Access-Control-Allow-Headers: Content-Type``. Here the same holds for ``/v1`` and for
the Open Inference Protocol's ``/v2``, where ``Inference-Header-Content-Length`` is allowed too
(a browser could not send a binary infer request otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_classifier.kserve_v2 import HEADER_LENGTH

_ORIGIN_RE: Final = re.compile(r"https?://")  # TF Serving's RE2::PartialMatch
_V1_HEADERS: Final = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET",
    "Access-Control-Allow-Headers": "Content-Type",
}
_V2_HEADERS: Final = {
    **_V1_HEADERS,
    "Access-Control-Allow-Headers": f"Content-Type, {HEADER_LENGTH}",
}


def _headers_for(path: str) -> dict[str, str] | None:
    if path.startswith("/v1/"):  # TF Serving's dispatcher takes /v1/.* only
        return _V1_HEADERS
    if path == "/v2" or path.startswith("/v2/"):
        return _V2_HEADERS
    return None


class CORSMiddleware:
    """Answer preflights and add the CORS headers on the API paths; ``error(status, message)``
    renders a refused preflight in the server's error shape."""

    def __init__(self, app: ASGIApp, *, error: Callable[[int, str], Response]) -> None:
        self.app = app
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cors = _headers_for(scope["path"]) if scope["type"] == "http" else None
        if cors is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            origin = Headers(scope=scope).get("origin", "")
            if _ORIGIN_RE.search(origin):
                response = Response(status_code=200, headers=cors)
            else:
                response = self.error(400, "Origin header is missing in CORS preflight")
                response.headers.update(cors)
            await response(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in cors.items():
                    headers[name] = value  # overwrite, as TF Serving does
            await send(message)

        await self.app(scope, receive, send_with_cors)
