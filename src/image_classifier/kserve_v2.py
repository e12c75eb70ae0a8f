"""The Open Inference Protocol (KServe v2, Triton's HTTP API), defined once: JSON, binary tensors.

What ``/v2/models/NAME[/versions/N]/infer`` carries, mapped onto a SavedModel signature:

- Request: ``{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data" |
  "parameters": {"binary_data_size": N}}], "outputs"?: [{"name", "parameters"?: {"binary_data":
  bool}}]}``. With the binary tensor data extension the JSON is only the first
  ``Inference-Header-Content-Length`` bytes of the body; the raw tensors follow, in input order,
  little-endian, BYTES elements each prefixed by a 4-byte little-endian length.
- Response: ``{"model_name", "model_version", "id"?, "outputs": [{"name", "shape", "datatype",
  "data" | "parameters": {"binary_data_size": N}}]}``, binary outputs after the JSON the same way
  (per output ``binary_data``, or for all with the request parameter ``binary_data_output``).
- Errors: ``{"error": "..."}``, 400 for a bad request and 404 for an unknown model or version:
  the same shape as TF Serving's, so :class:`~image_classifier.tfserving.errors.ServingError`
  carries them.

Tensor names are the signature's input and output keys (``images``, ``probabilities``), datatypes
map from TensorFlow's (``DT_FLOAT`` -> ``FP32``), and the type rules for JSON data are TF Serving's
(:func:`~image_classifier.tfserving.json_tensor.numeric_tensor`), so a value the v1 API takes is
taken here too. The request parameter ``signature_name`` (TF Serving's word) picks another
signature than ``serving_default``, e.g. ``serving_bytes`` with a BYTES input of encoded images.
NumPy only: no TensorFlow, no web framework.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from image_classifier.tfserving.errors import InvalidArgumentError
from image_classifier.tfserving.json_tensor import json_floats, numeric_tensor, parse_json_object
from image_classifier.tfserving.signatures import NUMPY_DTYPES, Signature, TensorInfo

PLATFORM: Final = "tensorflow_savedmodel"  # Triton's name for a TensorFlow SavedModel
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
BINARY_DATA_SIZE: Final = "binary_data_size"
BINARY_DATA: Final = "binary_data"
BINARY_DATA_OUTPUT: Final = "binary_data_output"
SIGNATURE_NAME: Final = "signature_name"
EXTENSIONS: Final = ("binary_tensor_data",)

# TensorFlow DataType names -> the protocol's datatypes.
DATATYPES: Final[dict[str, str]] = {
    "DT_BOOL": "BOOL",
    "DT_UINT8": "UINT8",
    "DT_UINT16": "UINT16",
    "DT_UINT32": "UINT32",
    "DT_UINT64": "UINT64",
    "DT_INT8": "INT8",
    "DT_INT16": "INT16",
    "DT_INT32": "INT32",
    "DT_INT64": "INT64",
    "DT_HALF": "FP16",
    "DT_FLOAT": "FP32",
    "DT_DOUBLE": "FP64",
    "DT_BFLOAT16": "BF16",
    "DT_STRING": "BYTES",
}
_NUMPY_DATATYPES: Final[dict[np.dtype[Any], str]] = {
    NUMPY_DTYPES[tf_name]: datatype
    for tf_name, datatype in DATATYPES.items()
    if tf_name in NUMPY_DTYPES
}
_LENGTH: Final = struct.Struct("<I")  # a BYTES element's length prefix


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's ``outputs``: which tensor, and whether it travels as binary."""

    name: str
    binary: bool | None  # None: the request-level binary_data_output decides


@dataclass(frozen=True)
class InferRequest:
    """An infer body split into its JSON document and the binary section after it."""

    document: dict[str, Any]
    binary: bytes

    @property
    def id(self) -> str | None:
        value = self.document.get("id")
        if value is not None and not isinstance(value, str):
            raise InvalidArgumentError("'id' must be a string")
        return value

    @property
    def parameters(self) -> dict[str, Any]:
        value = self.document.get("parameters", {})
        if not isinstance(value, dict):
            raise InvalidArgumentError("'parameters' must be an object")
        return value

    def signature_name(self, default: str) -> str:
        name = self.parameters.get(SIGNATURE_NAME, default)
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"parameter '{SIGNATURE_NAME}' must be a non-empty string")
        return name


# --- metadata ------------------------------------------------------------------------------------


def tensor_metadata(info: TensorInfo) -> dict[str, Any]:
    """``{"name", "datatype", "shape"}``; -1 for a dimension of any size (an unknown rank: [-1])."""
    shape = [-1] if info.shape is None else [-1 if d is None else d for d in info.shape]
    return {"name": info.key, "datatype": DATATYPES.get(info.dtype, info.dtype), "shape": shape}


def model_metadata(name: str, versions: Sequence[int], signature: Signature) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [tensor_metadata(info) for info in signature.inputs.values()],
        "outputs": [tensor_metadata(info) for info in signature.outputs.values()],
    }


def parse_version(text: str | None) -> int | None:
    """A version segment of the URL: versions of a SavedModel base path are integers."""
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 18:
        raise InvalidArgumentError(f"Invalid model version: {text!r} (versions are integers)")
    return int(text)


# --- request -------------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> InferRequest:
    """The JSON header (the whole body without ``Inference-Header-Content-Length``), the rest."""
    if header_length is None:
        return InferRequest(parse_json_object(body), b"")
    text = header_length.strip()
    if not text.isdigit() or int(text) > len(body):
        raise InvalidArgumentError(
            f"{HEADER_LENGTH}: {header_length!r} is not a length within the {len(body):,}-byte body"
        )
    size = int(text)
    return InferRequest(parse_json_object(body[:size]), body[size:])


def decode_inputs(
    request: InferRequest, signature: Signature, *, model_name: str, max_batch_size: int
) -> dict[str, np.ndarray]:
    """One array per signature input, from JSON ``data`` or the binary section; all checked."""
    entries = request.document.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError("'inputs' must be a non-empty array of input tensors")
    check_bools = any(isinstance(e, dict) and "data" in e for e in entries)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"input {index} must be an object")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidArgumentError(f"input {index} has no 'name' string")
        info = signature.inputs.get(name)
        if info is None:
            raise InvalidArgumentError(
                f"unexpected inference input '{name}' for model '{model_name}'; its inputs are "
                f"{', '.join(signature.inputs)}"
            )
        if name in arrays:
            raise InvalidArgumentError(f"input '{name}' is given more than once")
        shape = _checked_shape(entry, info, max_batch_size=max_batch_size)
        datatype = _checked_datatype(entry, info)
        parameters = entry.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidArgumentError(f"input '{name}': 'parameters' must be an object")
        size = parameters.get(BINARY_DATA_SIZE)
        if size is not None:
            if "data" in entry:
                raise InvalidArgumentError(
                    f"input '{name}' has both 'data' and the '{BINARY_DATA_SIZE}' parameter"
                )
            if type(size) is not int or size < 0:
                raise InvalidArgumentError(
                    f"input '{name}': '{BINARY_DATA_SIZE}' must be a non-negative integer"
                )
            if offset + size > len(request.binary):
                raise InvalidArgumentError(
                    f"input '{name}' expects {size:,} bytes of binary data but only "
                    f"{len(request.binary) - offset:,} remain after the JSON header"
                )
            chunk = request.binary[offset : offset + size]
            offset += size
            arrays[name] = _from_binary(chunk, name, datatype, info, shape)
        elif "data" in entry:
            arrays[name] = _from_json(entry["data"], name, info, shape, check_bools=check_bools)
        else:
            raise InvalidArgumentError(
                f"input '{name}' has neither 'data' nor the '{BINARY_DATA_SIZE}' parameter"
            )
    if offset != len(request.binary):
        raise InvalidArgumentError(
            f"the body has {len(request.binary) - offset:,} bytes of binary data that no "
            f"input's '{BINARY_DATA_SIZE}' accounts for"
        )
    missing = [key for key in signature.inputs if key not in arrays]
    if missing:
        raise InvalidArgumentError(
            f"expected {len(signature.inputs)} inputs but got {len(arrays)} inputs for model "
            f"'{model_name}'; missing: {', '.join(missing)}"
        )
    return arrays


def requested_outputs(
    request: InferRequest, signature: Signature, *, model_name: str
) -> list[RequestedOutput]:
    """The outputs to return, in order: those named in ``outputs``, else all of the signature's."""
    entries = request.document.get("outputs")
    if entries is None:
        return [RequestedOutput(key, None) for key in signature.outputs]
    if not isinstance(entries, list):
        raise InvalidArgumentError("'outputs' must be an array")
    chosen: list[RequestedOutput] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidArgumentError(f"output {index} must be an object with a 'name' string")
        name = entry["name"]
        if name not in signature.outputs:
            raise InvalidArgumentError(
                f"unexpected inference output '{name}' for model '{model_name}'; its outputs "
                f"are {', '.join(signature.outputs)}"
            )
        parameters = entry.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidArgumentError(f"output '{name}': 'parameters' must be an object")
        binary = parameters.get(BINARY_DATA)
        if binary is not None and not isinstance(binary, bool):
            raise InvalidArgumentError(f"output '{name}': '{BINARY_DATA}' must be true or false")
        chosen.append(RequestedOutput(name, binary))
    return chosen or [RequestedOutput(key, None) for key in signature.outputs]


def binary_output_default(request: InferRequest) -> bool:
    value = request.parameters.get(BINARY_DATA_OUTPUT, False)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"parameter '{BINARY_DATA_OUTPUT}' must be true or false")
    return value


def _checked_shape(
    entry: dict[str, Any], info: TensorInfo, *, max_batch_size: int
) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidArgumentError(
            f"input '{info.key}': 'shape' must be an array of non-negative integers"
        )
    if info.shape is not None and (
        len(shape) != len(info.shape)
        or any(e is not None and e != d for e, d in zip(info.shape, shape, strict=True))
    ):
        raise InvalidArgumentError(
            f"unexpected shape for input '{info.key}': the model expects "
            f"{info.shape_text()}, the request has [{','.join(map(str, shape))}]"
        )
    if info.shape and info.shape[0] is None and shape[0] > max_batch_size:
        # The v1 API's words for the same limit.
        raise InvalidArgumentError(
            f"Task size {shape[0]} is larger than maximum input batch size {max_batch_size}"
        )
    return tuple(shape)


def _checked_datatype(entry: dict[str, Any], info: TensorInfo) -> str:
    expected = DATATYPES.get(info.dtype)
    if expected is None or info.dtype not in NUMPY_DTYPES:
        raise InvalidArgumentError(
            f"input '{info.key}' has type {info.dtype}, which this server cannot fill"
        )
    datatype = entry.get("datatype")
    if datatype != expected:
        raise InvalidArgumentError(
            f"unexpected datatype {datatype} for inference input '{info.key}', expecting {expected}"
        )
    return expected


def _from_json(
    data: Any, name: str, info: TensorInfo, shape: tuple[int, ...], *, check_bools: bool
) -> np.ndarray:
    where = f"input '{name}'"
    count = math.prod(shape)
    if info.dtype == "DT_STRING":
        flat = _flatten(data)
        if not all(isinstance(item, str) for item in flat):
            raise InvalidArgumentError(f"{where}: BYTES data must be strings")
        try:
            values = [item.encode("utf-8") for item in flat]
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise InvalidArgumentError(f"{where}: a string is not valid Unicode") from None
        array = np.empty(len(values), dtype=object)
        array[:] = values
    else:
        # Nested or flat, row-major: both are the protocol's; NumPy flattens either.
        array = numeric_tensor(data, info, where, check_bools=check_bools).reshape(-1)
    if array.size != count:
        raise InvalidArgumentError(
            f"{where}: 'data' has {array.size} values but shape "
            f"[{','.join(map(str, shape))}] needs {count}"
        )
    return array.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    stack, flat = [data], []
    while stack:  # iterative: a deeply nested body must not overflow the stack
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        else:
            flat.append(node)
    return flat


def _from_binary(
    chunk: bytes, name: str, datatype: str, info: TensorInfo, shape: tuple[int, ...]
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        values = _split_bytes(chunk, name)
        if len(values) != count:
            raise InvalidArgumentError(
                f"input '{name}': the binary data holds {len(values)} BYTES elements but shape "
                f"[{','.join(map(str, shape))}] needs {count}"
            )
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    dtype = NUMPY_DTYPES[info.dtype]
    wire = np.dtype(np.uint8) if dtype.kind == "b" else dtype.newbyteorder("<")
    if len(chunk) != count * wire.itemsize:
        raise InvalidArgumentError(
            f"input '{name}': {len(chunk):,} bytes of binary data, but shape "
            f"[{','.join(map(str, shape))}] of {datatype} needs {count * wire.itemsize:,}"
        )
    raw = np.frombuffer(chunk, dtype=wire)
    # One byte per BOOL; anything non-zero is true. A copy: frombuffer's view is read-only.
    array = raw != 0 if dtype.kind == "b" else raw.astype(dtype, copy=True)
    return array.reshape(shape)


def _split_bytes(chunk: bytes, name: str) -> list[bytes]:
    values, position = [], 0
    while position < len(chunk):
        if position + _LENGTH.size > len(chunk):
            raise InvalidArgumentError(f"input '{name}': a BYTES element's length is cut short")
        (length,) = _LENGTH.unpack_from(chunk, position)
        position += _LENGTH.size
        if position + length > len(chunk):
            raise InvalidArgumentError(
                f"input '{name}': a BYTES element claims {length:,} bytes past the end of its data"
            )
        values.append(chunk[position : position + length])
        position += length
    return values


# --- response ------------------------------------------------------------------------------------


def encode_infer_response(
    *,
    model_name: str,
    model_version: int,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    requested: Sequence[RequestedOutput],
    binary_default: bool,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None).

    Floats in JSON are written as their shortest round-trip decimals and non-finite values as
    ``NaN``/``Infinity``/``-Infinity``, as the v1 API writes them, so both give the same numbers.
    """
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for wanted in requested:
        array = outputs[wanted.name]
        entry: dict[str, Any] = {
            "name": wanted.name,
            "datatype": _datatype_of(array),
            "shape": list(array.shape),
        }
        if wanted.binary if wanted.binary is not None else binary_default:
            blob = _to_binary(array)
            entry["parameters"] = {BINARY_DATA_SIZE: len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(array)
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = entries
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    datatype = _NUMPY_DATATYPES.get(array.dtype)
    if datatype is None:
        raise InvalidArgumentError(f"output type {array.dtype} has no Open Inference datatype")
    return datatype


def _as_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode()


def _to_json(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == np.float32:
        result: list[Any] = json_floats(flat)
        return result
    if array.dtype.kind in "OSU":
        return [_as_bytes(item).decode("utf-8", errors="replace") for item in flat]
    values: list[Any] = flat.tolist()
    return values


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OSU":
        parts = []
        for item in array.reshape(-1):
            data = _as_bytes(item)
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)
    if array.dtype.kind == "b":
        return array.astype(np.uint8).tobytes()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
