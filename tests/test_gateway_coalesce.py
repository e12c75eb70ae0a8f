"""Concurrent uploads merged into one backend call, each answer still its own image's."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from image_classifier.constants import CIFAR10_CLASSES
from image_classifier.gateway import GatewaySettings, create_app
from image_classifier.gateway.backends import Backend, BackendPrediction, ModelCard, ModelStatus
from image_classifier.gateway.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ModelUnavailableError,
)


class SlowBackend(Backend):
    """Answers class ``mean red level // 26`` for each image, after a pause; records calls.

    The first call also waits for ``release``, so a test decides what arrives meanwhile
    instead of racing a timer (on a loaded machine parsing 7 uploads can outlast any pause).
    """

    kind = "tfserving"

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        fail: bool = False,
        error: type[BackendError] = BackendTimeoutError,
    ) -> None:
        super().__init__(settings)
        self.calls: list[int] = []
        self.fail = fail
        self.error = error
        self.release = asyncio.Event()

    async def status(self) -> ModelStatus:
        return ModelStatus(self.model_name, "3", "AVAILABLE")

    async def predict(self, images: np.ndarray) -> BackendPrediction:
        self.calls.append(len(images))
        if len(self.calls) == 1:
            await self.release.wait()
        await asyncio.sleep(0.2)
        if self.fail:
            raise self.error("the model did not answer")
        classes = images[..., 0].reshape(len(images), -1).mean(axis=1) // 26
        probabilities = np.eye(10, dtype=np.float32)[classes.astype(int)]
        return BackendPrediction(probabilities, "3")

    async def signatures(self, version: str | None) -> dict[str, Any] | None:
        return None

    def class_names(self, version: str | None) -> tuple[str, ...]:
        return tuple(CIFAR10_CLASSES)

    def model_card(self, version: str | None) -> ModelCard:
        return ModelCard(None, None)


def _png(red: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (red, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


async def _upload_all(
    app: Any, backend: SlowBackend, reds: list[int]
) -> tuple[list[httpx.Response], str]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:

        async def one(red: int) -> httpx.Response:
            files = {"file": ("a.png", _png(red), "image/png")}
            return await client.post("/predict-image", files=files)

        first = asyncio.create_task(one(reds[0]))
        while not backend.calls:  # the first call is in flight (and held)...
            await asyncio.sleep(0.005)
        rest = [asyncio.create_task(one(red)) for red in reds[1:]]
        # ...until every other upload has reached the coalescer or a call of its own.
        coalescer = app.state.pipeline.coalescer
        for _ in range(2000):
            if coalescer.pending_images + sum(backend.calls[1:]) >= len(reds) - 1:
                break
            await asyncio.sleep(0.005)
        backend.release.set()
        answers = [await first, *await asyncio.gather(*rest)]
        metrics = (await client.get("/metrics")).text
        return answers, metrics


def _run(settings: GatewaySettings, backend: SlowBackend, reds: list[int]) -> Any:
    app = create_app(settings, backend=backend)

    async def main() -> tuple[list[httpx.Response], str]:
        async with app.router.lifespan_context(app):
            return await _upload_all(app, backend, reds)

    return asyncio.run(main())


def test_uploads_arriving_during_a_call_share_the_next_one() -> None:
    settings = GatewaySettings(coalesce_max_in_flight=1)
    backend = SlowBackend(settings)
    reds = [10 * i + 5 for i in range(8)]

    answers, metrics = _run(settings, backend, reds)

    assert backend.calls == [1, 7]  # the first alone, the other seven merged
    for red, answer in zip(reds, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["class_index"] == red // 26
    assert "gateway_backend_batch_requests_bucket" in metrics
    assert 'gateway_backend_batch_images_bucket{le="8.0"} 2.0' in metrics


def test_merged_batches_respect_the_size_cap() -> None:
    settings = GatewaySettings(coalesce_max_in_flight=1, coalesce_max_batch_size=3)
    backend = SlowBackend(settings)

    answers, _ = _run(settings, backend, [50] * 8)

    assert [a.status_code for a in answers] == [200] * 8
    assert backend.calls == [1, 3, 3, 1]


def test_merging_can_be_turned_off() -> None:
    settings = GatewaySettings(coalesce_max_batch_size=1)
    backend = SlowBackend(settings)

    _run(settings, backend, [50] * 4)

    assert backend.calls == [1, 1, 1, 1]


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_failed_merged_call_fails_each_request_with_its_error(in_flight: int) -> None:
    settings = GatewaySettings(coalesce_max_in_flight=in_flight)
    backend = SlowBackend(settings, fail=True)

    answers, _ = _run(settings, backend, [50] * 5)

    assert [a.status_code for a in answers] == [504] * 5
    assert {a.json()["error"]["code"] for a in answers} == {"backend_timeout"}


@pytest.mark.parametrize("error", [BackendTimeoutError, BackendUnavailableError])
def test_uploads_queued_behind_a_silent_backend_share_its_failure_at_once(
    error: type[BackendError],
) -> None:
    settings = GatewaySettings(coalesce_max_in_flight=1)
    backend = SlowBackend(settings, fail=True, error=error)

    answers, _ = _run(settings, backend, [50] * 5)

    # No second call to a backend that just did not answer: the four queued uploads get the
    # first call's error instead of waiting a timeout of their own.
    assert backend.calls == [1]
    assert len({a.status_code for a in answers}) == 1 and answers[0].status_code in (503, 504)


def test_an_answered_failure_does_not_fail_the_uploads_queued_behind_it() -> None:
    settings = GatewaySettings(coalesce_max_in_flight=1)
    backend = SlowBackend(settings, fail=True, error=ModelUnavailableError)

    answers, _ = _run(settings, backend, [50] * 5)

    assert backend.calls == [1, 4]  # the backend answered: the next call is still tried
    assert [a.status_code for a in answers] == [503] * 5
