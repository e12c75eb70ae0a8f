"""A version's signatures as TensorFlow Serving sees them: read from its ``saved_model.pb``.

TF Serving takes dtypes, shapes and tensor names from the MetaGraphDef's ``signature_def`` map,
not from Python objects, and its metadata endpoint prints that map with protobuf's JSON printer.
Doing the same here gives byte-for-byte the field names, int64-as-string sizes and tensor names
(``serving_default_images:0``) that TF Serving clients parse, and never hard-codes the export.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from image_classifier.errors import ModelNotFoundError

SERVE_TAG: Final = "serve"

# A SignatureDef's method_name: what TF Serving's Predict, Classify and Regress APIs accept.
PREDICT_METHOD: Final = "tensorflow/serving/predict"
CLASSIFY_METHOD: Final = "tensorflow/serving/classify"
REGRESS_METHOD: Final = "tensorflow/serving/regress"

# DataType enum names -> NumPy dtypes the JSON codec can fill. Others are refused at request time.
NUMPY_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "DT_HALF": np.dtype(np.float16),
    "DT_FLOAT": np.dtype(np.float32),
    "DT_DOUBLE": np.dtype(np.float64),
    "DT_INT8": np.dtype(np.int8),
    "DT_INT16": np.dtype(np.int16),
    "DT_INT32": np.dtype(np.int32),
    "DT_INT64": np.dtype(np.int64),
    "DT_UINT8": np.dtype(np.uint8),
    "DT_UINT16": np.dtype(np.uint16),
    "DT_UINT32": np.dtype(np.uint32),
    "DT_UINT64": np.dtype(np.uint64),
    "DT_BOOL": np.dtype(np.bool_),
    "DT_STRING": np.dtype(object),
}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a signature."""

    key: str  # the signature's name for it ("images"), used in requests and responses
    dtype: str  # DataType enum name ("DT_FLOAT")
    shape: tuple[int | None, ...] | None  # None: unknown rank; None in a dim: any size
    tensor_name: str  # the graph tensor ("serving_default_images:0")

    @property
    def type_name(self) -> str:
        """``float`` for DT_FLOAT: TF Serving's spelling in type errors."""
        return self.dtype.removeprefix("DT_").lower()

    def shape_text(self) -> str:
        if self.shape is None:
            return "[?]"
        return "[" + ",".join("-1" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Signature:
    """One entry of the SavedModel's ``signature_def`` map."""

    name: str
    method_name: str
    inputs: Mapping[str, TensorInfo]
    outputs: Mapping[str, TensorInfo]


@dataclass(frozen=True)
class SignatureTable:
    """All signatures of a version, plus their JSON form for the metadata endpoint."""

    signatures: Mapping[str, Signature]
    metadata_json: dict[str, Any]  # {"signature_def": {name: SignatureDef as JSON}}


def read_signature_table(version_dir: Path) -> SignatureTable:
    """Parse ``saved_model.pb`` (or ``.pbtxt``) of a version directory."""
    meta_graph = _serving_meta_graph(version_dir)
    signatures: dict[str, Signature] = {}
    as_json: dict[str, Any] = {}
    for name in sorted(meta_graph.signature_def):
        proto = meta_graph.signature_def[name]
        signatures[name] = Signature(
            name=name,
            method_name=proto.method_name,
            inputs={key: _tensor_info(key, proto.inputs[key]) for key in sorted(proto.inputs)},
            outputs={key: _tensor_info(key, proto.outputs[key]) for key in sorted(proto.outputs)},
        )
        as_json[name] = _message_to_json(proto)
    return SignatureTable(signatures, {"signature_def": as_json})


def _serving_meta_graph(version_dir: Path) -> Any:
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    binary, text = version_dir / "saved_model.pb", version_dir / "saved_model.pbtxt"
    try:
        if binary.exists():
            saved_model.ParseFromString(binary.read_bytes())
        else:
            text_format.Parse(text.read_text(encoding="utf-8"), saved_model)
    except (OSError, message.DecodeError, text_format.ParseError) as exc:
        raise ModelNotFoundError(f"{version_dir} has no readable saved_model.pb: {exc}") from None
    for meta_graph in saved_model.meta_graphs:
        # TF Serving loads the MetaGraphDef tagged "serve".
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ModelNotFoundError(f"{version_dir} has no MetaGraphDef tagged {SERVE_TAG!r}")


def _tensor_info(key: str, proto: Any) -> TensorInfo:
    from tensorflow.core.framework import types_pb2

    shape: tuple[int | None, ...] | None
    if not proto.HasField("tensor_shape") or proto.tensor_shape.unknown_rank:
        shape = None
    else:
        shape = tuple(None if d.size < 0 else int(d.size) for d in proto.tensor_shape.dim)
    return TensorInfo(
        key=key,
        dtype=types_pb2.DataType.Name(proto.dtype),
        shape=shape,
        tensor_name=proto.name,
    )


def _message_to_json(proto: Any) -> dict[str, Any]:
    """protobuf -> JSON as TF Serving prints it: proto field names, default values included."""
    from google.protobuf import json_format

    result: dict[str, Any]
    try:
        result = json_format.MessageToDict(
            proto, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf < 5.26 names the option differently
        legacy = {"including_default_value_fields": True}
        result = json_format.MessageToDict(proto, preserving_proto_field_name=True, **legacy)
    return result
