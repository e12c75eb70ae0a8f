"""``BatchingParameters`` and ``MonitoringConfig``, declared because no package ships them.

TF Serving publishes its API and ``ModelServerConfig`` message types in the
``tensorflow-serving-api`` wheel, but not these two (they live in ``session_bundle_config.proto``
and ``monitoring_config.proto``, which its wheel leaves out). They are declared here with
protobuf's descriptor API, in TF Serving's package (``tensorflow.serving``) with its field names,
types and numbers, so protobuf's own text-format parser reads ``--batching_parameters_file`` and
``--monitoring_config_file`` exactly as TF Serving does: an unknown field or a value of the wrong
type is refused. A private descriptor pool keeps them from clashing with the real generated
modules, should a later wheel ship them.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Final

_PACKAGE: Final = "tensorflow.serving"

# (name, number, type, label, message type) per field; type names as in descriptor.proto.
_INT64_VALUE: Final = ".google.protobuf.Int64Value"
_BATCHING_FIELDS: Final = (
    ("max_batch_size", 1, "TYPE_MESSAGE", _INT64_VALUE),
    ("batch_timeout_micros", 2, "TYPE_MESSAGE", _INT64_VALUE),
    ("max_enqueued_batches", 3, "TYPE_MESSAGE", _INT64_VALUE),
    ("num_batch_threads", 4, "TYPE_MESSAGE", _INT64_VALUE),
    ("thread_pool_name", 5, "TYPE_MESSAGE", ".google.protobuf.StringValue"),
    ("allowed_batch_sizes", 6, "TYPE_INT64", None),
    ("pad_variable_length_inputs", 7, "TYPE_BOOL", None),
    ("enable_large_batch_splitting", 8, "TYPE_MESSAGE", ".google.protobuf.BoolValue"),
    ("max_execution_batch_size", 9, "TYPE_MESSAGE", _INT64_VALUE),
)
_REPEATED: Final = frozenset({"allowed_batch_sizes"})


@cache
def message_classes() -> dict[str, Any]:
    """``{"BatchingParameters": cls, "MonitoringConfig": cls}``, built once."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    field = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="image_classifier/tf_serving_configs.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    batching = proto.message_type.add(name="BatchingParameters")
    for name, number, type_name, message_type in _BATCHING_FIELDS:
        entry = batching.field.add(
            name=name,
            number=number,
            type=field.Type.Value(type_name),
            label=field.LABEL_REPEATED if name in _REPEATED else field.LABEL_OPTIONAL,
        )
        if message_type is not None:
            entry.type_name = message_type
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config",
        number=1,
        type=field.TYPE_MESSAGE,
        type_name=f".{_PACKAGE}.PrometheusConfig",
        label=field.LABEL_OPTIONAL,
    )
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in ("BatchingParameters", "MonitoringConfig")
    }
