"""The model server's settings: one frozen dataclass, filled from tensorflow_model_server's flags.

Plain dataclass rather than pydantic-settings: the ``[serve]`` extra does not ship
pydantic-settings, and every value arrives through the command line (as with TF Serving).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from image_classifier.constants import (
    DECODE_BUDGET_PIXELS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_GRPC_PORT,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_HOST,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MODEL_BASE_PATH,
    DEFAULT_REST_API_PORT,
    MODEL_NAME,
    LogLevel,
)
from image_classifier.errors import ConfigError
from image_classifier.model_server._batching import BatchingOptions
from image_classifier.preprocess import MAX_PIXELS

# TF Serving's default: a new version is noticed within about a second of its rename into place.
DEFAULT_POLL_WAIT_SECONDS: Final = 1.0
# A 32x32x3 image is ~30-60 KB of JSON floats, so 64 MiB is ~1000 images: larger is a mistake
# or an attack, and JSON parsing needs several times the body size in memory.
DEFAULT_MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_BATCH_SIZE: Final = 1024
# TF Serving's loader defaults: retry a failing version 5 times, a minute apart.
DEFAULT_MAX_NUM_LOAD_RETRIES: Final = 5
DEFAULT_LOAD_RETRY_INTERVAL_SECONDS: Final = 60.0


def _default_num_threads() -> int:
    # TF Serving's --rest_api_num_threads default is 4 x CPUs; requests beyond this wait their turn
    # instead of all parsing 64 MiB bodies at once.
    return 4 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class ModelServerSettings:
    """Everything :func:`create_app` and :func:`run_model_server` need."""

    model_name: str = MODEL_NAME
    model_base_path: Path = field(default_factory=lambda: Path(DEFAULT_MODEL_BASE_PATH))
    host: str = DEFAULT_HOST
    rest_api_port: int = DEFAULT_REST_API_PORT
    # > 0: poll the base path this often; 0: look once at startup only (TF Serving's meaning).
    file_system_poll_wait_seconds: float = DEFAULT_POLL_WAIT_SECONDS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    rest_api_num_threads: int = field(default_factory=_default_num_threads)
    max_num_load_retries: int = DEFAULT_MAX_NUM_LOAD_RETRIES
    load_retry_interval_seconds: float = DEFAULT_LOAD_RETRY_INTERVAL_SECONDS
    log_level: LogLevel = "info"
    # Beyond TF Serving: guards against slow clients, connection floods and decode bombs.
    http_header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_S
    http_body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # TF Serving's --rest_api_timeout_in_ms: a predict not answered by then gets 504; 0: no
    # deadline (TF Serving's meaning of a value <= 0).
    rest_api_timeout_in_ms: int = 30_000
    # TF Serving's --rest_api_enable_cors_support: answer CORS preflights, add CORS headers.
    rest_api_enable_cors_support: bool = False
    # --enable_batching with --batching_parameters_file, as options (None: no batching).
    batching: BatchingOptions | None = None
    # --monitoring_config_file's prometheus_config: where metrics are served (None: nowhere).
    prometheus_path: str | None = None
    # Replay assets.extra/tf_serving_warmup_requests before a version is AVAILABLE (TF Serving's
    # default).
    enable_model_warmup: bool = True
    # Pixels of encoded images (serving_bytes) decoded at once, and at most in one request.
    max_decoded_pixels: int = DECODE_BUDGET_PIXELS
    # TF Serving's --port: the gRPC PredictionService and ModelService, on ``host``. 0 is
    # allowed only with a grpc_socket_path, as in TF Serving.
    grpc_port: int = DEFAULT_GRPC_PORT
    grpc_socket_path: str | None = None  # --grpc_socket_path: also (or only) on a UNIX socket
    grpc_max_threads: int = field(default_factory=_default_num_threads)  # TF Serving: 4 x CPUs
    enable_grpc_healthcheck_service: bool = False
    # --model_config_file (a ModelServerConfig; model_name/model_base_path are then ignored, as
    # in TF Serving), re-read every model_config_file_poll_wait_seconds (0: never).
    model_config_file: Path | None = None
    model_config_file_poll_wait_seconds: float = 0.0
    allow_version_labels_for_unavailable_models: bool = False
    # TF Serving's --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism: the
    # threads one op may use, and how many independent ops run at once (0: TensorFlow picks).
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_base_path", Path(self.model_base_path))
        if self.model_config_file is not None:
            object.__setattr__(self, "model_config_file", Path(self.model_config_file))
        problems = []
        if not self.model_name or "/" in self.model_name or ":" in self.model_name:
            problems.append(f"model_name {self.model_name!r} must be non-empty, without '/' or ':'")
        if not 0 <= self.rest_api_port <= 65535:
            problems.append(f"rest_api_port {self.rest_api_port} is not a TCP port")
        if not 0 <= self.grpc_port <= 65535:
            problems.append(f"port {self.grpc_port} is not a TCP port")
        elif self.grpc_port == 0 and not self.grpc_socket_path:
            # TF Serving's own refusal (server.cc): gRPC cannot be switched off.
            problems.append(
                "At least one of server_options.grpc_port or server_options.grpc_socket_path "
                "must be set."
            )
        elif self.grpc_port != 0 and self.grpc_port == self.rest_api_port:
            problems.append(
                f"rest_api_port cannot be the same as the gRPC port ({self.grpc_port}); "
                "use a different port for the HTTP/REST API"
            )
        if self.model_config_file_poll_wait_seconds < 0:
            problems.append("model_config_file_poll_wait_seconds must be >= 0")
        if self.rest_api_timeout_in_ms < 0:
            problems.append("rest_api_timeout_in_ms must be >= 0 (0: no deadline)")
        if self.file_system_poll_wait_seconds < 0:
            problems.append("file_system_poll_wait_seconds must be >= 0")
        if self.http_header_timeout_seconds <= 0 or self.http_body_timeout_seconds <= 0:
            problems.append("http_header_timeout_seconds and http_body_timeout_seconds must be > 0")
        if self.max_decoded_pixels < MAX_PIXELS:
            problems.append(f"max_decoded_pixels must be >= {MAX_PIXELS:,} (one largest image)")
        for name in (
            "max_request_bytes",
            "max_batch_size",
            "rest_api_num_threads",
            "max_connections",
            "grpc_max_threads",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.tensorflow_intra_op_parallelism < 0 or self.tensorflow_inter_op_parallelism < 0:
            problems.append(
                "tensorflow_intra_op_parallelism and tensorflow_inter_op_parallelism must be "
                ">= 0 (0: TensorFlow picks)"
            )
        if self.max_num_load_retries < 0 or self.load_retry_interval_seconds < 0:
            problems.append("max_num_load_retries and load_retry_interval_seconds must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))
