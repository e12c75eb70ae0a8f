"""Gateway configuration: one ``GatewaySettings`` read from the environment by pydantic-settings.

Every field is ``GATEWAY_<FIELD>`` in the environment; the two that TensorFlow Serving's own
Docker conventions already name are also read unprefixed (``TF_SERVING_URL``, ``MODEL_NAME``), so
one compose file configures both containers. Invalid values fail at start-up through
:func:`load_settings`, whose message names the environment variable to fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic import model_validator as _model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from image_classifier.constants import (
    DECODE_BUDGET_PIXELS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_GATEWAY_PORT,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_HOST,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MODEL_BASE_PATH,
    DEFAULT_TF_SERVING_URL,
    DEFAULT_TOP_K,
    MAX_REQUEST_PIXELS,
    MAX_TOP_K,
    MODEL_NAME,
    BackendKind,
    LogFormat,
    LogLevel,
)
from image_classifier.errors import ConfigError, ModelNotFoundError
from image_classifier.preprocess import MAX_PIXELS

ENV_PREFIX = "GATEWAY_"
MiB = 1024 * 1024

# Without a calibrated figure from the model card: below an even chance the top class is more
# likely wrong than right.
DEFAULT_LOW_CONFIDENCE_THRESHOLD = 0.5

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SettingsError(ConfigError):
    """The gateway's configuration is invalid; the message names each variable to fix."""

    code = "invalid_settings"


class GatewaySettings(BaseSettings):
    """Everything the gateway reads from its environment (or from keyword arguments)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
        frozen=True,
    )

    backend: BackendKind = Field(
        "tfserving",
        description="tfserving: call TensorFlow Serving (or the embedded model server) over "
        "REST; local: load the SavedModel in this process (needs TensorFlow).",
    )
    tf_serving_url: str = Field(
        DEFAULT_TF_SERVING_URL,
        validation_alias=AliasChoices("tf_serving_url", "GATEWAY_TF_SERVING_URL", "TF_SERVING_URL"),
        description="Base URL of the TF Serving REST API (tfserving backend).",
    )
    model_name: str = Field(
        MODEL_NAME,
        validation_alias=AliasChoices("model_name", "GATEWAY_MODEL_NAME", "MODEL_NAME"),
        description="Model name in TF Serving URLs (/v1/models/<name>) and in responses.",
    )
    model_base_path: Path = Field(
        Path(DEFAULT_MODEL_BASE_PATH),
        description="Export base path (or one version directory) loaded by the local backend.",
    )
    model_version_label: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "model_version_label", "GATEWAY_MODEL_VERSION_LABEL", "MODEL_VERSION_LABEL"
        ),
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="tfserving backend: predict with the version this label of the model "
        "server's --model_config_file names (/v1/models/<name>/labels/<label>:predict); unset: "
        "the highest available version.",
    )
    model_card_path: Path | None = Field(
        None,
        description="tfserving backend: the export TF Serving serves (base path or version "
        "directory), read only for the model card (metadata.json) shown by GET /model.",
    )
    max_upload_bytes: int = Field(
        16 * MiB, ge=1024, description="Largest request body accepted (all files together)."
    )
    max_images_per_request: int = Field(16, ge=1, le=1000)
    default_top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)
    max_image_pixels: int = Field(
        MAX_PIXELS, ge=1024, description="Decompression-bomb guard: most pixels in one image."
    )
    coalesce_max_batch_size: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most images merged from concurrent uploads into one backend call "
        "(1 turns merging off).",
    )
    # One at a time: a batching backend (TF Serving's, or the embedded one's) merges calls that
    # arrive together anyway, and a second call in flight only splits the waiting uploads into
    # two uneven batches (serve, photo p99 at 32 users: 195 ms against 228 with two).
    coalesce_max_in_flight: int = Field(
        1,
        ge=1,
        le=256,
        description="Backend predict calls running at once; uploads arriving meanwhile are "
        "merged into the next call.",
    )
    max_request_pixels: int = Field(
        MAX_REQUEST_PIXELS,
        ge=MAX_PIXELS,
        description="Most decoded pixels all images of one request may have together.",
    )
    decode_budget_pixels: int = Field(
        DECODE_BUDGET_PIXELS,
        ge=MAX_PIXELS,
        description="Most decoded pixels held at once across requests (memory bound).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser: comma-separated or a JSON "
        "list; empty disables CORS (the gateway's own page needs none).",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, prediction and model routes need it in X-API-Key (or "
        "Authorization: Bearer). Empty means unset.",
    )
    request_timeout_s: float = Field(10.0, gt=0, le=600, description="Per backend call.")
    connect_timeout_s: float = Field(2.0, gt=0, le=60)
    backend_max_connections: int = Field(64, ge=1, le=10_000)
    model_status_ttl_s: float = Field(
        5.0, ge=0, le=3600, description="How long a model version read from TF Serving is reused."
    )
    header_timeout_s: float = Field(
        DEFAULT_HEADER_TIMEOUT_S,
        gt=0,
        le=600,
        description="Longest a client may take to send a request's headers.",
    )
    body_timeout_s: float = Field(
        DEFAULT_BODY_TIMEOUT_S,
        gt=0,
        le=600,
        description="Longest pause allowed while a request body arrives (then 408).",
    )
    max_connections: int = Field(
        DEFAULT_MAX_CONNECTIONS,
        ge=1,
        le=100_000,
        description="Connections (and requests in progress) served at once; beyond, 503.",
    )
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_GATEWAY_PORT, ge=1, le=65535)
    log_level: LogLevel = "info"
    log_format: LogFormat = Field(
        "text", description="text: one readable line per event; json: one JSON object per line."
    )
    low_confidence_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="A top-1 probability below this is shown as 'not sure' (web page, /model). "
        "Unset: the served model card's low_confidence_threshold, else "
        f"{DEFAULT_LOW_CONFIDENCE_THRESHOLD}.",
    )

    @field_validator("tf_serving_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. http://localhost:8501")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a port out of range or not a number
        except ValueError as exc:
            raise ValueError(f"has an invalid port: {exc}") from None
        return value.strip().rstrip("/")

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str) -> str:
        # The name goes into URL paths; anything else would need escaping and TF Serving would
        # not accept it as a model name anyway.
        if not _MODEL_NAME_RE.match(value):
            raise ValueError("must be letters, digits, '_', '.' or '-'")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(
                    f"{origin!r} is not an origin (scheme://host[:port], no path) or '*'"
                )
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: Any) -> Any:
        # `GATEWAY_API_KEY=` in a compose file means "no key", not "the empty key".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @_model_validator(mode="after")
    def _check_paths(self) -> GatewaySettings:
        from image_classifier.servable import resolve_version_dir

        if self.backend == "local":
            try:
                resolve_version_dir(self.model_base_path)
            except ModelNotFoundError as exc:
                raise ValueError(
                    f"{env_var_name('model_base_path')} (the local backend's model): {exc}"
                ) from None
        if self.model_card_path is not None and not self.model_card_path.exists():
            raise ValueError(
                f"{env_var_name('model_card_path')}: {self.model_card_path} does not exist"
            )
        if self.connect_timeout_s > self.request_timeout_s:
            raise ValueError(
                f"{env_var_name('connect_timeout_s')} must not exceed "
                f"{env_var_name('request_timeout_s')}"
            )
        return self

    @property
    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None


def env_var_name(field: str) -> str:
    """The environment variable (or variables) that sets ``field``."""
    info = GatewaySettings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        names = [str(c) for c in info.validation_alias.choices if str(c).isupper()]
        return " or ".join(names)
    return f"{ENV_PREFIX}{field.upper()}"


def format_validation_error(exc: ValidationError) -> str:
    """One line: each invalid variable, its value (never a key's) and what is wrong with it."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if field:
            shown = repr(error["input"]) if not field.endswith("api_key") else "***"
            problems.append(f"{env_var_name(field)} ({field}) = {shown}: {message}")
        else:
            problems.append(message)
    return "invalid gateway settings: " + "; ".join(problems)


def load_settings(**overrides: Any) -> GatewaySettings:
    """Settings from the environment, with ``overrides`` (e.g. CLI flags) taking precedence.

    Raises :class:`SettingsError` with one line per invalid variable.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return GatewaySettings(**given)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None
