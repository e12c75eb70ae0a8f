"""``image-classifier serve``: the whole service in one command, on the embedded model server.

1. Start the embedded model server (TF-Serving-compatible REST, and gRPC on 8500) on the export
   as a child process (:class:`~image_classifier.supervisor.ModelServerProcess`) and wait until
   the model is AVAILABLE.
2. Run the gateway (tfserving backend, pointed at that child) in this process.
3. Print where everything is. The child is restarted if it dies, while the gateway answers 503
   in the meantime, then 200 again without a gateway restart.
4. On Ctrl-C or SIGTERM: stop accepting requests, let in-flight ones finish, then stop the
   child. Nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from importlib import resources
from pathlib import Path
from types import FrameType

from image_classifier.cli._common import SubParsers
from image_classifier.constants import (
    DEFAULT_GATEWAY_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_MODEL_BASE_PATH,
    DEFAULT_REST_API_PORT,
    FLIP_TTA,
    LOG_FORMATS,
    LOG_LEVELS,
    MODEL_NAME,
)
from image_classifier.errors import ModelNotFoundError, ServeError

EXIT_START_FAILED = 1


class _Stop(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="start the embedded model server and the gateway together (Ctrl-C stops both)",
        description="The whole service in one command: the TF-Serving-compatible model server "
        "on the export (restarted if it dies) and the gateway in front of it.",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"gateway interface (default {DEFAULT_HOST}; 0.0.0.0 for all)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_GATEWAY_PORT,
        help=f"gateway port (default {DEFAULT_GATEWAY_PORT})",
    )
    parser.add_argument(
        "--model-base-path",
        default=DEFAULT_MODEL_BASE_PATH,
        help=f"exported model (default {DEFAULT_MODEL_BASE_PATH})",
    )
    parser.add_argument("--model-name", default=MODEL_NAME, help=f"default {MODEL_NAME}")
    parser.add_argument(
        "--model-port",
        type=int,
        default=DEFAULT_REST_API_PORT,
        help=f"model server REST port on {DEFAULT_HOST} (default {DEFAULT_REST_API_PORT})",
    )
    parser.add_argument(
        "--model-grpc-port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help=f"model server gRPC port (TF Serving's PredictionService) on {DEFAULT_HOST} "
        f"(default {DEFAULT_GRPC_PORT})",
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
    parser.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="server-side batching in the model server, with the packaged, tuned "
        "serve_batching.config (default on)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="log level of both processes (default info; debug logs every request)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="the gateway's log lines: text, or json (one JSON object per line, for log "
        "shippers; default text)",
    )
    parser.set_defaults(func=run)


def _batching_flags(enabled: bool) -> tuple[str, ...]:
    if not enabled:
        return ()
    # The tuned parameters ship inside the package (model_server/serve_batching.config).
    config = resources.files("image_classifier.model_server").joinpath("serve_batching.config")
    return ("--enable_batching", f"--batching_parameters_file={config}")


def _tensorflow_thread_flags(version_dir: Path) -> tuple[str, ...]:
    """The tuned thread flags for an export with flip averaging; TensorFlow's own otherwise."""
    from image_classifier.servable import read_metadata, tuned_thread_counts

    try:
        card = read_metadata(version_dir)
    except (OSError, ValueError):
        card = {}
    if card.get("test_time_augmentation") != FLIP_TTA:
        return ()  # one pass per image: nothing to run side by side
    intra, inter = tuned_thread_counts()
    return (
        f"--tensorflow_intra_op_parallelism={intra}",
        f"--tensorflow_inter_op_parallelism={inter}",
    )


def _display_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "::", "") else host


def run(args: argparse.Namespace) -> int:
    from image_classifier.gateway import load_settings
    from image_classifier.gateway.server import PLAIN_LOG_FORMAT, build_server
    from image_classifier.servable import resolve_version_dir
    from image_classifier.supervisor import ModelServerProcess, check_port_free

    logging.basicConfig(level=args.log_level.upper(), format=PLAIN_LOG_FORMAT)
    if args.log_level != "debug":
        # httpx logs every request at INFO, here each readiness check of the model server.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    base_path = Path(args.model_base_path)
    try:
        version_dir = resolve_version_dir(base_path)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"{exc}; train and export a model first (`image-classifier train`), "
            "or point --model-base-path at an export"
        ) from None
    check_port_free(args.host, args.port, "gateway", "--port")
    check_port_free(DEFAULT_HOST, args.model_port, "model server", "--model-port")
    check_port_free(DEFAULT_HOST, args.model_grpc_port, "model server gRPC", "--model-grpc-port")
    settings = load_settings(
        host=args.host,
        port=args.port,
        backend="tfserving",
        tf_serving_url=f"http://{DEFAULT_HOST}:{args.model_port}",
        model_name=args.model_name,
        model_card_path=base_path,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    model = ModelServerProcess(
        model_base_path=base_path,
        model_name=args.model_name,
        port=args.model_port,
        grpc_port=args.model_grpc_port,
        restart=not args.no_restart,
        log_level=args.log_level,
        extra_args=(*_batching_flags(args.batching), *_tensorflow_thread_flags(version_dir)),
    )

    def banner() -> None:
        base = f"http://{_display_host(settings.host)}:{settings.port}"
        print(
            "\n".join(
                [
                    "",
                    f"  Web page:      {base}/",
                    f"  API docs:      {base}/docs",
                    f"  Readiness:     {base}/ready     Metrics: {base}/metrics",
                    f"  Model server:  {model.url}/v1/models/{model.model_name}  (pid {model.pid})",
                    f"  gRPC:          {DEFAULT_HOST}:{model.grpc_port}  (PredictionService)",
                    "  Press Ctrl-C to stop both.",
                    "",
                ]
            ),
            flush=True,
        )

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    print(f"Starting the model server for {version_dir} on port {args.model_port}...", flush=True)
    try:
        model.spawn()
        model.wait_until_available(args.startup_timeout)
        model.start_watchdog()
        server = build_server(settings, on_started=banner)
        server.run()
        return 0 if server.started else EXIT_START_FAILED
    except ServeError as exc:
        # After the child started: a failure to come up, not a usage error (exit 1, not 2).
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_START_FAILED
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt, _Stop):
            print("Stopping...", flush=True)
            model.stop()
            print("Stopped.", flush=True)
        signal.signal(signal.SIGTERM, previous_term)
