"""``image-classifier model-server``: tensorflow_model_server's flags, this package's server.

Flag names are tensorflow_model_server's (``--rest_api_port``, ``--model_name``,
``--model_base_path``, ``--file_system_poll_wait_seconds``, ...; ``--flag=value`` works too), so
a command line written for TF Serving's REST side runs unchanged. Nothing here imports
TensorFlow or the web stack until the server actually starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from image_classifier.model_server._settings import (
    DEFAULT_HOST,
    DEFAULT_LOAD_RETRY_INTERVAL_SECONDS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_NUM_LOAD_RETRIES,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_POLL_WAIT_SECONDS,
    DEFAULT_REST_API_PORT,
    ModelServerSettings,
)

logger = logging.getLogger("image_classifier.model_server")

DESCRIPTION = (
    "Serve the exported SavedModel with TensorFlow Serving's REST API "
    "(GET /v1/models/NAME[/versions/N][/metadata], POST /v1/models/NAME[/versions/N]:predict). "
    "The highest integer version under --model_base_path is served, and a newly exported "
    "version replaces it without a restart."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model server's flags to ``parser`` (shared by the CLI and ``python -m``)."""
    defaults = ModelServerSettings()
    parser.add_argument(
        "--rest_api_port",
        type=int,
        default=DEFAULT_REST_API_PORT,
        help=f"HTTP port (default {DEFAULT_REST_API_PORT})",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 for all)",
    )
    parser.add_argument(
        "--model_name",
        default=defaults.model_name,
        help=f"name in the URLs (default {defaults.model_name})",
    )
    parser.add_argument(
        "--model_base_path",
        type=Path,
        default=defaults.model_base_path,
        help="directory holding <integer version>/saved_model.pb "
        f"(default {defaults.model_base_path})",
    )
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=DEFAULT_POLL_WAIT_SECONDS,
        help="how often to look for new versions; 0: only at startup "
        f"(default {DEFAULT_POLL_WAIT_SECONDS:g})",
    )
    parser.add_argument(
        "--max_num_load_retries",
        type=int,
        default=DEFAULT_MAX_NUM_LOAD_RETRIES,
        help=f"retries of a version that fails to load (default {DEFAULT_MAX_NUM_LOAD_RETRIES})",
    )
    parser.add_argument(
        "--load_retry_interval_micros",
        type=int,
        default=int(DEFAULT_LOAD_RETRY_INTERVAL_SECONDS * 1_000_000),
        help="wait between load retries, microseconds (default 60 s)",
    )
    parser.add_argument(
        "--rest_api_num_threads",
        type=int,
        default=defaults.rest_api_num_threads,
        help="predict calls processed at once; others wait "
        f"(default 4 x CPUs = {defaults.rest_api_num_threads})",
    )
    parser.add_argument(
        "--max_request_bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger request bodies get 413 (default 64 MiB)",
    )
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"most examples in one request (default {DEFAULT_MAX_BATCH_SIZE})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="TF Serving's gRPC port: accepted so TF Serving command lines work, "
        "but gRPC is not served",
    )
    parser.add_argument(
        "--log_level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default info; debug also logs every request",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> ModelServerSettings:
    return ModelServerSettings(
        model_name=args.model_name,
        model_base_path=args.model_base_path,
        host=args.host,
        rest_api_port=args.rest_api_port,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
        rest_api_num_threads=args.rest_api_num_threads,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_seconds=args.load_retry_interval_micros / 1_000_000,
        log_level=args.log_level,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point for parsed ``model-server`` arguments; blocks until the server stops."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.port is not None:
        logger.warning("--port=%d ignored: this server speaks REST only (no gRPC)", args.port)
    run_model_server(settings)
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``model-server`` subcommand; its parsed args go to :func:`run_from_args`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "model-server",
        help="serve the SavedModel with TensorFlow Serving's REST API",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m image_classifier.model_server [flags]``."""
    parser = argparse.ArgumentParser(prog="image-classifier model-server", description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_model_server(settings: ModelServerSettings | None = None, **overrides: Any) -> None:
    """Serve until interrupted (SIGINT/SIGTERM shut down gracefully).

    ``run_model_server(model_base_path="saved_models/image_classifier", rest_api_port=8501)``
    works too: keyword arguments override fields of ``settings``.
    """
    import uvicorn

    from image_classifier.model_server._app import create_app

    settings = dataclasses.replace(settings or ModelServerSettings(), **overrides)
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("image_classifier").setLevel(level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.rest_api_port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
