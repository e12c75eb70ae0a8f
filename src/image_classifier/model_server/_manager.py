"""Which versions are served: load them, watch the base paths, swap without a restart.

This mirrors TensorFlow Serving's ServerCore with its availability-preserving loader. A
:class:`ModelManager` serves one model: its version policy (``latest { num_versions }``, the
default with one version; ``all``; ``specific { versions }``) picks the aspired versions among
the integer directories under the base path; new ones are loaded *fully* (and warmed up) beside
the current ones, then swapped in with a single reference assignment, and versions no longer
aspired are unloaded only once an aspired one is available. A request takes its
:class:`LoadedVersion` once and uses it to the end, so requests in flight finish on the version
they started on, and an unloaded version is freed when the last of them lets go. A version
that fails to load never replaces a working one.

A :class:`ModelRegistry` holds the managers by name, with the version labels of a
``--model_config_file``, and replaces that configuration without a restart (the config file
poller and the ModelService's HandleReloadConfigRequest).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from image_classifier.errors import ConfigError
from image_classifier.model_server._settings import ModelServerSettings
from image_classifier.servable import Servable, list_versions, load_servable
from image_classifier.tfserving.config import (
    ModelEntry,
    VersionPolicy,
    model_entries,
    read_model_server_config,
)
from image_classifier.tfserving.errors import InvalidArgumentError, NotFoundError, ServingError
from image_classifier.tfserving.signatures import NUMPY_DTYPES, Signature, SignatureTable
from image_classifier.tfserving.status import AVAILABLE, END, LOADING, VersionStatus
from image_classifier.tfserving.warmup import WarmupError, read_warmup_requests
from image_classifier.webserver import freeze_heap

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
    """Holds the served versions of one model and follows its base path and version policy."""

    def __init__(
        self,
        name: str,
        base_path: str | Path,
        *,
        policy: VersionPolicy | None = None,
        max_num_load_retries: int = 5,
        load_retry_interval_seconds: float = 60.0,
        loader: Callable[[Path], LoadedVersion] = load_version,
    ) -> None:
        self.name = name
        self.base_path = Path(base_path)
        self.policy = policy or VersionPolicy()
        self.max_num_load_retries = max_num_load_retries
        self.load_retry_interval_seconds = load_retry_interval_seconds
        self._loader = loader
        # Replaced, never mutated: a request reads it once without a lock.
        self._loaded: Mapping[int, LoadedVersion] = {}
        self._states: dict[int, VersionStatus] = {}
        self._failures: dict[int, tuple[int, float]] = {}  # version -> (attempts, monotonic)
        self._state_lock = threading.Lock()
        self._poll_lock = threading.Lock()  # one poll at a time: one load at a time
        self._warned_missing = False
        self._retired = False

    # --- what requests see ------------------------------------------------------------------

    def servable(self, name: str, version: int | None) -> LoadedVersion:
        """The loaded version a request asks for (the highest loaded when ``version`` is None)."""
        loaded = self._loaded  # read once: the poller may swap it at any moment
        if name == self.name and loaded:
            if version is None:
                return loaded[max(loaded)]
            if version in loaded:
                return loaded[version]
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

    def is_available(self, version: int) -> bool:
        return version in self._loaded

    # --- the poller -------------------------------------------------------------------------

    def poll(self) -> None:
        """Look at the base path once; load the aspired versions, unload the others."""
        with self._poll_lock:
            if self._retired:
                return
            if not self.base_path.is_dir():
                # TF Serving keeps what it serves when the base path itself is gone (an unmounted
                # volume is not a request to unload).
                if not self._warned_missing:
                    logger.warning("model base path %s does not exist (yet)", self.base_path)
                    self._warned_missing = True
                return
            self._warned_missing = False
            aspired = self.policy.aspired(list_versions(self.base_path))
            for version in reversed(aspired):  # the newest first: it is what Latest() serves
                if version not in self._loaded and self._may_try(version):
                    self._load(version)
            stale = [v for v in self._loaded if v not in aspired]
            # Availability first: the old versions go only once an aspired one is serving (or
            # when nothing is aspired any more, e.g. every version was deleted).
            if stale and (not aspired or any(v in self._loaded for v in aspired)):
                self._unload(stale)

    def set_policy(self, policy: VersionPolicy) -> None:
        """A new version policy, applied at the next :meth:`poll`."""
        with self._poll_lock:
            self.policy = policy

    def retire(self) -> None:
        """Unload every version: the model left the configuration."""
        with self._poll_lock:
            self._retired = True
            self._unload(list(self._loaded))

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
        with self._state_lock:
            # The atomic step: new requests see the new version from here.
            self._loaded = {**self._loaded, version: loaded}
            self._states[version] = VersionStatus(version, AVAILABLE)
        freeze_heap()
        logger.info(
            "%s version %d is AVAILABLE (loaded in %.1f s)",
            self.name,
            version,
            time.perf_counter() - started,
        )

    def _unload(self, versions: Iterable[int]) -> None:
        gone = set(versions)
        if not gone:
            return
        with self._state_lock:
            self._loaded = {v: lv for v, lv in self._loaded.items() if v not in gone}
            for version in gone:
                # In-flight requests keep their own reference; the graph is freed after them.
                self._states[version] = VersionStatus(version, END)
        for version in sorted(gone):
            logger.info("%s version %d unloaded", self.name, version)
        freeze_heap()  # unfreezes first, so the unloaded graphs can be collected

    def _set_state(self, status: VersionStatus) -> None:
        with self._state_lock:
            self._states[status.version] = status


ManagerFactory = Callable[[ModelEntry], ModelManager]


class ModelRegistry:
    """The models served, by name, with their version labels: TF Serving's ServerCore.

    ``configure`` (startup, the config file poller, HandleReloadConfigRequest) replaces the
    model list: models that stay keep their loaded versions (a changed base path is a new
    model), new ones are loaded before it returns, dropped ones are unloaded. Labels are
    checked before anything loads, as in TF Serving: a label may name only an AVAILABLE
    version, unless ``allow_version_labels_for_unavailable_models`` (then a label that already
    exists must not move to a version that is not available).
    """

    def __init__(
        self,
        make_manager: ManagerFactory,
        *,
        allow_version_labels_for_unavailable_models: bool = False,
    ) -> None:
        self._make_manager = make_manager
        self.allow_version_labels_for_unavailable_models = (
            allow_version_labels_for_unavailable_models
        )
        # Both replaced, never mutated, so requests read them without a lock.
        self._managers: Mapping[str, ModelManager] = {}
        self._labels: Mapping[str, Mapping[str, int]] = {}
        self._entries: tuple[ModelEntry, ...] | None = None
        self._config_lock = threading.Lock()  # one configure at a time

    @classmethod
    def single(
        cls, manager: ModelManager, make_manager: ManagerFactory | None = None
    ) -> ModelRegistry:
        """One model (``--model_name``/``--model_base_path``), already built.

        ``make_manager`` builds the models a later reload (HandleReloadConfigRequest) adds.
        """
        registry = cls(make_manager or _same_settings_as(manager))
        registry._managers = {manager.name: manager}
        registry._entries = (ModelEntry(manager.name, manager.base_path, manager.policy),)
        return registry

    @property
    def names(self) -> list[str]:
        return sorted(self._managers)

    def manager(self, name: str) -> ModelManager | None:
        return self._managers.get(name)

    # --- what requests see ------------------------------------------------------------------

    def version_for_label(self, name: str, label: str) -> int:
        version = self._labels.get(name, {}).get(label)
        if version is None:
            raise InvalidArgumentError(f"Unrecognized servable version label: {label}")
        return version

    def servable(self, name: str, version: int | None, label: str | None = None) -> LoadedVersion:
        """The loaded version a request names: Latest, Specific or by label."""
        if label is not None:
            version = self.version_for_label(name, label)
        manager = self._managers.get(name)
        if manager is None:
            spec = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise NotFoundError(f"Servable not found for request: {spec}")
        return manager.servable(name, version)

    def statuses(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        """GetModelStatus: every version, one, or the one a label names.

        TF Serving's GetModelStatus ignores a label (it answers every version, even for an
        unknown label); here a label is resolved as for predict and metadata, so
        ``/labels/L`` tells whether *that* version is AVAILABLE, and an unknown label is the
        same INVALID_ARGUMENT everywhere.
        """
        if label is not None:
            version = self.version_for_label(name, label)
        manager = self._managers.get(name)
        if manager is None:
            if version is not None:
                raise NotFoundError(f"Could not find version {version} of model {name}")
            raise NotFoundError(f"Could not find any versions of model {name}")
        return manager.statuses(name, version)

    def labels(self, name: str) -> dict[str, int]:
        return dict(self._labels.get(name, {}))

    # --- polling and configuration ----------------------------------------------------------

    def poll(self) -> None:
        """Look at every model's base path once."""
        for manager in list(self._managers.values()):
            try:
                manager.poll()
            except Exception:  # one unreadable base path must not stop the others
                logger.exception("polling %s failed", manager.base_path)

    def run_poller(self, stop: threading.Event, interval: float) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set (run in its own thread)."""
        while not stop.wait(interval):
            self.poll()

    @property
    def entries(self) -> tuple[ModelEntry, ...] | None:
        """The models of the configuration served now."""
        return self._entries

    def configure(self, entries: Iterable[ModelEntry]) -> None:
        """Serve exactly ``entries``; raises :class:`ServingError` (nothing changed) if refused."""
        entries = tuple(entries)
        with self._config_lock:
            if self._entries == entries:
                return
            labels = self._checked_labels(entries)
            old = dict(self._managers)
            managers: dict[str, ModelManager] = {}
            fresh: list[ModelManager] = []
            for entry in entries:
                manager = old.get(entry.name)
                if manager is not None and manager.base_path == entry.base_path:
                    manager.set_policy(entry.policy)
                else:
                    manager = self._make_manager(entry)
                    fresh.append(manager)
                managers[entry.name] = manager
            self._managers = managers
            self._labels = labels
            self._entries = entries
            for name, manager in old.items():
                if managers.get(name) is not manager:
                    logger.info("model %s left the configuration: unloading it", name)
                    manager.retire()
            # Like TF Serving, return once the new models are loaded (or failed to), and let
            # the models that stay pick up a changed version policy now rather than at the
            # next poll.
            for manager in managers.values():
                try:
                    manager.poll()
                except Exception:
                    logger.exception("loading %s from %s failed", manager.name, manager.base_path)
            logger.info(
                "serving %d model(s): %s", len(managers), ", ".join(sorted(managers)) or "none"
            )

    def _checked_labels(self, entries: Iterable[ModelEntry]) -> dict[str, dict[str, int]]:
        labels: dict[str, dict[str, int]] = {}
        for entry in entries:
            manager = self._managers.get(entry.name)
            for label, version in entry.version_labels.items():
                allowed = self.allow_version_labels_for_unavailable_models and (
                    self._labels.get(entry.name, {}).get(label, version) == version
                )
                available = (
                    manager is not None
                    and manager.base_path == entry.base_path
                    and manager.is_available(version)
                )
                if not (allowed or available):
                    raise ServingError(
                        f"Request to assign label to version {version} of model {entry.name}, "
                        "which is not currently available for inference",
                        status="FAILED_PRECONDITION",
                    )
                labels.setdefault(entry.name, {})[label] = version
        return labels


def _manager_factory(
    max_num_load_retries: int,
    load_retry_interval_seconds: float,
    loader: Callable[[Path], LoadedVersion],
) -> ManagerFactory:
    """Managers for config entries, all with the same load retries and loader."""

    def make(entry: ModelEntry) -> ModelManager:
        return ModelManager(
            entry.name,
            entry.base_path,
            policy=entry.policy,
            max_num_load_retries=max_num_load_retries,
            load_retry_interval_seconds=load_retry_interval_seconds,
            loader=loader,
        )

    return make


def _same_settings_as(manager: ModelManager) -> ManagerFactory:
    return _manager_factory(
        manager.max_num_load_retries, manager.load_retry_interval_seconds, manager._loader
    )


# --- building the registry from the command line -------------------------------------------------


def build_registry(settings: ModelServerSettings) -> ModelRegistry:
    """The registry the flags describe; nothing is loaded yet (see :func:`load_models`)."""
    make = _manager_factory(
        settings.max_num_load_retries,
        settings.load_retry_interval_seconds,
        functools.partial(load_version, warmup=settings.enable_model_warmup),
    )

    if settings.model_config_file is None:
        return ModelRegistry.single(
            make(ModelEntry(settings.model_name, settings.model_base_path)), make
        )
    return ModelRegistry(
        make,
        allow_version_labels_for_unavailable_models=(
            settings.allow_version_labels_for_unavailable_models
        ),
    )


def read_model_config(path: Path) -> tuple[ModelEntry, ...]:
    """``--model_config_file``'s models; :class:`ConfigError` naming the file if refused."""
    try:
        return tuple(model_entries(read_model_server_config(path)))
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith(f"{path}:") else f"{path}: {message}"
        ) from None


def check_startup_config(settings: ModelServerSettings) -> None:
    """Refuse at once the ``--model_config_file`` TF Serving would refuse at startup.

    Nothing is loaded yet at startup, so, as in TF Serving, a version label needs
    ``--allow_version_labels_for_unavailable_models``.
    """
    if settings.model_config_file is None:
        return
    entries = read_model_config(settings.model_config_file)
    if settings.allow_version_labels_for_unavailable_models:
        return
    for entry in entries:
        for version in entry.version_labels.values():
            raise ConfigError(
                f"{settings.model_config_file}: Request to assign label to version {version} of "
                f"model {entry.name}, which is not currently available for inference "
                "(labels may name a version before it loads only with "
                "--allow_version_labels_for_unavailable_models)"
            )


def load_models(registry: ModelRegistry, settings: ModelServerSettings) -> None:
    """The first load, before the ports open; a config the registry refuses is a ConfigError."""
    if settings.model_config_file is None:
        registry.poll()
        return
    entries = read_model_config(settings.model_config_file)
    try:
        registry.configure(entries)
    except ServingError as exc:
        raise ConfigError(f"{settings.model_config_file}: {exc}") from None


def run_config_poller(
    registry: ModelRegistry, path: Path, stop: threading.Event, interval: float
) -> None:
    """Re-read ``--model_config_file`` every ``interval`` seconds; apply it when it changed.

    A file that does not parse, or a config the registry refuses, is logged and the served
    config stays, as in TF Serving; it is tried again at the next poll. Unlike TF Serving, a
    poll applies the file only when its contents changed since the last one applied, so a
    HandleReloadConfigRequest is not undone a second later by an unchanged file.
    """
    applied = registry.entries
    last_error = ""
    while not stop.wait(interval):
        try:
            entries = read_model_config(path)
            if entries != applied:
                registry.configure(entries)
                applied = entries
            last_error = ""
        except (ConfigError, ServingError) as exc:
            if str(exc) != last_error:  # once per distinct problem, not every poll
                logger.error("model config file not applied: %s", exc)
                last_error = str(exc)
        except Exception:  # the poller must outlive any one bad poll
            logger.exception("polling %s failed", path)
