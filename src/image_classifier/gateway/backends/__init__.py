"""Where the gateway's model runs: one interface (:mod:`.base`), two implementations.

- :class:`~.tfserving.TFServingBackend` calls TensorFlow Serving's REST API (or the embedded
  model server, which speaks the same protocol). No TensorFlow in this process.
- :class:`~.local.LocalBackend` loads the export in-process, for a single-process deployment.

:func:`create_backend` picks one from the settings.
"""

from __future__ import annotations

import httpx

from image_classifier.gateway.backends.base import (
    Backend,
    BackendObserver,
    BackendPrediction,
    ModelCard,
    ModelStatus,
)
from image_classifier.gateway.backends.local import LocalBackend
from image_classifier.gateway.backends.tfserving import TFServingBackend
from image_classifier.gateway.settings import GatewaySettings

__all__ = [
    "Backend",
    "BackendObserver",
    "BackendPrediction",
    "LocalBackend",
    "ModelCard",
    "ModelStatus",
    "TFServingBackend",
    "create_backend",
]


def create_backend(
    settings: GatewaySettings,
    observer: BackendObserver | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Backend:
    if settings.backend == "local":
        return LocalBackend(settings, observer)
    return TFServingBackend(settings, observer, transport=transport)
