"""Running the gateway: ``run_gateway(settings)`` and the ``image-classifier gateway`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from image_classifier.gateway.commands import add_gateway_arguments
from image_classifier.gateway.settings import GatewaySettings, SettingsError, load_settings

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"


def logging_config(level: str) -> dict[str, Any]:
    """uvicorn's logging replaced by one format that carries the request id.

    uvicorn's own access log is off: the gateway's middleware writes one line per request with
    the id and the duration, which uvicorn's line lacks.
    """
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "image_classifier.gateway.context.RequestIdLogFilter"}},
        "formatters": {"default": {"format": LOG_FORMAT}},
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
            "image_classifier": {"handlers": ["default"], "level": upper, "propagate": False},
        },
    }


def build_server(settings: GatewaySettings) -> Any:
    """A ``uvicorn.Server`` for the gateway (``serve`` runs it beside the model server)."""
    import uvicorn

    from image_classifier.gateway.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),
        log_level=settings.log_level,
        access_log=False,
        server_header=False,
        # In-flight predictions get this long to finish on Ctrl-C / SIGTERM.
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


def run_gateway(settings: GatewaySettings) -> int:
    """Serve until interrupted; returns a process exit status (0, or 1 if start-up failed)."""
    server = build_server(settings)
    server.run()
    return 0 if server.started else 1


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    names = (
        "host",
        "port",
        "tf_serving_url",
        "backend",
        "model_base_path",
        "model_card_path",
        "model_name",
        "log_level",
    )
    return load_settings(**{name: getattr(args, name, None) for name in names})


def gateway_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``image-classifier gateway``: a Namespace from the CLI's subparser, or raw argv."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(
            prog="image-classifier gateway",
            description="Run the HTTP gateway (web page, REST API, /docs) in front of the model.",
        )
        add_gateway_arguments(parser)
        args = parser.parse_args(args)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_gateway(settings)
