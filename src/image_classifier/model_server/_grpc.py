"""TF Serving's gRPC API on ``--port``: PredictionService, ModelService and health checking.

The servicers subclass the generated ones that ``tensorflow-serving-api`` publishes, so the
wire format is TF Serving's own, and any stock client (``PredictionServiceStub``) works. They
answer from the same :class:`~._manager.ModelRegistry`, the same batcher and the same signature
runner (:func:`._service.run_signature`) as the REST routes, so a gRPC Predict and a REST
``:predict`` of the same inputs give the same numbers, and concurrent requests from both
protocols share batches.

Errors keep TF Serving's texts and codes: a :class:`ServingError`'s canonical status names the
gRPC status code (TF Serving's ``ToGRPCStatus`` casts one to the other), and messages longer
than 1,024 characters are truncated as TF Serving truncates them. Where gRPC and REST differ in
TF Serving, this follows its gRPC side (an unknown signature in Predict is FAILED_PRECONDITION
'Serving signature key "x" not found.', for instance).

The server runs on a thread pool of ``--grpc_max_threads``, bound by :func:`bind` before the
models load (so a taken port fails at once) and started by the app's lifespan once they have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from image_classifier.constants import SERVING_DEFAULT
from image_classifier.errors import ConfigError, ServeError
from image_classifier.model_server._batching import Batcher
from image_classifier.model_server._manager import LoadedVersion, ModelRegistry
from image_classifier.model_server._monitoring import ServerMetrics
from image_classifier.model_server._service import check_encoded_images
from image_classifier.model_server._settings import ModelServerSettings
from image_classifier.preprocess import MAX_PIXELS
from image_classifier.tfserving.config import model_entries
from image_classifier.tfserving.errors import InvalidArgumentError, ServingError, code_number
from image_classifier.tfserving.signatures import CLASSIFY_METHOD, PREDICT_METHOD, REGRESS_METHOD
from image_classifier.webserver import DecodeBudget

logger = logging.getLogger("image_classifier.model_server")

# tensorflow_serving/model_servers/grpc_status_util.cc
_ERROR_MESSAGE_LIMIT: Final = 1024
# The health service names TF Serving registers (server.cc), besides the server-wide "".
HEALTH_SERVICES: Final = ("", "ModelService", "PredictionService")
_STOP_GRACE_SECONDS: Final = 5.0

RunSignature = Callable[[LoadedVersion, str, Mapping[str, np.ndarray], int], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Serving:
    """What the gRPC servicers share with the REST app (built in the app's lifespan)."""

    registry: ModelRegistry
    run_signature: RunSignature
    batcher: Batcher | None
    metrics: ServerMetrics
    decode_budget: DecodeBudget
    settings: ModelServerSettings


class GrpcServer:
    """The gRPC server: bound by :func:`bind`, serving from :meth:`start` to :meth:`stop`."""

    def __init__(self, server: Any, addresses: list[str], settings: ModelServerSettings) -> None:
        self._server = server
        self.addresses = addresses
        self._settings = settings
        self._health: Any = None

    def start(self, serving: Serving) -> None:
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _prediction_servicer(serving), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            _model_servicer(serving), self._server
        )
        if self._settings.enable_grpc_healthcheck_service:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc

            # TF Serving's (gRPC's default) health service: SERVING once the server runs,
            # whatever the models' states; GetModelStatus is the per-model readiness.
            self._health = health.HealthServicer()
            for service in HEALTH_SERVICES:
                self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._server.start()
        logger.info("gRPC ModelServer at %s", ", ".join(self.addresses))

    def stop(self) -> None:
        if self._health is not None:
            self._health.enter_graceful_shutdown()  # NOT_SERVING while in-flight calls finish
        self._server.stop(_STOP_GRACE_SECONDS).wait()


def bind(settings: ModelServerSettings) -> GrpcServer:
    """Create the server and bind its port (and socket); raises :class:`ServeError` if taken.

    Binding comes first, before the models load, so a command line with a busy port fails in
    a second rather than after the load.
    """
    import grpc

    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.grpc_max_threads, thread_name_prefix="grpc"
        ),
        options=[
            # TF Serving lifts gRPC's limits to INT32_MAX; requests are capped by this server's
            # own --max_request_bytes guard instead, as on the REST port.
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share
        ],
    )
    addresses = []
    if settings.grpc_port:
        addresses.append(f"{_host(settings.host)}:{settings.grpc_port}")
    if settings.grpc_socket_path:
        addresses.append(f"unix:{settings.grpc_socket_path}")
    for address in addresses:
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound and not address.startswith("unix:"):
            raise ServeError(f"gRPC port {address} is not free; pick another with --port")
        if not bound:
            raise ServeError(f"cannot listen on {address} (--grpc_socket_path)")
    return GrpcServer(server, addresses, settings)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- request handling ------------------------------------------------------------------------


def _abort(context: Any, exc: ServingError) -> None:
    import grpc

    message = exc.message
    if len(message) > _ERROR_MESSAGE_LIMIT:
        message = message[:_ERROR_MESSAGE_LIMIT] + "...TRUNCATED"
    code = getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN)
    if code.value[0] >= 13 or exc.status == "UNKNOWN":  # INTERNAL, UNAVAILABLE, ...: log them
        logger.error("gRPC call failed with %s: %s", exc.status, message)
    context.abort(code, message)


def _version_choice(spec: Any) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return int(spec.version.value), None
    if choice == "version_label":
        return None, str(spec.version_label)
    return None, None


def _servable(registry: ModelRegistry, request: Any) -> LoadedVersion:
    if not request.HasField("model_spec"):
        raise InvalidArgumentError("Missing ModelSpec")
    spec = request.model_spec
    if not spec.name:
        raise InvalidArgumentError("ModelSpec has no name specified.")
    version, label = _version_choice(spec)
    return registry.servable(spec.name, version, label)


def _checked_inputs(request: Any, signature: Any, max_batch_size: int) -> dict[str, np.ndarray]:
    import tensorflow as tf

    sent, expected = set(request.inputs), set(signature.inputs)
    if sent != expected:
        # TF Serving's VerifyRequestInputsSize text, which lists both sets.
        raise InvalidArgumentError(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
        )
    inputs: dict[str, np.ndarray] = {}
    for key, proto in request.inputs.items():
        try:
            array = np.asarray(tf.make_ndarray(proto))
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"input '{key}': malformed TensorProto: {exc}") from None
        info = signature.inputs[key]
        if proto.dtype != _dtype_enum(info.dtype):
            raise InvalidArgumentError(
                f"Expects arg[{sorted(signature.inputs).index(key)}] to be {info.type_name} "
                f"but {_dtype_name(proto.dtype)} is provided"
            )
        if array.ndim and array.shape[0] > max_batch_size:
            raise InvalidArgumentError(
                f"Task size {array.shape[0]} is larger than maximum input batch size "
                f"{max_batch_size}"
            )
        inputs[key] = array
    return inputs


def _dtype_enum(name: str) -> int:
    from tensorflow.core.framework import types_pb2

    return int(types_pb2.DataType.Value(name))


def _dtype_name(number: int) -> str:
    """``double`` for DT_DOUBLE: TensorFlow's DataTypeString, which TF Serving's texts use."""
    from tensorflow.core.framework import types_pb2

    try:
        return str(types_pb2.DataType.Name(number)).removeprefix("DT_").lower()
    except ValueError:
        return f"unknown dtype {number}"


def _prediction_servicer(serving: Serving) -> Any:
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    registry = serving.registry

    def predict(request: Any, context: Any) -> Any:
        loaded = _servable(registry, request)
        signature_name = request.model_spec.signature_name or SERVING_DEFAULT
        signature = loaded.signatures.get(signature_name)
        if signature is None:
            raise ServingError(
                f'Serving signature key "{signature_name}" not found.',
                status="FAILED_PRECONDITION",
            )
        if signature.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
            raise ServingError(
                "Expected prediction signature method_name to be one of "
                f"{{{PREDICT_METHOD}, {CLASSIFY_METHOD}, {REGRESS_METHOD}}}. "
                f"Was: {signature.method_name}",
                status="INTERNAL",
            )
        # TF Serving's order: inputs, then the output filter.
        inputs = _checked_inputs(request, signature, serving.settings.max_batch_size)
        wanted = list(request.output_filter) or list(signature.outputs)
        seen: set[str] = set()
        for alias in request.output_filter:
            if alias not in signature.outputs:
                raise InvalidArgumentError(
                    f"output tensor alias not found in signature: {alias} Outputs expected to "
                    f"be in the set {{{','.join(sorted(signature.outputs))}}}."
                )
            if alias in seen:
                raise InvalidArgumentError(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        pixels = check_encoded_images(
            inputs, max_image_pixels=MAX_PIXELS, max_request_pixels=serving.decode_budget.capacity
        )
        outputs = _run(serving, loaded, signature_name, inputs, pixels, context)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = signature_name
        response.model_spec.version.value = loaded.version
        for alias in wanted:
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias]))
        return response

    def get_model_metadata(request: Any, context: Any) -> Any:
        if not request.HasField("model_spec"):
            raise InvalidArgumentError("Missing ModelSpec")
        if not request.metadata_field:
            raise InvalidArgumentError(
                "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise InvalidArgumentError(f"Metadata field {field} is not supported")
        loaded = _servable(registry, request)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = loaded.version
        response.metadata["signature_def"].Pack(_signature_def_map(loaded))
        return response

    def unsupported(kind: str, method: str) -> Callable[[Any, Any], Any]:
        # Classify and Regress need a classify/regress signature; this project's model has
        # predict signatures only, which TF Serving refuses with these words. A model that does
        # have one gets UNIMPLEMENTED, as on the REST port.
        def handle(request: Any, context: Any) -> Any:
            loaded = _servable(registry, request)
            name = request.model_spec.signature_name or SERVING_DEFAULT
            signature = loaded.signatures.get(name)
            if signature is None:
                raise InvalidArgumentError(f"No signature was found with the name: {name}")
            if signature.method_name != method:
                raise InvalidArgumentError(
                    f"Expected {kind} signature method_name to be {method}. "
                    f"Was: {signature.method_name}"
                )
            raise ServingError(
                f"{kind} is not implemented by this model server", status="UNIMPLEMENTED"
            )

        return handle

    classify = unsupported("classification", CLASSIFY_METHOD)
    regress = unsupported("regression", REGRESS_METHOD)

    def multi_inference(request: Any, context: Any) -> Any:
        tasks = list(request.tasks)
        names = {task.model_spec.name for task in tasks}
        if not tasks:
            raise InvalidArgumentError("ModelSpec has no name specified.")
        if "" in names:
            raise InvalidArgumentError("Found ModelSpec with an empty model name.")
        if len(names) > 1:
            raise InvalidArgumentError(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
        version, label = _version_choice(tasks[0].model_spec)
        loaded = registry.servable(tasks[0].model_spec.name, version, label)
        seen: set[str] = set()
        for task in tasks:
            name = task.model_spec.signature_name or SERVING_DEFAULT
            if name in seen:
                raise InvalidArgumentError(f"Duplicate evaluation of signature: {name}")
            seen.add(name)
            signature = loaded.signatures.get(name)
            if signature is None:
                raise InvalidArgumentError(f"Requested signature not found in model graph: {name}")
            kinds = {CLASSIFY_METHOD: "classification", REGRESS_METHOD: "regression"}
            if task.method_name not in kinds:
                raise ServingError(
                    f"Unsupported signature method_name: {task.method_name}",
                    status="UNIMPLEMENTED",
                )
            if signature.method_name != task.method_name:
                raise InvalidArgumentError(
                    f"Expected {kinds[task.method_name]} signature method_name to be "
                    f"{task.method_name}. Was: {signature.method_name}"
                )
        raise ServingError(
            "MultiInference is not implemented by this model server", status="UNIMPLEMENTED"
        )

    handlers = {
        "Predict": predict,
        "GetModelMetadata": get_model_metadata,
        "Classify": classify,
        "Regress": regress,
        "MultiInference": multi_inference,
    }
    namespace = {
        name: _method(serving.metrics, name, handler) for name, handler in handlers.items()
    }
    servicer_class = type(
        "PredictionService", (prediction_service_pb2_grpc.PredictionServiceServicer,), namespace
    )
    return servicer_class()


def _model_servicer(serving: Serving) -> Any:
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_management_pb2,
        model_service_pb2_grpc,
    )

    registry = serving.registry

    def get_model_status(request: Any, context: Any) -> Any:
        if not request.HasField("model_spec"):
            raise InvalidArgumentError("Missing ModelSpec")
        spec = request.model_spec
        version, label = _version_choice(spec)  # a label is resolved, as on the REST port
        response = get_model_status_pb2.GetModelStatusResponse()
        states = get_model_status_pb2.ModelVersionStatus.State
        statuses = registry.statuses(spec.name, version, label)
        for status in sorted(statuses, key=lambda s: s.version):
            entry = response.model_version_status.add()
            entry.version = status.version
            entry.state = states.Value(status.state)
            entry.status.error_code = code_number(status.error_code)
            entry.status.error_message = status.error_message
        return response

    def handle_reload_config_request(request: Any, context: Any) -> Any:
        response = model_management_pb2.ReloadConfigResponse()
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidArgumentError(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported"
            )
        try:
            entries = model_entries(request.config)
        except ConfigError as exc:
            raise InvalidArgumentError(str(exc)) from None
        registry.configure(entries)
        response.status.error_code = 0
        return response

    namespace = {
        "GetModelStatus": _method(None, "GetModelStatus", get_model_status),
        "HandleReloadConfigRequest": _method(
            None, "HandleReloadConfigRequest", handle_reload_config_request
        ),
    }
    servicer_class = type("ModelService", (model_service_pb2_grpc.ModelServiceServicer,), namespace)
    return servicer_class()


def _method(
    metrics: ServerMetrics | None, api: str, handler: Callable[[Any, Any], Any]
) -> Callable[[Any, Any, Any], Any]:
    """A servicer method: ServingError -> gRPC status; Predict and friends counted and timed."""

    def method(self: Any, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        status = "OK"
        try:
            return handler(request, context)
        except ServingError as exc:
            status = exc.status
            _abort(context, exc)
        except Exception:
            status = "INTERNAL"
            # A bug: the traceback goes to the log, never to the client.
            logger.exception("gRPC %s failed", api)
            _abort(context, ServingError("Internal error; see the model server's log"))
        finally:
            if metrics is not None:
                if api == "MultiInference":
                    name = request.tasks[0].model_spec.name if request.tasks else ""
                else:
                    name = request.model_spec.name
                micros = (time.perf_counter() - started) * 1e6
                metrics.observe_request(name, status, api, "GRPC", micros)
        return None  # not reached: abort raises

    method.__name__ = api
    return method


def _run(
    serving: Serving,
    loaded: LoadedVersion,
    signature_name: str,
    inputs: dict[str, np.ndarray],
    pixels: int,
    context: Any,
) -> dict[str, np.ndarray]:
    """Run through the batcher when batching is on, else directly: the REST path's two ways."""
    remaining = context.time_remaining()
    timeout = None if remaining is None else max(remaining, 0.0)
    if serving.batcher is None:
        return serving.run_signature(loaded, signature_name, inputs, pixels)
    # Without a client deadline a task may wait as long as it takes (TF Serving's default).
    deadline = time.monotonic() + (timeout if timeout is not None else 365 * 86400.0)
    future = serving.batcher.submit(
        loaded, signature_name, inputs, pixels=pixels, deadline=deadline
    )
    try:
        return future.result(timeout)
    except futures.TimeoutError:
        future.cancel()
        raise ServingError("Deadline Exceeded", status="DEADLINE_EXCEEDED") from None


def _signature_def_map(loaded: LoadedVersion) -> Any:
    """The version's ``SignatureDefMap``, from its ``saved_model.pb`` as TF Serving sends it."""
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    message = get_model_metadata_pb2.SignatureDefMap()
    # The table's JSON is protobuf's own printing of these SignatureDefs: parsing it back gives
    # the same messages without reading the file again.
    json_format.ParseDict(loaded.table.metadata_json, message)
    return message
