"""Where the gateway's model runs: one interface, two implementations.

- :class:`TFServingBackend` calls TensorFlow Serving's REST API (or the embedded model server,
  which speaks the same protocol) with preprocessed float images. No TensorFlow in this process.
- :class:`LocalBackend` loads the export in-process with :func:`servable.load_servable`, for a
  single-process deployment. It is the only code here that imports TensorFlow, lazily, in
  :meth:`LocalBackend.start`.

Both return probabilities exactly as the export's ``serving_default`` signature computes them,
plus the model version that computed them.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import httpx
import numpy as np

from image_classifier.constants import CIFAR10_CLASSES, SERVING_DEFAULT
from image_classifier.errors import ModelNotFoundError
from image_classifier.gateway.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ModelUnavailableError,
)
from image_classifier.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from image_classifier.servable import Servable

logger = logging.getLogger("image_classifier.gateway.backend")

AVAILABLE = "AVAILABLE"
BackendKind = Literal["tfserving", "local"]


@dataclass(frozen=True)
class ModelStatus:
    """The model's state as the backend reports it (TF Serving's vocabulary)."""

    name: str
    version: str | None
    state: str  # UNKNOWN, START, LOADING, AVAILABLE, UNLOADING, END, or NOT_FOUND
    message: str = ""

    @property
    def available(self) -> bool:
        return self.state == AVAILABLE and self.version is not None


@dataclass(frozen=True)
class BackendPrediction:
    probabilities: np.ndarray  # float32 (n, num_classes), rows sum to 1
    model_version: str


@dataclass(frozen=True)
class ModelCard:
    content: dict[str, Any] | None
    source: str | None


class BackendObserver(Protocol):
    """Receives one call per backend operation (the metrics module implements it)."""

    def observe_backend(
        self, backend: str, operation: str, seconds: float, error: str | None
    ) -> None: ...


class Backend(abc.ABC):
    """What the routes need from a model backend."""

    kind: BackendKind

    def __init__(self, settings: GatewaySettings, observer: BackendObserver | None = None):
        self.settings = settings
        self.model_name = settings.model_name
        self.observer = observer

    async def start(self) -> None:  # noqa: B027 - an optional hook, not every backend needs it
        """Open connections or load the model (called once, in the app's lifespan)."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, not every backend needs it
        """Release what :meth:`start` opened."""

    @abc.abstractmethod
    async def status(self) -> ModelStatus:
        """The served model's state; raises BackendUnavailableError if it cannot be asked."""

    @abc.abstractmethod
    async def predict(self, images: np.ndarray) -> BackendPrediction:
        """float32 ``(n, 32, 32, 3)`` in [0, 1] -> probabilities from one model version."""

    @abc.abstractmethod
    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        """The served ``signature_def`` description, as TF Serving's /metadata gives it."""

    @abc.abstractmethod
    def class_names(self, version: str | None) -> tuple[str, ...]:
        """Label of each output index, for the given model version."""

    @abc.abstractmethod
    def model_card(self, version: str | None) -> ModelCard:
        """The export's metadata.json, when this backend can see it."""

    @asynccontextmanager
    async def _observed(self, operation: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        error: str | None = None
        try:
            yield
        except BackendError as exc:
            error = exc.code
            raise
        except Exception:
            error = "internal"
            raise
        finally:
            if self.observer is not None:
                self.observer.observe_backend(
                    self.kind, operation, time.perf_counter() - started, error
                )


def _check_probabilities(probs: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if probs.ndim != 2 or probs.shape[0] != n:
        raise BackendError(f"the model returned shape {probs.shape} for {n} images")
    if probs.shape[1] != num_classes:
        raise BackendError(
            f"the model returned {probs.shape[1]} scores per image but has "
            f"{num_classes} class names: the served model and its labels disagree"
        )
    if not np.all(np.isfinite(probs)):
        raise BackendError("the model returned non-finite probabilities")
    return probs


# --- TensorFlow Serving over REST -----------------------------------------------------------

# A pooled keep-alive connection the server has closed fails on first use with one of these;
# so does a connection refused while the backend restarts. Both are worth exactly one retry,
# and retrying is safe: a prediction changes nothing on the server.
_RETRYABLE = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)
# How long a failed or not-AVAILABLE status answer is trusted before TF Serving is asked again.
_RECHECK_S = 1.0


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
        self._status: ModelStatus | None = None
        self._status_at = 0.0
        self._status_error: BackendError | None = None
        self._status_lock = asyncio.Lock()
        self._cards: dict[str, ModelCard] = {}

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

    def _model_path(self, version: str | None) -> str:
        path = f"/v1/models/{self.model_name}"
        return f"{path}/versions/{version}" if version is not None else path

    async def status(self) -> ModelStatus:
        async with self._observed("status"):
            response = await self._send("GET", self._model_path(None))
            if response.status_code == 404:
                status = ModelStatus(self.model_name, None, "NOT_FOUND", _tf_error(response))
            elif response.status_code != 200:
                raise _error_for(response)
            else:
                status = _parse_status(self.model_name, _json(response))
        self._status, self._status_at = status, time.monotonic()
        return status

    async def _serving_version(self, *, refresh: bool = False) -> str:
        """The version to pin predictions to, re-read at most every ``model_status_ttl_s``.

        A failed or not-AVAILABLE answer is reused for :data:`_RECHECK_S`: requests queued on the
        lock behind a status call to a dead backend fail together instead of each waiting for
        its own connection timeout in turn.
        """
        async with self._status_lock:
            age = time.monotonic() - self._status_at
            healthy = self._status is not None and self._status.available
            max_age = self.settings.model_status_ttl_s if healthy else _RECHECK_S
            if refresh or self._status is None or age >= max_age:
                try:
                    await self.status()
                except BackendError as exc:
                    self._status = ModelStatus(self.model_name, None, "UNREACHABLE", str(exc))
                    self._status_at = time.monotonic()
                    self._status_error = exc
                    raise
                self._status_error = None
            elif self._status_error is not None:
                raise type(self._status_error)(str(self._status_error))
        status = self._status
        assert status is not None
        if not status.available:
            raise ModelUnavailableError(
                f"model {self.model_name!r} is not available in TF Serving "
                f"(state {status.state}{': ' + status.message if status.message else ''})"
            )
        assert status.version is not None
        return status.version

    async def predict(self, images: np.ndarray) -> BackendPrediction:
        n = len(images)
        content = await anyio.to_thread.run_sync(_encode_instances, images)
        async with self._observed("predict"):
            version = await self._serving_version()
            # Pinning the version makes the reported version the one that computed the answer,
            # even while TF Serving swaps versions.
            response = await self._send(
                "POST", f"{self._model_path(version)}:predict", content=content
            )
            if response.status_code == 404:
                # That version was unloaded since we looked: ask again, and try the new one once.
                version = await self._serving_version(refresh=True)
                response = await self._send(
                    "POST", f"{self._model_path(version)}:predict", content=content
                )
            if response.status_code != 200:
                raise _error_for(response)
            body = _json(response)
            try:
                probs = np.asarray(body["predictions"], dtype=np.float32)
            except (KeyError, TypeError, ValueError):
                raise BackendError(
                    "TF Serving's predict response has no usable 'predictions'"
                ) from None
            probs = _check_probabilities(probs, n, len(self.class_names(version)))
        return BackendPrediction(probs, version)

    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        async with self._observed("metadata"):
            response = await self._send("GET", f"{self._model_path(version)}/metadata")
            if response.status_code != 200:
                raise _error_for(response)
            metadata = _json(response).get("metadata", {})
        signature_def = metadata.get("signature_def", {}) if isinstance(metadata, dict) else {}
        # TF Serving nests the map one level deeper than its name suggests.
        return signature_def.get("signature_def", signature_def) or None

    def model_card(self, version: str | None) -> ModelCard:
        path = self.settings.model_card_path
        if path is None:
            return ModelCard(None, None)
        key = version or ""
        if key not in self._cards:
            self._cards[key] = _read_card(path, version)
        return self._cards[key]

    def class_names(self, version: str | None) -> tuple[str, ...]:
        card = self.model_card(version).content
        names = card.get("class_names") if card else None
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return tuple(names)
        return tuple(CIFAR10_CLASSES)


def _read_card(path: Path, version: str | None) -> ModelCard:
    from image_classifier.servable import read_metadata, resolve_version_dir

    try:
        version_dir = resolve_version_dir(path, int(version) if version else None)
    except (ModelNotFoundError, ValueError) as exc:
        # A card for another version would describe the wrong model: show none.
        return ModelCard(None, f"no card for version {version}: {exc}")
    try:
        return ModelCard(read_metadata(version_dir), str(version_dir))
    except (OSError, ValueError) as exc:
        return ModelCard(None, f"{version_dir}: unreadable metadata.json ({exc})")


def _encode_instances(images: np.ndarray) -> bytes:
    # float32 -> Python float is exact and JSON keeps every digit, so TF Serving sees the very
    # same float32 values (the parity test holds this to 1e-5 of the export's own output).
    # client.json_floats writes shorter decimals but walks every value in Python: 2x slower
    # per image, on the request path, to save bytes on a hop that is usually loopback.
    payload = {"signature_name": SERVING_DEFAULT, "instances": images.tolist()}
    return json.dumps(payload, separators=(",", ":")).encode()


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
        return body["error"]
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


def _parse_status(name: str, body: dict[str, Any]) -> ModelStatus:
    entries = body.get("model_version_status")
    if not isinstance(entries, list) or not entries:
        return ModelStatus(name, None, "UNKNOWN", "no model_version_status in the answer")

    def version_of(entry: dict[str, Any]) -> int:
        try:
            return int(entry.get("version", -1))
        except (TypeError, ValueError):
            return -1

    entries = [e for e in entries if isinstance(e, dict)]
    available = [e for e in entries if e.get("state") == AVAILABLE]
    chosen = max(available or entries, key=version_of)
    error = chosen.get("status", {}) if isinstance(chosen.get("status"), dict) else {}
    return ModelStatus(
        name=name,
        version=str(chosen.get("version")) if chosen.get("version") is not None else None,
        state=str(chosen.get("state", "UNKNOWN")),
        message=str(error.get("error_message", "")),
    )


# --- In-process SavedModel --------------------------------------------------------------------


class LocalBackend(Backend):
    """The export loaded in this process (TensorFlow imported on start, not on import)."""

    kind: BackendKind = "local"

    def __init__(
        self,
        settings: GatewaySettings,
        observer: BackendObserver | None = None,
        *,
        loader: Callable[[Path], Servable] | None = None,
    ) -> None:
        super().__init__(settings, observer)
        self._loader = loader
        self._servable: Servable | None = None
        self._state = "START"
        self._message = ""
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # TensorFlow parallelises each call over the cores itself; more concurrent calls than
        # cores only add contention. Created on first use, inside the running event loop.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))
        return self._limiter

    async def start(self) -> None:
        from image_classifier.servable import load_servable

        loader = self._loader or load_servable
        self._state = "LOADING"
        try:
            self._servable = await anyio.to_thread.run_sync(loader, self.settings.model_base_path)
        except Exception as exc:
            self._state, self._message = "END", str(exc)
            raise
        self._state = AVAILABLE
        logger.info("loaded %s version %s in-process", self._servable.path, self._servable.version)

    async def close(self) -> None:
        self._servable = None
        self._state = "END"

    @property
    def servable(self) -> Servable:
        if self._servable is None:
            raise ModelUnavailableError(f"the model is not loaded (state {self._state})")
        return self._servable

    async def status(self) -> ModelStatus:
        version = str(self._servable.version) if self._servable is not None else None
        return ModelStatus(self.model_name, version, self._state, self._message)

    async def predict(self, images: np.ndarray) -> BackendPrediction:
        servable = self.servable
        timeout = self.settings.request_timeout_s
        async with self._observed("predict"):
            try:
                with anyio.fail_after(timeout):
                    # The thread cannot be stopped, but the client gets its 504 on time.
                    probs = await anyio.to_thread.run_sync(
                        servable.predict, images, limiter=self.limiter, abandon_on_cancel=True
                    )
            except TimeoutError:
                raise BackendTimeoutError(
                    f"the model did not answer within {timeout:g}s (GATEWAY_REQUEST_TIMEOUT_S)"
                ) from None
            probs = _check_probabilities(
                np.asarray(probs, dtype=np.float32), len(images), len(servable.class_names)
            )
        return BackendPrediction(probs, str(servable.version))

    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        return _describe_signatures(self.servable.signatures)

    def class_names(self, version: str | None) -> tuple[str, ...]:
        return self.servable.class_names

    def model_card(self, version: str | None) -> ModelCard:
        servable = self.servable
        return ModelCard(servable.metadata or None, str(servable.path))


def _describe_signatures(signatures: Any) -> dict[str, Any]:
    """Loaded signatures -> the same shape as TF Serving's ``signature_def`` metadata."""

    from tensorflow.core.framework import types_pb2

    def spec(tensor: Any) -> dict[str, Any]:
        dims = [{"size": str(-1 if d is None else d)} for d in tensor.shape.as_list()]
        return {
            "dtype": types_pb2.DataType.Name(tensor.dtype.as_datatype_enum),
            "tensor_shape": {"dim": dims, "unknown_rank": False},
        }

    described: dict[str, Any] = {}
    for name, function in signatures.items():
        _, kwargs = function.structured_input_signature
        outputs = function.structured_outputs
        described[name] = {
            "inputs": {key: {"name": key, **spec(value)} for key, value in kwargs.items()},
            "outputs": {key: {"name": key, **spec(value)} for key, value in outputs.items()},
            "method_name": "tensorflow/serving/predict",
        }
    return described


def create_backend(
    settings: GatewaySettings,
    observer: BackendObserver | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Backend:
    if settings.backend == "local":
        return LocalBackend(settings, observer)
    return TFServingBackend(settings, observer, transport=transport)
