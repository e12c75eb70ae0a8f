"""One picture's way through the gateway: bytes -> preprocess -> backend -> top-k labels.

The steps live in their own modules, in that order: :mod:`image_classifier.preprocess`,
:mod:`.backends`, :mod:`.postprocess`; this module runs them for a batch of uploads.

Preprocessing is :func:`image_classifier.preprocess.preprocess_pixels`, the project's single
definition of it; it runs in worker threads (Pillow decoding is CPU work that would otherwise
stall every other request on the event loop), at most a few at a time, so a burst of 12 MP
uploads cannot hold dozens of decoded photos in memory at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import anyio
import numpy as np

from image_classifier.errors import ImageClassifierError, InvalidImageError
from image_classifier.gateway.backends import Backend
from image_classifier.gateway.coalesce import Coalescer
from image_classifier.gateway.errors import TooManyPixelsError, UnsupportedMediaTypeError
from image_classifier.gateway.handlers import error_info
from image_classifier.gateway.metrics import GatewayMetrics
from image_classifier.gateway.postprocess import top_k
from image_classifier.gateway.schemas import ClassPrediction, ImageResult
from image_classifier.gateway.settings import GatewaySettings
from image_classifier.preprocess import decoded_pixels, preprocess_pixels
from image_classifier.webserver import DecodeBudget

# Uploads this small are decoded on the event loop (see Pipeline.preprocess).
_INLINE_BYTES = 32 * 1024
_INLINE_PIXELS = 128 * 128
# Requests up to this size have their image headers read on the event loop.
_INLINE_HEADER_BYTES = 4 * 1024 * 1024

# Declared part types that may hold an image. Browsers and curl label files by extension and use
# application/octet-stream when they do not know, so that is let through to the decoder.
_PASS_THROUGH_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


def check_declared_type(content_type: str | None, filename: str | None) -> None:
    """415 for a file part that says it is not an image (e.g. text/plain)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media.startswith("image/") or media in _PASS_THROUGH_TYPES:
        return
    name = f" {filename!r}" if filename else ""
    raise UnsupportedMediaTypeError(
        f"the file{name} was sent as {media}; send an image (image/jpeg, image/png, ...)"
    )


@dataclass
class Upload:
    """One image as received: its bytes, or the reason it was refused before decoding."""

    filename: str | None
    data: bytes | None = None
    error: ImageClassifierError | None = None


@dataclass
class Classified:
    filename: str | None
    predictions: list[ClassPrediction] | None = None
    error: ImageClassifierError | None = None

    def to_result(self) -> ImageResult:
        return ImageResult(
            filename=self.filename,
            predictions=self.predictions,
            error=error_info(self.error) if self.error is not None else None,
        )


@dataclass
class BatchOutcome:
    items: list[Classified]
    model_version: str | None


class Pipeline:
    def __init__(self, settings: GatewaySettings, backend: Backend, metrics: GatewayMetrics):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self._limiter: anyio.CapacityLimiter | None = None
        # Decoded pixels held at once across requests: a burst of large PNGs waits its turn
        # (then 503) instead of multiplying the gateway's peak memory.
        self.coalescer = Coalescer(
            backend,
            metrics,
            max_batch_size=settings.coalesce_max_batch_size,
            max_in_flight=settings.coalesce_max_in_flight,
        )
        self.decode_budget = DecodeBudget(
            settings.decode_budget_pixels,
            wait_s=settings.request_timeout_s,
            setting="GATEWAY_DECODE_BUDGET_PIXELS",
        )

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # Created on first use, inside the running event loop.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        return self._limiter

    def _decode(self, data: bytes, pixels: int) -> np.ndarray:
        # Runs in a worker thread: waiting for decoding room blocks the thread, not the loop.
        with self.decode_budget.reserve(pixels):
            return preprocess_pixels(data, max_pixels=self.settings.max_image_pixels)

    async def preprocess(self, data: bytes, pixels: int) -> np.ndarray:
        """``data`` decoded and preprocessed; ``pixels`` is :func:`decoded_pixels` of it."""
        self.metrics.upload_bytes.observe(len(data))
        if len(data) <= _INLINE_BYTES and 0 < pixels <= _INLINE_PIXELS:
            # A thumbnail decodes in a fraction of a millisecond: less than a thread hop.
            return preprocess_pixels(data, max_pixels=self.settings.max_image_pixels)
        return await anyio.to_thread.run_sync(
            partial(self._decode, data, pixels), limiter=self.limiter
        )

    async def check_request_pixels(self, uploads: Sequence[Upload]) -> list[int]:
        """Each upload's decoded pixels (0 for those already refused), from the headers alone;
        413 for a request whose images together exceed the per-request cap.

        Checked before anything is decoded: 16 blank 7000x7000 PNGs are 2.5 MB on the wire and
        2.4 GB of pixels. Reading a header takes tens of microseconds (decoders stop at the
        dimensions), less than a hop to a worker thread, so ordinary requests are read on the
        event loop; only a request of many megabytes goes to a thread.
        """
        blobs = [u.data if u.error is None and u.data is not None else b"" for u in uploads]

        def count() -> list[int]:
            return [decoded_pixels(data) if data else 0 for data in blobs]

        if sum(map(len, blobs)) <= _INLINE_HEADER_BYTES:
            pixels = count()
        else:
            pixels = await anyio.to_thread.run_sync(count, limiter=self.limiter)
        total, limit = sum(pixels), self.settings.max_request_pixels
        if total > limit:
            raise TooManyPixelsError(
                f"the images in this request decode to {total:,} pixels; the limit is "
                f"{limit:,} per request (GATEWAY_MAX_REQUEST_PIXELS): send fewer or smaller "
                "images"
            )
        return pixels

    async def classify(self, uploads: Sequence[Upload], k: int) -> BatchOutcome:
        """Classify every valid upload in one backend call; invalid ones keep their error.

        Invalid image content stays per image; backend failures raise (they concern them all).
        """
        pixels = await self.check_request_pixels(uploads)
        items = [Classified(u.filename, error=u.error) for u in uploads]
        arrays: dict[int, np.ndarray] = {}

        async def prepare(index: int, data: bytes) -> None:
            try:
                arrays[index] = await self.preprocess(data, pixels[index])
            except InvalidImageError as exc:
                items[index].error = exc

        async with anyio.create_task_group() as group:
            for index, upload in enumerate(uploads):
                if upload.error is None and upload.data is not None:
                    group.start_soon(prepare, index, upload.data)

        for item in items:
            if item.error is not None:
                self.metrics.images_rejected.labels(item.error.code).inc()
        if not arrays:
            return BatchOutcome(items, None)

        indices = sorted(arrays)
        batch = np.stack([arrays[i] for i in indices])
        prediction = await self.coalescer.predict(batch)
        names = self.backend.class_names(prediction.model_version)
        for row, index in enumerate(indices):
            predictions = top_k(prediction.probabilities[row], names, k)
            items[index].predictions = predictions
            self.metrics.images_classified.labels(predictions[0].label).inc()
            self.metrics.top1_probability.observe(predictions[0].probability)
        return BatchOutcome(items, prediction.model_version)
