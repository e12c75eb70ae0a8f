"""``image-classifier model-server``: tensorflow_model_server's flags, this package's server.

Flag names are tensorflow_model_server's (``--port``, ``--rest_api_port``, ``--model_name``,
``--model_base_path``, ``--model_config_file``, ``--file_system_poll_wait_seconds``, ...;
``--flag=value`` works too), so a command line written for TF Serving runs unchanged. Nothing
here imports TensorFlow or the web stack until the server actually starts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from image_classifier.cli._common import SubParsers, flag_bool, quiet_tensorflow
from image_classifier.constants import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_REST_API_PORT,
    LOG_LEVELS,
)
from image_classifier.model_server._batching import BatchingOptions
from image_classifier.model_server._settings import (
    DEFAULT_LOAD_RETRY_INTERVAL_SECONDS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_NUM_LOAD_RETRIES,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_POLL_WAIT_SECONDS,
    ModelServerSettings,
)

logger = logging.getLogger("image_classifier.model_server")

DESCRIPTION = (
    "Serve the exported SavedModel with TensorFlow Serving's REST API "
    "(GET /v1/models/NAME[/versions/N|/labels/L][/metadata], "
    "POST /v1/models/NAME[/versions/N|/labels/L]:predict) and its gRPC API "
    "(PredictionService, ModelService) on --port. "
    "The highest integer version under --model_base_path is served, and a newly exported "
    "version replaces it without a restart; --model_config_file serves several models with "
    "version policies and labels."
)


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "model-server",
        help="serve the SavedModel with TensorFlow Serving's REST API",
        description=DESCRIPTION,
    )
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
        help=f"name in the URLs (default {defaults.model_name}; ignored with --model_config_file)",
    )
    parser.add_argument(
        "--model_base_path",
        type=Path,
        default=defaults.model_base_path,
        help="directory holding <integer version>/saved_model.pb "
        f"(default {defaults.model_base_path}; ignored with --model_config_file)",
    )
    parser.add_argument(
        "--model_config_file",
        type=Path,
        help="ModelServerConfig text proto: several models, each with name, base_path "
        "(absolute), model_platform, model_version_policy and version_labels",
    )
    parser.add_argument(
        "--model_config_file_poll_wait_seconds",
        type=float,
        default=defaults.model_config_file_poll_wait_seconds,
        help="re-read --model_config_file this often and apply it when it changed; "
        "0: read once (default 0)",
    )
    parser.add_argument(
        "--allow_version_labels_for_unavailable_models",
        type=flag_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="let version_labels name a version that is not AVAILABLE yet, e.g. at startup "
        "(default false)",
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
        "--enable_batching",
        type=flag_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="merge concurrent requests into batched model calls (default false)",
    )
    parser.add_argument(
        "--batching_parameters_file",
        type=Path,
        help="BatchingParameters text proto (max_batch_size, batch_timeout_micros, "
        "num_batch_threads, max_enqueued_batches, allowed_batch_sizes); "
        "TF Serving's defaults without it",
    )
    parser.add_argument(
        "--monitoring_config_file",
        type=Path,
        help="MonitoringConfig text proto; with prometheus_config { enable: true } the "
        "metrics are served at its path (default /monitoring/prometheus/metrics)",
    )
    parser.add_argument(
        "--rest_api_timeout_in_ms",
        type=int,
        default=defaults.rest_api_timeout_in_ms,
        help="a predict not answered by then gets 504; 0: no deadline "
        f"(default {defaults.rest_api_timeout_in_ms})",
    )
    parser.add_argument(
        "--rest_api_enable_cors_support",
        type=flag_bool,
        nargs="?",
        const=True,
        default=defaults.rest_api_enable_cors_support,
        metavar="BOOL",
        help="answer CORS preflights (OPTIONS) and add Access-Control-Allow-* headers to REST "
        "answers (default false)",
    )
    parser.add_argument(
        "--enable_model_warmup",
        type=flag_bool,
        nargs="?",
        const=True,
        default=defaults.enable_model_warmup,
        metavar="BOOL",
        help="replay assets.extra/tf_serving_warmup_requests before a version is AVAILABLE "
        "(default true)",
    )
    parser.add_argument(
        "--tensorflow_intra_op_parallelism",
        type=int,
        default=defaults.tensorflow_intra_op_parallelism,
        help="threads one TensorFlow op may use; 0: TensorFlow picks (default 0)",
    )
    parser.add_argument(
        "--tensorflow_inter_op_parallelism",
        type=int,
        default=defaults.tensorflow_inter_op_parallelism,
        help="independent TensorFlow ops run at once; 0: TensorFlow picks (default 0)",
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
        default=DEFAULT_GRPC_PORT,
        help="gRPC port (PredictionService, ModelService) on --host; 0 only with "
        f"--grpc_socket_path (default {DEFAULT_GRPC_PORT})",
    )
    parser.add_argument(
        "--grpc_socket_path",
        default=None,
        help="also serve gRPC on this UNIX socket",
    )
    parser.add_argument(
        "--grpc_max_threads",
        type=int,
        default=defaults.grpc_max_threads,
        help=f"gRPC calls handled at once (default 4 x CPUs = {defaults.grpc_max_threads})",
    )
    parser.add_argument(
        "--enable_grpc_healthcheck_service",
        type=flag_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="serve grpc.health.v1.Health on the gRPC port (default false)",
    )
    guards = parser.add_argument_group(
        "guards (this server's own; TF Serving has no such flags)",
        "Bounds on what one client can make the server hold.",
    )
    guards.add_argument(
        "--http_header_timeout_seconds",
        type=float,
        default=defaults.http_header_timeout_seconds,
        help="close a connection whose request headers take longer "
        f"(default {defaults.http_header_timeout_seconds:g})",
    )
    guards.add_argument(
        "--http_body_timeout_seconds",
        type=float,
        default=defaults.http_body_timeout_seconds,
        help="answer 408 when a request body pauses longer "
        f"(default {defaults.http_body_timeout_seconds:g})",
    )
    guards.add_argument(
        "--max_connections",
        type=int,
        default=defaults.max_connections,
        help=f"connections served at once; beyond, 503 (default {defaults.max_connections})",
    )
    guards.add_argument(
        "--max_decoded_pixels",
        type=int,
        default=defaults.max_decoded_pixels,
        help="pixels of encoded images (serving_bytes) decoded at once and per request "
        f"(default {defaults.max_decoded_pixels:,})",
    )
    parser.add_argument(
        "--log_level",
        default="info",
        choices=LOG_LEVELS,
        help="default info; debug also logs every request",
    )
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ModelServerSettings:
    defaults = ModelServerSettings()
    if args.model_config_file is not None and (
        args.model_name != defaults.model_name or args.model_base_path != defaults.model_base_path
    ):
        # TF Serving's rule, not an error: its Docker image always passes both, so refusing
        # them would break `docker run ... --model_config_file=...` command lines.
        logger.warning("--model_name and --model_base_path are ignored with --model_config_file")
    return ModelServerSettings(
        model_name=args.model_name,
        model_base_path=args.model_base_path,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        allow_version_labels_for_unavailable_models=(
            args.allow_version_labels_for_unavailable_models
        ),
        grpc_port=args.port,
        grpc_socket_path=args.grpc_socket_path,
        grpc_max_threads=args.grpc_max_threads,
        enable_grpc_healthcheck_service=args.enable_grpc_healthcheck_service,
        host=args.host,
        rest_api_port=args.rest_api_port,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
        rest_api_num_threads=args.rest_api_num_threads,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_seconds=args.load_retry_interval_micros / 1_000_000,
        log_level=args.log_level,
        http_header_timeout_seconds=args.http_header_timeout_seconds,
        http_body_timeout_seconds=args.http_body_timeout_seconds,
        max_connections=args.max_connections,
        max_decoded_pixels=args.max_decoded_pixels,
        enable_model_warmup=args.enable_model_warmup,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        rest_api_enable_cors_support=args.rest_api_enable_cors_support,
        batching=_batching(args),
        prometheus_path=_prometheus_path(args),
        tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism,
    )


def _prometheus_path(args: argparse.Namespace) -> str | None:
    if args.monitoring_config_file is None:
        return None
    from image_classifier.tfserving.config import prometheus_path

    return prometheus_path(args.monitoring_config_file)


def _batching(args: argparse.Namespace) -> BatchingOptions | None:
    if not args.enable_batching:
        if args.batching_parameters_file is not None:
            logger.warning("--batching_parameters_file is ignored without --enable_batching")
        return None
    if args.batching_parameters_file is None:
        return BatchingOptions()  # TF Serving's defaults
    return BatchingOptions.from_file(args.batching_parameters_file)


def run(args: argparse.Namespace) -> int:
    """Blocks until the server stops; an invalid flag value is a ConfigError (one line)."""
    quiet_tensorflow(args.log_level)
    from image_classifier.model_server import run_model_server

    run_model_server(settings_from_args(args))
    return 0
