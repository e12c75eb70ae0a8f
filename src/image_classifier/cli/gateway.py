"""``image-classifier gateway``: the HTTP gateway (web page, REST API, /docs) in this process."""

from __future__ import annotations

import argparse

from image_classifier.cli._common import SubParsers, quiet_tensorflow
from image_classifier.constants import BACKENDS, LOG_FORMATS, LOG_LEVELS

# Flags that map one-to-one onto GatewaySettings fields.
_SETTINGS_FLAGS = (
    "host",
    "port",
    "tf_serving_url",
    "backend",
    "model_base_path",
    "model_card_path",
    "model_name",
    "log_level",
    "log_format",
)


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run the HTTP gateway (web page, REST API, /docs) in front of the model",
        description="Run the FastAPI gateway. Settings come from GATEWAY_* environment "
        "variables (and TF_SERVING_URL, MODEL_NAME); these flags override them.",
    )
    parser.add_argument("--host", help="interface to listen on (GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    parser.add_argument(
        "--tf-serving-url",
        help="TF Serving REST base URL (TF_SERVING_URL, default http://localhost:8501)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
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
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text, or json: one JSON object per line for log shippers (GATEWAY_LOG_FORMAT, "
        "default text)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; 0, or 1 if start-up failed (a SettingsError is one line)."""
    from image_classifier.gateway import load_settings, run_gateway

    settings = load_settings(**{name: getattr(args, name) for name in _SETTINGS_FLAGS})
    if settings.backend == "local":
        quiet_tensorflow(settings.log_level)
    return run_gateway(settings)
