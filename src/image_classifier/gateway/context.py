"""The current request's id, visible to handlers, error bodies and log records alike."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Final

REQUEST_ID_HEADER: Final = "X-Request-ID"

_request_id: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)

# A client's id is echoed into logs and headers: only a short token of safe characters is kept,
# anything else (newlines, huge values) is replaced so it cannot forge log lines.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None) -> object:
    return _request_id.set(value)


def reset_request_id(token: object) -> None:
    _request_id.reset(token)  # type: ignore[arg-type]


def accept_or_make_request_id(client_value: str | None) -> str:
    if client_value and _SAFE_ID.match(client_value):
        return client_value
    return uuid.uuid4().hex


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` ("-" outside a request) for format strings to use."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get() or "-"
        return True
