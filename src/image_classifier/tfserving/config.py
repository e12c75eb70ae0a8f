"""Read TensorFlow Serving's text-proto config files the way the model server reads them.

TF Serving parses ``--model_config_file``, ``--batching_parameters_file`` and
``--monitoring_config_file`` as protobuf text format into its own messages (``ModelServerConfig``,
``BatchingParameters``, ``MonitoringConfig``) and refuses to start on an unknown field or a value
of the wrong type. ``ModelServerConfig`` is parsed with TF Serving's own generated type from the
``tensorflow-serving-api`` package it publishes, so a field renamed or retyped upstream shows up
as a parse error when the pinned version moves. That wheel does not ship the other two; they are
declared in :mod:`._config_messages` with TF Serving's names and types, and parsed by the same
protobuf text parser.

``tensorflow_serving`` (and protobuf's text parser) are imported inside the functions, so
importing this module stays cheap for code that never reads a config.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from image_classifier.errors import ConfigError

__all__ = [
    "ConfigError",
    "ModelEntry",
    "VersionPolicy",
    "model_entries",
    "parse_batching_parameters",
    "parse_model_server_config",
    "parse_monitoring_config",
    "read_model_server_config",
    "read_text_proto",
    "validate_batching_parameters",
]

# The generated tensorflow_serving modules ship no type stubs: their messages are Any to mypy.
Message = TypeVar("Message")

# What the scheduler uses when max_batch_size is left out (TF's BatchScheduler QueueOptions
# input_batch_size_limit); TF Serving compares the last allowed batch size against it then.
DEFAULT_MAX_BATCH_SIZE = 1000


def _message_class(module: str, name: str) -> Any:
    # import_module rather than an import statement: lazy, and typed as Any without a stub.
    return getattr(importlib.import_module(module), name)


def _parse(text: str, message: Any, source: str) -> Any:
    # Untyped unless types-protobuf is installed; the project does not depend on it.
    from google.protobuf import text_format  # type: ignore[import-untyped, unused-ignore]

    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as exc:
        # protobuf's message already says line:column and what is wrong; the chained traceback
        # would only add parser internals.
        raise ConfigError(f"{source}: {exc}") from None


def parse_model_server_config(text: str, source: str = "<text>") -> Any:
    """``--model_config_file`` contents as a ``tensorflow.serving.ModelServerConfig``."""
    cls = _message_class("tensorflow_serving.config.model_server_config_pb2", "ModelServerConfig")
    return _parse(text, cls(), source)


def parse_batching_parameters(text: str, source: str = "<text>") -> Any:
    """``--batching_parameters_file`` contents as a ``tensorflow.serving.BatchingParameters``."""
    from image_classifier.tfserving._config_messages import message_classes

    return _parse(text, message_classes()["BatchingParameters"](), source)


def parse_monitoring_config(text: str, source: str = "<text>") -> Any:
    """``--monitoring_config_file`` contents as a ``tensorflow.serving.MonitoringConfig``."""
    from image_classifier.tfserving._config_messages import message_classes

    return _parse(text, message_classes()["MonitoringConfig"](), source)


def read_text_proto(path: str | Path, parse: Callable[[str, str], Message]) -> Message:
    """Read the file at ``path`` and parse it with one of the ``parse_*`` functions above."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, str(path))


def validate_batching_parameters(params: Any, source: str = "<batching parameters>") -> None:
    """Refuse what TF Serving refuses when it sets up batching with ``params``.

    Its checks (batching_session.cc, bundle_factory_util.cc): a thread count, queue length and
    batch size of at least one, and allowed batch sizes that increase, with the last one equal to
    the largest batch the scheduler forms (``max_execution_batch_size`` when large batches are
    split, ``max_batch_size`` otherwise).
    """
    for field in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
        # Int64Value wrappers: unset means "use the server default", which is valid.
        if params.HasField(field) and getattr(params, field).value < 1:
            raise ConfigError(
                f"{source}: {field} must be at least 1, got {getattr(params, field).value}"
            )

    sizes = list(params.allowed_batch_sizes)
    if not sizes:
        return  # no padding to fixed sizes; nothing more to check
    if sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ConfigError(
            f"{source}: allowed_batch_sizes must be positive and strictly increasing, got {sizes}"
        )

    max_batch_size = (
        params.max_batch_size.value if params.HasField("max_batch_size") else DEFAULT_MAX_BATCH_SIZE
    )
    splitting = params.HasField("enable_large_batch_splitting") and (
        params.enable_large_batch_splitting.value
    )
    if splitting and params.HasField("max_execution_batch_size"):
        limit, limit_name = params.max_execution_batch_size.value, "max_execution_batch_size"
    else:
        limit, limit_name = max_batch_size, "max_batch_size"
    if sizes[-1] != limit:
        raise ConfigError(
            f"{source}: the last allowed_batch_sizes entry must equal {limit_name} ({limit}), "
            f"got {sizes[-1]}"
        )


# TF Serving's PrometheusExporter::kPrometheusPath, used when the config names no path.
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


def prometheus_path(path: str | Path) -> str | None:
    """Where ``--monitoring_config_file`` at ``path`` asks metrics to be served (None: off)."""
    config = read_text_proto(path, parse_monitoring_config)
    if not config.prometheus_config.enable:
        return None
    served = str(config.prometheus_config.path or DEFAULT_PROMETHEUS_PATH)
    if not served.startswith("/") or served.startswith("/v1/"):
        raise ConfigError(
            f"{path}: prometheus_config.path {served!r} must start with '/' and lie outside /v1/"
        )
    return served


# --- --model_config_file: ModelServerConfig -> the models to serve -----------------------------

# TF Serving's kTensorFlowModelPlatform, the only platform this server (and TF Serving's stock
# build) serves.
TENSORFLOW_PLATFORM = "tensorflow"


@dataclass(frozen=True)
class VersionPolicy:
    """A ``ModelVersionPolicy``: which of the versions under a base path are served."""

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1  # latest only
    versions: frozenset[int] = frozenset()  # specific only

    @classmethod
    def from_proto(cls, policy: Any) -> VersionPolicy:
        choice = policy.WhichOneof("policy_choice")
        if choice == "all":
            return cls("all")
        if choice == "specific":
            return cls("specific", versions=frozenset(int(v) for v in policy.specific.versions))
        # Unset is `latest`; TF Serving serves at least one version (max(num_versions, 1)).
        return cls("latest", num_versions=max(int(policy.latest.num_versions), 1))

    def aspired(self, on_disk: Sequence[int]) -> list[int]:
        """The versions to serve, ascending, out of the ``on_disk`` ones (ascending)."""
        if self.kind == "all":
            return list(on_disk)
        if self.kind == "specific":
            return [v for v in on_disk if v in self.versions]
        return list(on_disk[-self.num_versions :])


@dataclass(frozen=True)
class ModelEntry:
    """One ``ModelConfig`` of a ``model_config_list``, checked."""

    name: str
    base_path: Path
    policy: VersionPolicy = dataclasses.field(default_factory=VersionPolicy)
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)


def read_model_server_config(path: str | Path) -> Any:
    """``--model_config_file`` at ``path`` as a ``ModelServerConfig`` (ConfigError otherwise)."""
    return read_text_proto(path, parse_model_server_config)


def model_entries(config: Any) -> list[ModelEntry]:
    """The models of a ``ModelServerConfig``, refused with TF Serving's words where it refuses.

    Its checks (server_core.cc): only a ``model_config_list`` (a ``custom_model_config`` needs a
    custom build), each name once, absolute base paths, a platform this server has. An empty
    config is no models. Raises :class:`ConfigError` with TF Serving's message.
    """
    choice = config.WhichOneof("config")
    if choice is None:
        return []
    if choice != "model_config_list":
        raise ConfigError("ModelServer does not yet support custom model config.")
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for model in config.model_config_list.config:
        if model.name in seen:
            raise ConfigError(f"Illegal to list model {model.name} multiple times in config list")
        seen.add(model.name)
        # URLs and ModelSpecs name a model; one without a name could never be asked for.
        if not model.name or "/" in model.name or ":" in model.name:
            raise ConfigError(f"Model name {model.name!r} must be non-empty, without '/' or ':'")
        if not Path(model.base_path).is_absolute():
            raise ConfigError(
                f"Expected model {model.name} to have an absolute path or URI; "
                f"got base_path()={model.base_path}"
            )
        platform = model.model_platform
        if not platform and model.model_type == 1:  # deprecated model_type: TENSORFLOW
            platform = TENSORFLOW_PLATFORM
        if not platform:
            raise ConfigError(
                "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                f"ModelServerConfig::model_platform, model name is {model.name}"
            )
        if platform != TENSORFLOW_PLATFORM:
            raise ConfigError(f"Model {model.name} requests unsupported platform {platform}")
        entries.append(
            ModelEntry(
                name=model.name,
                base_path=Path(model.base_path),
                policy=VersionPolicy.from_proto(model.model_version_policy),
                version_labels={label: int(v) for label, v in sorted(model.version_labels.items())},
            )
        )
    return entries
