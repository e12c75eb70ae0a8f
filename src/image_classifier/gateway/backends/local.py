"""The ``local`` backend: the export loaded in this process, for a single-process deployment.

The only gateway code that imports TensorFlow, lazily, in :meth:`LocalBackend.start` (through
:func:`image_classifier.servable.load_servable`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import numpy as np

from image_classifier.constants import BackendKind
from image_classifier.gateway.backends.base import (
    Backend,
    BackendObserver,
    BackendPrediction,
    ModelCard,
    ModelStatus,
    check_probabilities,
)
from image_classifier.gateway.errors import BackendTimeoutError, ModelUnavailableError
from image_classifier.gateway.settings import GatewaySettings
from image_classifier.preprocess import normalize
from image_classifier.tfserving.status import AVAILABLE, END, LOADING, START

if TYPE_CHECKING:
    from image_classifier.servable import Servable

logger = logging.getLogger("image_classifier.gateway.backend")


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
        self._state = START
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
        self._state = LOADING
        try:
            self._servable = await anyio.to_thread.run_sync(loader, self.settings.model_base_path)
        except Exception as exc:
            self._state, self._message = END, str(exc)
            raise
        self._state = AVAILABLE
        logger.info("loaded %s version %s in-process", self._servable.path, self._servable.version)

    async def close(self) -> None:
        self._servable = None
        self._state = END

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
                        servable.predict,
                        normalize(images),
                        limiter=self.limiter,
                        abandon_on_cancel=True,
                    )
            except TimeoutError:
                raise BackendTimeoutError(
                    f"the model did not answer within {timeout:g}s (GATEWAY_REQUEST_TIMEOUT_S)"
                ) from None
            probs = check_probabilities(
                np.asarray(probs, dtype=np.float32), len(images), len(servable.class_names)
            )
        return BackendPrediction(probs, str(servable.version))

    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        # The same signature_def JSON the model server's /metadata answers with, read at load.
        table: dict[str, Any] = self.servable.signature_table.metadata_json["signature_def"]
        return table

    def class_names(self, version: str | None) -> tuple[str, ...]:
        return self.servable.class_names

    def model_card(self, version: str | None) -> ModelCard:
        servable = self.servable
        return ModelCard(servable.metadata or None, str(servable.path))
