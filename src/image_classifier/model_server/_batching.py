"""Server-side batching with TF Serving's semantics (``--enable_batching``).

Requests for the same version and signature, with the same per-example shapes and dtypes, are
merged into one model call and split back, as TF Serving's shared batch scheduler does:

- A task joins the open batch of its queue while it fits in ``max_batch_size``; a task larger
  than that is refused (INVALID_ARGUMENT, TF Serving's words).
- A batch runs as soon as it is full, or once its oldest task has waited
  ``batch_timeout_micros``, on one of ``num_batch_threads`` threads. While every thread is
  busy the open batch keeps filling, so batches grow with load even at a zero timeout.
- At most ``max_enqueued_batches`` batches wait in a queue; a task that would need another is
  refused at once with UNAVAILABLE ("The batch scheduling queue ... is full"), the 503 a client
  can back off on, instead of waiting without bound.
- A merged batch is padded with copies of its first example up to the next of
  ``allowed_batch_sizes``, so the model sees only those shapes.

Beyond TF Serving: a failed merged batch is run again task by task, so one request's bad input
(an undecodable image in ``serving_bytes``, say) fails that request alone; and a task whose
deadline passed while it waited is answered DEADLINE_EXCEEDED and not run.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from image_classifier.errors import ConfigError
from image_classifier.tfserving.errors import InvalidArgumentError, ServingError

logger = logging.getLogger("image_classifier.model_server")

# TF Serving's defaults for fields a batching parameters file leaves out.
DEFAULT_MAX_BATCH_SIZE: Final = 1000
DEFAULT_BATCH_TIMEOUT_MICROS: Final = 0
DEFAULT_MAX_ENQUEUED_BATCHES: Final = 10

Outputs = dict[str, np.ndarray]
RunFunction = Callable[[Any, str, Mapping[str, np.ndarray], int], Outputs]


@dataclass(frozen=True)
class BatchingOptions:
    """The fields of TF Serving's ``BatchingParameters`` this server acts on."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_timeout_micros: int = DEFAULT_BATCH_TIMEOUT_MICROS
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_enqueued_batches: int = DEFAULT_MAX_ENQUEUED_BATCHES
    allowed_batch_sizes: tuple[int, ...] = ()

    @classmethod
    def from_proto(cls, params: Any) -> BatchingOptions:
        """From a parsed ``BatchingParameters`` message (unset fields: TF Serving's defaults)."""

        def value(name: str, default: int) -> int:
            return int(getattr(params, name).value) if params.HasField(name) else default

        return cls(
            max_batch_size=value("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
            batch_timeout_micros=value("batch_timeout_micros", DEFAULT_BATCH_TIMEOUT_MICROS),
            num_batch_threads=value("num_batch_threads", os.cpu_count() or 1),
            max_enqueued_batches=value("max_enqueued_batches", DEFAULT_MAX_ENQUEUED_BATCHES),
            allowed_batch_sizes=tuple(int(size) for size in params.allowed_batch_sizes),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BatchingOptions:
        """Read ``--batching_parameters_file`` as TF Serving does (text proto, then checks)."""
        from image_classifier.tfserving.config import (
            parse_batching_parameters,
            read_text_proto,
            validate_batching_parameters,
        )

        params = read_text_proto(Path(path), parse_batching_parameters)
        validate_batching_parameters(params, str(path))
        return cls.from_proto(params)

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.num_batch_threads, self.max_enqueued_batches) < 1:
            raise ConfigError(
                "max_batch_size, num_batch_threads and max_enqueued_batches must be >= 1"
            )
        if self.batch_timeout_micros < 0:
            raise ConfigError("batch_timeout_micros must be >= 0")


@dataclass
class _Task:
    loaded: Any
    signature_name: str
    inputs: Mapping[str, np.ndarray]
    size: int
    pixels: int
    deadline: float
    future: Future[Outputs] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Batch:
    opened_at: float
    tasks: list[_Task] = field(default_factory=list)
    size: int = 0


class BatchObserver:
    """Receives one call per batch run (the monitoring module implements it)."""

    def observe_batch(self, signature_name: str, tasks: int, size: int, padded: int) -> None:
        """A batch of ``tasks`` requests, ``size`` examples, run padded to ``padded``."""

    def observe_queuing(self, micros: float) -> None:
        """How long one task waited in the queue before its batch ran."""


class Batcher:
    """Merges concurrent predict tasks into batched model calls on a few threads."""

    def __init__(
        self,
        options: BatchingOptions,
        run: RunFunction,
        *,
        observer: BatchObserver | None = None,
    ) -> None:
        self.options = options
        self._run = run  # (loaded version, signature, inputs, pixels) -> outputs; may raise
        self.observer = observer or BatchObserver()
        self._queues: dict[Hashable, deque[_Batch]] = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self,
        loaded: Any,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        pixels: int = 0,
        deadline: float,
    ) -> Future[Outputs]:
        """Queue one request's inputs; its outputs (or its error) arrive through the future."""
        size = _batch_size(inputs)
        limit = self.options.max_batch_size
        if size > limit:
            raise InvalidArgumentError(
                f"Task size {size} is larger than maximum input batch size {limit}"
            )
        task = _Task(loaded, signature_name, inputs, size, pixels, deadline)
        key = (id(loaded), signature_name, _shapes(inputs))
        with self._changed:
            queue = self._queues.setdefault(key, deque())
            if queue and queue[-1].size + size <= limit:
                batch = queue[-1]
            else:
                if len(queue) >= self.options.max_enqueued_batches:
                    raise ServingError(
                        "The batch scheduling queue to which this task was submitted is full",
                        status="UNAVAILABLE",
                    )
                batch = _Batch(opened_at=time.monotonic())
                queue.append(batch)
            batch.tasks.append(task)
            batch.size += size
            self._changed.notify()
        return task.future

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- the batch threads ----------------------------------------------------------------------

    def _take_ready(self) -> tuple[_Batch | None, float]:
        """The batch to run now (full, or waited long enough), else how long to wait."""
        now = time.monotonic()
        timeout = self.options.batch_timeout_micros / 1e6
        soonest = 0.5  # re-check now and then: a stop request, or deadlines
        for key, queue in self._queues.items():
            if not queue:
                continue
            batch = queue[0]
            if batch.size >= self.options.max_batch_size or len(queue) > 1:
                return queue.popleft(), 0.0
            due = batch.opened_at + timeout - now
            if due <= 0:
                queue.popleft()
                if not queue:
                    del self._queues[key]
                return batch, 0.0
            soonest = min(soonest, due)
        return None, soonest

    def _work(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._stopping:
                        return
                    batch, wait = self._take_ready()
                    if batch is not None:
                        break
                    self._changed.wait(wait)
            try:
                self._process(batch)
            except Exception:  # a batch thread must outlive any one batch
                logger.exception("a batch failed unexpectedly")

    def _process(self, batch: _Batch) -> None:
        now = time.monotonic()
        live = []
        for task in batch.tasks:
            if task.deadline <= now:
                task.future.set_exception(
                    ServingError(
                        "Deadline exceeded while waiting in the batch queue",
                        status="DEADLINE_EXCEEDED",
                    )
                )
            elif task.future.set_running_or_notify_cancel():
                live.append(task)
                self.observer.observe_queuing((now - task.enqueued_at) * 1e6)
        if not live:
            return
        first = live[0]
        size = sum(task.size for task in live)
        padded = self._padded_size(size)
        merged = {
            key: _pad(np.concatenate([task.inputs[key] for task in live]), padded)
            for key in first.inputs
        }
        try:
            outputs = self._run(
                first.loaded, first.signature_name, merged, sum(t.pixels for t in live)
            )
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # One request's bad input must not fail the others: run each on its own.
            for task in live:
                self._run_alone(task)
            return
        self.observer.observe_batch(first.signature_name, len(live), size, padded)
        offset = 0
        for task in live:
            task.future.set_result(
                {key: value[offset : offset + task.size] for key, value in outputs.items()}
            )
            offset += task.size

    def _run_alone(self, task: _Task) -> None:
        try:
            outputs = self._run(task.loaded, task.signature_name, task.inputs, task.pixels)
        except Exception as exc:
            task.future.set_exception(exc)
        else:
            task.future.set_result(outputs)

    def _padded_size(self, size: int) -> int:
        sizes = self.options.allowed_batch_sizes
        if not sizes:
            return size
        return sizes[min(bisect.bisect_left(sizes, size), len(sizes) - 1)]


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    sizes = {value.shape[0] if value.ndim else -1 for value in inputs.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise InvalidArgumentError(
            "Batching requires every input to have the same 0th-dimension size"
        )
    return sizes.pop()


def _shapes(inputs: Mapping[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    return tuple((key, value.shape[1:], value.dtype.str) for key, value in sorted(inputs.items()))


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) >= size:
        return array
    # TF Serving pads with copies of the first example; their outputs are dropped.
    return np.concatenate([array, np.repeat(array[:1], size - len(array), axis=0)])
