"""Running the model server in this process: REST on uvicorn and gRPC beside it, until interrupted.

The CLI's ``model-server`` command calls :func:`run_model_server`; nothing here parses
arguments. The gRPC port is bound here, before anything loads, so a busy port or a refused
``--model_config_file`` ends the command at once with one line; the app's lifespan starts
gRPC once the models are loaded and stops it with uvicorn.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from image_classifier.model_server._settings import ModelServerSettings

logger = logging.getLogger("image_classifier.model_server")


def configure_tensorflow(settings: ModelServerSettings) -> None:
    """Apply the TensorFlow thread flags; they hold for the whole process, so before any load."""
    import tensorflow as tf

    if settings.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(
            settings.tensorflow_intra_op_parallelism
        )
    if settings.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(
            settings.tensorflow_inter_op_parallelism
        )
    # Read back from TensorFlow, not from the flags: what ops will actually run with.
    logger.info(
        "TensorFlow threads: intra-op %s, inter-op %s (0: TensorFlow picks)",
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )


def run_model_server(settings: ModelServerSettings | None = None, **overrides: Any) -> None:
    """Serve until interrupted (SIGINT/SIGTERM shut down gracefully).

    ``run_model_server(model_base_path="saved_models/image_classifier", rest_api_port=8501)``
    works too: keyword arguments override fields of ``settings``.
    """
    import uvicorn

    from image_classifier.model_server._app import create_app
    from image_classifier.model_server._grpc import bind
    from image_classifier.model_server._manager import check_startup_config
    from image_classifier.webserver import ConnectionLimits, uvicorn_config

    settings = dataclasses.replace(settings or ModelServerSettings(), **overrides)
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("image_classifier").setLevel(level)
    check_startup_config(settings)
    configure_tensorflow(settings)
    config = uvicorn_config(
        create_app(settings, grpc_server=bind(settings)),
        host=settings.host,
        port=settings.rest_api_port,
        limits=ConnectionLimits(
            settings.http_header_timeout_seconds,
            settings.http_body_timeout_seconds,
            settings.max_connections,
        ),
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
