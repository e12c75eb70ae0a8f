"""The ``gateway``, ``serve`` and ``predict`` subcommands: their flags, and nothing heavy.

Only argparse and the package's constants are imported here, so ``image-classifier train`` on a
machine without the gateway's extras still builds its parser; FastAPI, httpx and friends load
when one of these commands actually runs.

    from image_classifier.gateway.commands import add_cli
    add_cli(subparsers)      # registers gateway, serve and predict with set_defaults(func=...)
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Final

from image_classifier.constants import DEFAULT_MODEL_BASE_PATH, MODEL_NAME

DEFAULT_GATEWAY_URL: Final = "http://localhost:8000"
DEFAULT_MODEL_PORT: Final = 8501
LOG_LEVELS: Final = ["critical", "error", "warning", "info", "debug"]


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``image-classifier gateway``; each overrides its environment variable."""
    parser.add_argument("--host", help="interface to listen on (GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    parser.add_argument(
        "--tf-serving-url",
        help="TF Serving REST base URL (TF_SERVING_URL, default http://localhost:8501)",
    )
    parser.add_argument(
        "--backend",
        choices=["tfserving", "local"],
        help="tfserving (default) or local: load the SavedModel in-process (GATEWAY_BACKEND)",
    )
    parser.add_argument(
        "--model-base-path", help="export loaded by the local backend (GATEWAY_MODEL_BASE_PATH)"
    )
    parser.add_argument(
        "--model-card-path",
        help="tfserving backend: the served export, for GET /model's card "
        "(GATEWAY_MODEL_CARD_PATH)",
    )
    parser.add_argument("--model-name", help="model name in TF Serving (MODEL_NAME)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="GATEWAY_LOG_LEVEL, default info")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="gateway interface (default 127.0.0.1; 0.0.0.0 for all)"
    )
    parser.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    parser.add_argument(
        "--model-base-path",
        default=DEFAULT_MODEL_BASE_PATH,
        help=f"exported model (default {DEFAULT_MODEL_BASE_PATH})",
    )
    parser.add_argument("--model-name", default=MODEL_NAME, help=f"default {MODEL_NAME}")
    parser.add_argument(
        "--model-port",
        type=int,
        default=DEFAULT_MODEL_PORT,
        help=f"model server REST port on 127.0.0.1 (default {DEFAULT_MODEL_PORT})",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for the model to load (default 180)",
    )
    parser.add_argument(
        "--no-restart", action="store_true", help="do not restart the model server if it dies"
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument(
        "--url",
        default=os.environ.get("GATEWAY_URL", DEFAULT_GATEWAY_URL),
        help=f"gateway base URL (GATEWAY_URL, default {DEFAULT_GATEWAY_URL})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=3,
        choices=range(1, 11),
        metavar="K",
        help="classes to show per image, 1-10 (default 3)",
    )
    parser.add_argument("--json", action="store_true", help="print the answers as one JSON array")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GATEWAY_API_KEY") or None,
        help="sent as X-API-Key when the gateway requires one (GATEWAY_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")


def _run_gateway(args: argparse.Namespace) -> int:
    from image_classifier.gateway.run import gateway_main

    return gateway_main(args)


def _run_serve(args: argparse.Namespace) -> int:
    from image_classifier.gateway.serve import serve_main

    return serve_main(args)


def _run_predict(args: argparse.Namespace) -> int:
    from image_classifier.gateway.cli_client import predict_main

    return predict_main(args)


def add_cli(subparsers: Any) -> None:
    """Register ``gateway``, ``serve`` and ``predict``; each sets ``func(args) -> exit status``."""
    gateway = subparsers.add_parser(
        "gateway",
        help="run the HTTP gateway (web page, REST API, /docs) in front of the model",
        description="Run the FastAPI gateway. Settings come from GATEWAY_* environment "
        "variables (and TF_SERVING_URL, MODEL_NAME); these flags override them.",
    )
    add_gateway_arguments(gateway)
    gateway.set_defaults(func=_run_gateway)

    serve = subparsers.add_parser(
        "serve",
        help="start the embedded model server and the gateway together (Ctrl-C stops both)",
        description="The whole service in one command: the TF-Serving-compatible model server "
        "on the export (restarted if it dies) and the gateway in front of it.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=_run_serve)

    predict = subparsers.add_parser(
        "predict",
        help="classify image files with a running gateway",
        description="Send each IMAGE to the gateway's /predict-image and print its top classes. "
        "Exit status: 0 all classified, 1 some image refused, 3 gateway unreachable.",
    )
    add_predict_arguments(predict)
    predict.set_defaults(func=_run_predict)
