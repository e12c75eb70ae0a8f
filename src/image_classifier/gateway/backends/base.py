"""What the gateway needs from a model backend, whichever one it is.

Both implementations return probabilities exactly as the export's ``serving_default`` signature
computes them, plus the model version that computed them; states are TF Serving's
(:mod:`image_classifier.tfserving.status`).
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from image_classifier.constants import BackendKind
from image_classifier.gateway.errors import BackendError
from image_classifier.gateway.settings import GatewaySettings
from image_classifier.tfserving.status import AVAILABLE


@dataclass(frozen=True)
class ModelStatus:
    """The model's state as the backend reports it (TF Serving's vocabulary)."""

    name: str
    version: str | None
    state: str  # a tfserving.status state: START ... END, or UNKNOWN, NOT_FOUND, UNREACHABLE
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
        """Preprocessed uint8 ``(n, 32, 32, 3)`` -> probabilities from one model version.

        The model's input is these pixels normalized (:func:`preprocess.normalize`); keeping
        them uint8 until the backend lets it choose the compact wire.
        """

    @abc.abstractmethod
    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        """The served ``signature_def`` map, as TF Serving's /metadata gives it."""

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


def check_probabilities(probs: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """The backend's answer, refused (502) unless it is ``n`` finite rows of ``num_classes``."""
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
