"""Running the gateway in this process: uvicorn with the gateway's logging, until stopped.

The CLI's ``gateway`` and ``serve`` commands call :func:`run_gateway` / :func:`build_server`;
nothing here parses arguments or starts processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import uvicorn

from image_classifier.constants import LogFormat
from image_classifier.gateway.app import create_app
from image_classifier.gateway.context import REQUEST_ID_HEADER, accept_or_make_request_id
from image_classifier.gateway.settings import GatewaySettings
from image_classifier.webserver import ConnectionLimits, uvicorn_config

# Log lines inside a request carry its id; PLAIN_LOG_FORMAT is for lines outside any request.
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"
PLAIN_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s %(message)s"


# JSON lines carry these standard fields; the access log adds its own (method, path, status,
# duration_ms, client) as structured fields, not text to parse.
JSON_LOG_FIELDS = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"


def _formatter(log_format: LogFormat) -> dict[str, Any]:
    if log_format == "json":
        return {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_LOG_FIELDS,
            "rename_fields": {"levelname": "level", "name": "logger", "asctime": "time"},
        }
    return {"format": LOG_FORMAT}


def logging_config(level: str, log_format: LogFormat = "text") -> dict[str, Any]:
    """uvicorn's logging replaced by one format that carries the request id.

    uvicorn's own access log is off: the gateway's middleware writes one line per request with
    the id and the duration, which uvicorn's line lacks.
    """
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "image_classifier.gateway.context.RequestIdLogFilter"}},
        "formatters": {"default": _formatter(log_format)},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": upper, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            # httpx logs every request at INFO, a line per backend status check: noise unless
            # debugging.
            "httpx": {
                "handlers": ["default"],
                "level": "DEBUG" if upper == "DEBUG" else "WARNING",
                "propagate": False,
            },
            "image_classifier": {"handlers": ["default"], "level": upper, "propagate": False},
        },
    }


def _bad_request(message: str) -> tuple[bytes, dict[str, str]]:
    """The gateway's error body for a request uvicorn could not parse (no app code ran)."""
    request_id = accept_or_make_request_id(None)
    body = {"error": {"code": "bad_request", "message": message, "request_id": request_id}}
    return json.dumps(body).encode(), {REQUEST_ID_HEADER: request_id}


class GatewayServer(uvicorn.Server):
    """uvicorn's server, plus a callback once its sockets listen (``serve`` prints its URLs)."""

    def __init__(
        self, config: uvicorn.Config, on_started: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()


def build_server(
    settings: GatewaySettings, on_started: Callable[[], None] | None = None
) -> GatewayServer:
    """The gateway's server, not yet running (``serve`` runs it beside the model server)."""
    config = uvicorn_config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        limits=ConnectionLimits(
            settings.header_timeout_s, settings.body_timeout_s, settings.max_connections
        ),
        bad_request=_bad_request,
        log_config=logging_config(settings.log_level, settings.log_format),
        log_level=settings.log_level,
        access_log=False,
        # In-flight predictions get this long to finish on Ctrl-C / SIGTERM.
        timeout_graceful_shutdown=10,
    )
    return GatewayServer(config, on_started)


def run_gateway(settings: GatewaySettings) -> int:
    """Serve until interrupted; returns a process exit status (0, or 1 if start-up failed)."""
    server = build_server(settings)
    server.run()
    return 0 if server.started else 1
