"""Which version is served: load the highest one, watch the base path, swap without a restart.

This mirrors TensorFlow Serving's default ``latest`` version policy with its
availability-preserving loader: the aspired version is the highest integer directory under the
base path; a new one is loaded *fully* (and warmed up) beside the current one, then swapped in
with a single reference assignment. A request takes its :class:`LoadedVersion` once and uses
it to the end, so requests in flight finish on the version they started on, and the old
version is freed when the last of them lets go. A version that fails to load never replaces
a working one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from image_classifier.servable import Servable, list_versions, load_servable
from image_classifier.tfserving.errors import InvalidArgumentError, NotFoundError
from image_classifier.tfserving.signatures import NUMPY_DTYPES, Signature, SignatureTable
from image_classifier.tfserving.status import AVAILABLE, END, LOADING, VersionStatus
from image_classifier.tfserving.warmup import WarmupError, read_warmup_requests

logger = logging.getLogger("image_classifier.model_server")


@dataclass(frozen=True)
class LoadedVersion:
    """One version, loaded and ready: what a request holds on to while it runs."""

    version: int
    servable: Servable

    @property
    def table(self) -> SignatureTable:
        return self.servable.signature_table

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self.table.signatures

    def signature(self, name: str) -> Signature:
        signature = self.table.signatures.get(name)
        if signature is None:
            raise InvalidArgumentError(
                f'Serving signature name: "{name}" not found in signature def'
            )
        return signature

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call one signature of the loaded SavedModel; TensorFlow errors propagate."""
        import tensorflow as tf

        function = self.servable.signatures.get(signature_name)
        if function is None:  # in signature_def but not callable, e.g. __saved_model_init_op
            raise InvalidArgumentError(f"Failed to get input map for signature: {signature_name}")
        tensors = {key: tf.convert_to_tensor(value) for key, value in inputs.items()}
        result = function(**tensors)
        return {key: value.numpy() for key, value in result.items()}


def load_version(version_dir: Path, *, warmup: bool = True) -> LoadedVersion:
    """Load one version directory and warm it up (the first call of a graph is the slow one).

    With ``warmup`` (``--enable_model_warmup``, on by default as in TF Serving) the version's
    ``assets.extra/tf_serving_warmup_requests`` are replayed, and a malformed file or a failing
    request fails the load, as in TF Serving; a version without the file gets one made-up
    request per signature whose inputs can be made up.
    """
    servable = load_servable(version_dir)
    loaded = LoadedVersion(version=servable.version, servable=servable)
    if not warmup:
        return loaded
    try:
        requests = read_warmup_requests(servable.path)
    except ImportError as exc:  # the file is there, TF Serving's message types are not
        logger.warning("cannot read %s's warmup file (%s); warming up without it", version_dir, exc)
        requests = []
    if not requests:
        _synthetic_warm_up(loaded)
        return loaded
    started = time.perf_counter()
    for index, request in enumerate(requests):
        try:
            loaded.run(request.signature_name, request.inputs)
        except Exception as exc:
            raise WarmupError(
                f"warmup request {index} ({request.signature_name}) of {version_dir} failed: {exc}"
            ) from None
    logger.info(
        "replayed %d warmup requests of %s in %.2f s",
        len(requests),
        version_dir,
        time.perf_counter() - started,
    )
    return loaded


def _synthetic_warm_up(loaded: LoadedVersion) -> None:
    for signature in loaded.signatures.values():
        inputs = {}
        for key, info in signature.inputs.items():
            if info.shape is None or info.dtype == "DT_STRING" or info.dtype not in NUMPY_DTYPES:
                break  # no safe example to make up (an empty string is no image)
            shape = tuple(1 if d is None else d for d in info.shape)
            inputs[key] = np.zeros(shape, dtype=NUMPY_DTYPES[info.dtype])
        else:
            if inputs and signature.name in loaded.servable.signatures:
                try:
                    loaded.run(signature.name, inputs)
                except Exception as exc:  # warm-up is an optimisation, never a load failure
                    logger.warning("warm-up of %s failed: %s", signature.name, exc)


class ModelManager:
    """Holds the served version of one model and replaces it when a newer one appears."""

    def __init__(
        self,
        name: str,
        base_path: str | Path,
        *,
        max_num_load_retries: int = 5,
        load_retry_interval_seconds: float = 60.0,
        loader: Callable[[Path], LoadedVersion] = load_version,
    ) -> None:
        self.name = name
        self.base_path = Path(base_path)
        self.max_num_load_retries = max_num_load_retries
        self.load_retry_interval_seconds = load_retry_interval_seconds
        self._loader = loader
        self._current: LoadedVersion | None = None
        self._states: dict[int, VersionStatus] = {}
        self._failures: dict[int, tuple[int, float]] = {}  # version -> (attempts, monotonic)
        self._state_lock = threading.Lock()
        self._poll_lock = threading.Lock()  # one poll at a time: one load at a time
        self._warned_missing = False

    # --- what requests see ------------------------------------------------------------------

    def servable(self, name: str, version: int | None) -> LoadedVersion:
        """The loaded version a request asks for (latest when ``version`` is None)."""
        current = self._current  # read once: the poller may swap it at any moment
        if name == self.name and current is not None and version in (None, current.version):
            return current
        spec = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        raise NotFoundError(f"Servable not found for request: {spec}")

    def statuses(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """TF Serving's GetModelStatus: every version it has seen, newest first, or one."""
        with self._state_lock:
            states = dict(self._states) if name == self.name else {}
        if version is not None:
            if version not in states:
                raise NotFoundError(f"Could not find version {version} of model {name}")
            return [states[version]]
        if not states:
            raise NotFoundError(f"Could not find any versions of model {name}")
        return [states[v] for v in sorted(states, reverse=True)]

    # --- the poller -------------------------------------------------------------------------

    def poll(self) -> None:
        """Look at the base path once; load and swap in the aspired version if it changed."""
        with self._poll_lock:
            if not self.base_path.is_dir():
                # TF Serving keeps what it serves when the base path itself is gone (an unmounted
                # volume is not a request to unload).
                if not self._warned_missing:
                    logger.warning("model base path %s does not exist (yet)", self.base_path)
                    self._warned_missing = True
                return
            self._warned_missing = False
            versions = list_versions(self.base_path)
            current = self._current
            if not versions:
                if current is not None:
                    logger.warning("no versions left under %s: unloading", self.base_path)
                    self._swap(None)
                return
            aspired = versions[-1]
            if current is not None and current.version == aspired:
                return
            if self._may_try(aspired):
                self._load(aspired)

    def run_poller(self, stop: threading.Event, interval: float) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set (run in its own thread)."""
        while not stop.wait(interval):
            try:
                self.poll()
            except Exception:  # the poller must outlive any one bad poll
                logger.exception("polling %s failed", self.base_path)

    def _may_try(self, version: int) -> bool:
        attempts, last = self._failures.get(version, (0, 0.0))
        if attempts == 0:
            return True
        if attempts > self.max_num_load_retries:
            return False
        return time.monotonic() - last >= self.load_retry_interval_seconds

    def _load(self, version: int) -> None:
        version_dir = self.base_path / str(version)
        self._set_state(VersionStatus(version, LOADING))
        logger.info("loading %s version %d from %s", self.name, version, version_dir)
        started = time.perf_counter()
        try:
            loaded = self._loader(version_dir)
        except Exception as exc:  # any failure: keep serving what we have
            attempts = self._failures.get(version, (0, 0.0))[0] + 1
            self._failures[version] = (attempts, time.monotonic())
            final = attempts > self.max_num_load_retries
            logger.error(
                "loading %s version %d failed (attempt %d of %d): %s",
                self.name,
                version,
                attempts,
                self.max_num_load_retries + 1,
                exc,
            )
            self._set_state(VersionStatus(version, END if final else LOADING, "UNKNOWN", str(exc)))
            return
        self._failures.pop(version, None)
        self._swap(loaded)
        logger.info(
            "%s version %d is AVAILABLE (loaded in %.1f s)",
            self.name,
            version,
            time.perf_counter() - started,
        )

    def _swap(self, loaded: LoadedVersion | None) -> None:
        with self._state_lock:
            old = self._current
            self._current = loaded  # the atomic step: new requests see the new version from here
            if loaded is not None:
                self._states[loaded.version] = VersionStatus(loaded.version, AVAILABLE)
            if old is not None and (loaded is None or old.version != loaded.version):
                # In-flight requests keep their own reference; the old graph is freed after them.
                self._states[old.version] = VersionStatus(old.version, END)
        if old is not None and (loaded is None or old.version != loaded.version):
            logger.info("%s version %d unloaded", self.name, old.version)

    def _set_state(self, status: VersionStatus) -> None:
        with self._state_lock:
            self._states[status.version] = status
