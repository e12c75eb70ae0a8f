"""Concurrent uploads merged into one backend call: fewer, larger model calls under load.

A request's images join the pending queue. While fewer than ``max_in_flight`` backend calls are
running, the pending images (up to ``max_batch_size``, whole requests only) go out at once as one
call; otherwise they wait for the next free slot, gathering the images that arrive meanwhile. So
a lone request is sent immediately (no added latency when idle), and under load each request
waits at most for one call to finish while batches grow by themselves. The answer is split
back per request; a backend failure is every merged request's failure, as it would have been
for each alone, and a backend that did not answer (timeout, refused connection) fails the
requests queued behind that call too, instead of making each wait for a timeout of its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from image_classifier.gateway.backends import Backend, BackendPrediction
from image_classifier.gateway.errors import BackendTimeoutError, BackendUnavailableError
from image_classifier.gateway.metrics import GatewayMetrics


@dataclass
class _Part:
    images: np.ndarray
    future: asyncio.Future[BackendPrediction] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Coalescer:
    """Merges concurrent :meth:`Backend.predict` calls (``max_batch_size`` 1 turns it off)."""

    def __init__(
        self,
        backend: Backend,
        metrics: GatewayMetrics,
        *,
        max_batch_size: int,
        max_in_flight: int,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self._pending: list[_Part] = []
        self._in_flight = 0

    @property
    def pending_images(self) -> int:
        """Images waiting for a free call slot: the queue depth, 0 when idle."""
        return sum(len(part.images) for part in self._pending)

    async def predict(self, images: np.ndarray) -> BackendPrediction:
        if self.max_batch_size <= 1:
            return await self._call([images])
        part = _Part(images)
        self._pending.append(part)
        self._dispatch()
        return await part.future

    def _dispatch(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            batch = [self._pending.pop(0)]
            size = len(batch[0].images)
            while self._pending and size + len(self._pending[0].images) <= self.max_batch_size:
                size += len(self._pending[0].images)
                batch.append(self._pending.pop(0))
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[_Part]) -> None:
        try:
            try:
                merged = await self._call([part.images for part in batch])
            except Exception as exc:
                if isinstance(exc, (BackendTimeoutError, BackendUnavailableError)):
                    # The backend did not answer at all: the uploads queued behind this call
                    # would go to the same silent backend and wait a whole timeout more each,
                    # so they share this call's answer now.
                    batch += self._pending
                    self._pending = []
                for part in batch:
                    if not part.future.done():
                        part.future.set_exception(exc)
                return
            offset = 0
            for part in batch:
                rows = slice(offset, offset + len(part.images))
                offset += len(part.images)
                if not part.future.done():
                    part.future.set_result(
                        BackendPrediction(merged.probabilities[rows], merged.model_version)
                    )
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _call(self, parts: list[np.ndarray]) -> BackendPrediction:
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.metrics.backend_batch_images.observe(len(images))
        self.metrics.backend_batch_requests.observe(len(parts))
        return await self.backend.predict(images)
