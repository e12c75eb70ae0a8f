"""The ``tfserving`` backend: TensorFlow Serving's REST API (or the embedded model server).

Preprocessed images go out as a row-format ``:predict`` body: on the compact wire (each image's
3,072 raw bytes as ``{"b64": ...}`` to the ``serving_pixels`` signature, ~4 KB) when the served
version has that signature, as float rows to ``serving_default`` (~40 KB) otherwise; the
answers are identical. No TensorFlow in this process. The wire format, URLs and status body
are TF Serving's, from :mod:`image_classifier.tfserving`.

Health is one piece of state, :attr:`TFServingBackend.health`, updated from every answer:
a status answer replaces it, a failed call marks the backend unreachable, and a successful
prediction proves the backend is up again. Predictions reuse it for ``model_status_ttl_s``
(or :data:`_RECHECK_S` while it is bad) instead of asking TF Serving before each call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import numpy as np

from image_classifier.constants import (
    CIFAR10_CLASSES,
    PIXELS_INPUT_KEY,
    SERVING_DEFAULT,
    SERVING_PIXELS,
    BackendKind,
)
from image_classifier.errors import ModelNotFoundError
from image_classifier.gateway.backends.base import (
    Backend,
    BackendObserver,
    BackendPrediction,
    ModelCard,
    ModelStatus,
    check_probabilities,
)
from image_classifier.gateway.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ModelUnavailableError,
)
from image_classifier.gateway.postprocess import class_names_from_card
from image_classifier.gateway.settings import GatewaySettings
from image_classifier.preprocess import normalize
from image_classifier.servable import read_metadata, resolve_version_dir
from image_classifier.tfserving.json_tensor import (
    PredictionsFormatError,
    decode_predictions,
    encode_b64_instances,
    encode_instances,
)
from image_classifier.tfserving.rest import model_path, predict_path
from image_classifier.tfserving.status import (
    NOT_FOUND,
    UNKNOWN,
    UNREACHABLE,
    parse_status_body,
    serving_status,
)

logger = logging.getLogger("image_classifier.gateway.backend")

# A pooled keep-alive connection the server has closed fails on first use with one of these;
# so does a connection refused while the backend restarts. Both are worth exactly one retry,
# and retrying is safe: a prediction changes nothing on the server.
_RETRYABLE = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)
# How long a failed or not-AVAILABLE status answer is trusted before TF Serving is asked again.
_RECHECK_S = 1.0


@dataclass(frozen=True)
class Health:
    """The backend's last known state: what was seen, when, and the failure if the call failed."""

    status: ModelStatus
    at: float  # time.monotonic()
    error: BackendError | None = None

    def fresh(self, ttl: float) -> bool:
        max_age = ttl if self.status.available and self.error is None else _RECHECK_S
        return time.monotonic() - self.at < max_age


class TFServingBackend(Backend):
    """TensorFlow Serving REST client: pooled connections, timeouts, one retry on a dropped one."""

    kind: BackendKind = "tfserving"

    def __init__(
        self,
        settings: GatewaySettings,
        observer: BackendObserver | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(settings, observer)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.health: Health | None = None
        self._status_lock = asyncio.Lock()
        self._cards: dict[str, ModelCard] = {}
        self._pixels_signature: dict[str, bool] = {}

    @property
    def base_url(self) -> str:
        return self.settings.tf_serving_url

    async def start(self) -> None:
        s = self.settings
        self._client = httpx.AsyncClient(
            base_url=s.tf_serving_url,
            timeout=httpx.Timeout(
                s.request_timeout_s, connect=s.connect_timeout_s, pool=s.request_timeout_s
            ),
            limits=httpx.Limits(
                max_connections=s.backend_max_connections,
                max_keepalive_connections=s.backend_max_connections,
                keepalive_expiry=30.0,
            ),
            transport=self._transport,
            headers={"Accept": "application/json"},
            # A proxy from the environment must not sit between the gateway and its backend.
            trust_env=False,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("TFServingBackend.start() was not called")
        return self._client

    # --- health: the one place that decides it ----------------------------------------------

    def _record(self, status: ModelStatus, error: BackendError | None = None) -> None:
        self.health = Health(status, time.monotonic(), error)

    def _record_failure(self, error: BackendError) -> None:
        self._record(ModelStatus(self.model_name, None, UNREACHABLE, str(error)), error)

    def _record_success(self, version: str) -> None:
        health = self.health
        if health is None or health.error is not None or health.status.version != version:
            # An answer from this version is proof enough that it is up: no stale failure may
            # outlive it (a failure recorded while a probe raced a restart, say).
            self._record(ModelStatus(self.model_name, version, "AVAILABLE"))

    # --- HTTP ----------------------------------------------------------------------------------

    async def _send(
        self, method: str, path: str, *, content: bytes | None = None
    ) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if content is not None else None
        for attempt in (1, 2):
            try:
                return await self.client.request(method, path, content=content, headers=headers)
            except _RETRYABLE as exc:
                if attempt == 1:
                    logger.info("retrying %s %s after %s", method, path, type(exc).__name__)
                    continue
                raise BackendUnavailableError(
                    f"TF Serving at {self.base_url} is unreachable ({_describe(exc)})"
                ) from None
            except httpx.PoolTimeout:
                raise BackendUnavailableError(
                    f"all {self.settings.backend_max_connections} connections to TF Serving "
                    f"stayed busy for {self.settings.request_timeout_s:g}s"
                ) from None
            except httpx.TimeoutException:
                raise BackendTimeoutError(
                    f"TF Serving did not answer within {self.settings.request_timeout_s:g}s"
                ) from None
            except httpx.HTTPError as exc:
                raise BackendUnavailableError(
                    f"TF Serving request failed ({_describe(exc)})"
                ) from None
        raise AssertionError("unreachable")

    async def status(self) -> ModelStatus:
        label = self.settings.model_version_label
        try:
            async with self._observed("status"):
                response = await self._send("GET", model_path(self.model_name, label=label))
                # 400 with a label: an unknown label (the embedded server resolves it here).
                if response.status_code == 404 or (label and response.status_code == 400):
                    status = ModelStatus(self.model_name, None, NOT_FOUND, _tf_error(response))
                elif response.status_code != 200:
                    raise _error_for(response)
                elif label is not None:
                    status = await self._label_status(label, _json(response))
                else:
                    status = _model_status(self.model_name, _json(response))
        except BackendError as exc:
            self._record_failure(exc)
            raise
        self._record(status)
        return status

    async def _label_status(self, label: str, body: dict[str, Any]) -> ModelStatus:
        """The labelled version's status (TF Serving's status answer lists every version
        whatever the label; its metadata answer names the labelled one)."""
        response = await self._send("GET", f"{model_path(self.model_name, label=label)}/metadata")
        if response.status_code in (400, 404):  # an unknown label, or its version is gone
            return ModelStatus(self.model_name, None, NOT_FOUND, _tf_error(response))
        if response.status_code != 200:
            raise _error_for(response)
        spec = _json(response).get("model_spec")
        version = str(spec.get("version", "")) if isinstance(spec, dict) else ""
        for entry in parse_status_body(body):
            if str(entry.version) == version:
                return ModelStatus(self.model_name, version, entry.state, entry.error_message)
        return ModelStatus(self.model_name, None, UNKNOWN, f"label {label}: no version status")

    async def _serving_version(self, *, refresh: bool = False) -> str:
        """The version to pin predictions to, from :attr:`health` while it is fresh.

        Requests queued on the lock behind a status call to a dead backend find its failure
        recorded and fail together, instead of each waiting for its own connection timeout.
        """
        async with self._status_lock:
            health = self.health
            if refresh or health is None or not health.fresh(self.settings.model_status_ttl_s):
                await self.status()  # records success or failure in self.health
                health = self.health
                assert health is not None
            elif health.error is not None:
                raise type(health.error)(str(health.error))
        status = health.status
        if not status.available:
            raise ModelUnavailableError(
                f"model {self.model_name!r} is not available in TF Serving "
                f"(state {status.state}{': ' + status.message if status.message else ''})"
            )
        assert status.version is not None
        return status.version

    async def _body_for(self, version: str, images: np.ndarray) -> bytes:
        """The predict body for ``version``: raw pixels when it has the compact signature."""
        if await self._speaks_pixels(version):
            return encode_b64_instances(SERVING_PIXELS, [image.tobytes() for image in images])
        # An export without it (older, or another project's) gets TF Serving's float rows.
        return await anyio.to_thread.run_sync(encode_instances, normalize(images), SERVING_DEFAULT)

    async def _speaks_pixels(self, version: str) -> bool:
        """Whether ``version`` has the ``serving_pixels`` signature (asked once per version)."""
        if version not in self._pixels_signature:
            try:
                signatures = await self.signatures(version) or {}
            except BackendError:
                return False  # asked again next time; the float body works everywhere
            inputs = signatures.get(SERVING_PIXELS, {}).get("inputs", {})
            self._pixels_signature[version] = (
                inputs.get(PIXELS_INPUT_KEY, {}).get("dtype") == "DT_STRING"
            )
        return self._pixels_signature[version]

    async def predict(self, images: np.ndarray) -> BackendPrediction:
        n = len(images)
        label = self.settings.model_version_label  # set: the label's version answers
        async with self._observed("predict"):
            version = await self._serving_version()
            # Pinning the version makes the reported version the one that computed the answer,
            # even while TF Serving swaps versions.
            try:
                content = await self._body_for(version, images)
                response = await self._send(
                    "POST", predict_path(self.model_name, version, label=label), content=content
                )
                if response.status_code == 404:
                    # That version was unloaded since we looked: ask again, try the new one once.
                    version = await self._serving_version(refresh=True)
                    content = await self._body_for(version, images)
                    response = await self._send(
                        "POST", predict_path(self.model_name, version, label=label), content=content
                    )
            except BackendUnavailableError as exc:
                self._record_failure(exc)
                raise
            if response.status_code != 200:
                raise _error_for(response)
            try:
                probs = decode_predictions(_json(response))
            except PredictionsFormatError as exc:
                raise BackendError(f"TF Serving's answer is unusable: {exc}") from None
            probs = check_probabilities(probs, n, len(self.class_names(version)))
        self._record_success(version)
        return BackendPrediction(probs, version)

    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        async with self._observed("metadata"):
            response = await self._send("GET", f"{model_path(self.model_name, version)}/metadata")
            if response.status_code != 200:
                raise _error_for(response)
            metadata = _json(response).get("metadata", {})
        signature_def = metadata.get("signature_def", {}) if isinstance(metadata, dict) else {}
        # TF Serving nests the map one level deeper than its name suggests.
        inner = signature_def.get("signature_def", signature_def)
        return inner if isinstance(inner, dict) and inner else None

    def model_card(self, version: str | None) -> ModelCard:
        path = self.settings.model_card_path
        if path is None:
            return ModelCard(None, None)
        key = version or ""
        if key not in self._cards:
            self._cards[key] = _read_card(path, version)
        return self._cards[key]

    def class_names(self, version: str | None) -> tuple[str, ...]:
        return class_names_from_card(self.model_card(version).content) or CIFAR10_CLASSES


def _read_card(path: Path, version: str | None) -> ModelCard:
    try:
        version_dir = resolve_version_dir(path, int(version) if version else None)
    except (ModelNotFoundError, ValueError) as exc:
        # A card for another version would describe the wrong model: show none.
        return ModelCard(None, f"no card for version {version}: {exc}")
    try:
        return ModelCard(read_metadata(version_dir), str(version_dir))
    except (OSError, ValueError) as exc:
        return ModelCard(None, f"{version_dir}: unreadable metadata.json ({exc})")


def _model_status(name: str, body: dict[str, Any]) -> ModelStatus:
    chosen = serving_status(parse_status_body(body))
    if chosen is None:
        return ModelStatus(name, None, UNKNOWN, "no model_version_status in the answer")
    return ModelStatus(
        name=name,
        version=str(chosen.version) if chosen.version >= 0 else None,
        state=chosen.state,
        message=chosen.error_message,
    )


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise BackendError(
            f"TF Serving answered {response.status_code} with a body that is not JSON"
        ) from None
    if not isinstance(body, dict):
        raise BackendError("TF Serving answered with JSON that is not an object")
    return body


def _tf_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return str(body)[:200]


def _error_for(response: httpx.Response) -> BackendError:
    """TF Serving's error status -> the gateway's error (its own statuses, see errors.py)."""
    status, message = response.status_code, _tf_error(response)
    if status == 404:
        return ModelUnavailableError(f"TF Serving: {message}")
    if status in (429, 503):
        return ModelUnavailableError(f"TF Serving is unavailable ({status}): {message}")
    if status == 504:
        return BackendTimeoutError(f"TF Serving timed out: {message}")
    # 400 means the gateway sent something TF Serving rejects (a contract mismatch, not the
    # client's fault), so it is a bad gateway rather than a bad request.
    return BackendError(f"TF Serving answered {status}: {message}")
