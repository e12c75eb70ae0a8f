"""TF Serving's JSON <-> tensor mapping for ``:predict`` (its ``util/json_tensor.cc``), in NumPy.

Both sides of the wire live here: the server's request decoder and response encoder, and the
client's request encoder (:func:`encode_instances`, :func:`json_floats`) and response decoder
(:func:`decode_predictions`), used by the gateway's TF Serving backend and ``make-request``.

Request: ``{"signature_name"?, "instances": [...]}`` (row format: one entry per example, a bare
value for a single input or an object keyed by input name) or ``{"signature_name"?, "inputs":
tensor | {name: tensor}}`` (columnar). Strings may be ``{"b64": "..."}``. Response:
``{"predictions": [...]}`` or ``{"outputs": ...}``, a lone output without its name, several as
an object; float32 values written as their shortest round-trip decimals, like TF Serving.

Type rules follow TF Serving (2.5 and later): a float tensor takes JSON numbers (not ``true``,
not ``"1.5"``), each rounded to the nearest float, so a literal beyond float32's range becomes
+/-inf; ``NaN``, ``Infinity`` and ``-Infinity`` are accepted (its parser runs with
``kParseNanAndInfFlag``) and written back the same way. An integer tensor takes JSON integers, a
bool tensor ``true``/``false``, a string tensor strings or b64 objects. Beyond TF Serving, values
are checked against the signature's shape and batches are capped, so every bad request is a 400
here instead of an error deep in the graph.

Conversion is vectorised (``np.asarray`` on the parsed lists); the slow element-by-element walk
only runs to explain an error, or when the body contains ``true``/``false`` at all (NumPy would
silently turn a stray boolean into 1.0).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from image_classifier.tfserving.errors import InvalidArgumentError, UnimplementedError
from image_classifier.tfserving.signatures import NUMPY_DTYPES, Signature, TensorInfo

INSTANCES: Final = "instances"
INPUTS: Final = "inputs"
SIGNATURE_NAME: Final = "signature_name"
B64: Final = "b64"
BYTES_SUFFIX: Final = "_bytes"  # string outputs named *_bytes are written as {"b64": ...}


@dataclass(frozen=True)
class DecodedPredictRequest:
    """A parsed ``:predict`` body, ready to feed the signature."""

    signature_name: str
    row_format: bool
    inputs: dict[str, np.ndarray]


# --- request -----------------------------------------------------------------------------------


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or TF Serving's "JSON Parse error" (400)."""
    if not body.strip():
        raise InvalidArgumentError("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    except RecursionError:
        raise InvalidArgumentError("JSON Parse error: the document is nested too deeply") from None
    except ValueError as exc:  # not UTF-8/16/32
        raise InvalidArgumentError(f"JSON Parse error: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError(f"JSON Value: {_preview(document)} Is not object")
    return document


def signature_name_of(document: Mapping[str, Any], default: str) -> str:
    name = document.get(SIGNATURE_NAME, "")
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f"JSON Value: {_preview(name)} not formatted correctly. "
            "'signature_name' key must be a string value."
        )
    return name or default


def decode_predict_request(
    document: Mapping[str, Any],
    signature: Signature,
    *,
    max_batch_size: int,
    may_contain_bools: bool = True,
) -> DecodedPredictRequest:
    """Turn a parsed body into one array per signature input, checked against the signature.

    ``may_contain_bools=False`` (the raw body has no ``true``/``false``) skips the element walk
    that catches booleans NumPy would otherwise coerce to numbers.
    """
    if not signature.inputs:
        raise InvalidArgumentError(f"Failed to get input map for signature: {signature.name}")
    has_instances, has_inputs = INSTANCES in document, INPUTS in document
    if has_instances and has_inputs:
        raise InvalidArgumentError(
            "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"
        )
    converter = _Converter(signature, max_batch_size=max_batch_size, check_bools=may_contain_bools)
    if has_instances:
        inputs = converter.from_instances(document[INSTANCES])
        return DecodedPredictRequest(signature.name, True, inputs)
    if has_inputs:
        inputs = converter.from_inputs(document[INPUTS])
        return DecodedPredictRequest(signature.name, False, inputs)
    raise InvalidArgumentError("Missing 'inputs' or 'instances' key")


class _Converter:
    def __init__(self, signature: Signature, *, max_batch_size: int, check_bools: bool) -> None:
        self.signature = signature
        self.max_batch_size = max_batch_size
        self.check_bools = check_bools

    # Row format ------------------------------------------------------------------------------

    def from_instances(self, instances: Any) -> dict[str, np.ndarray]:
        if not isinstance(instances, list):
            raise InvalidArgumentError("Expecting 'instances' to be an list/array")
        if not instances:
            raise InvalidArgumentError("No values in 'instances' array")
        self._check_batch(len(instances))
        inputs = self.signature.inputs
        named = _is_named_object(instances[0])
        if not named and len(inputs) > 1:
            raise InvalidArgumentError(
                "instances is a plain list, but expecting list of objects as multiple input "
                "tensors required as per tensorinfo_map"
            )
        if named:
            columns: dict[str, list[Any]] = {key: [] for key in inputs}
            for index, instance in enumerate(instances):
                if not _is_named_object(instance):
                    raise InvalidArgumentError(
                        f"Expecting object but got list at item {index} of input list"
                    )
                for key in instance:
                    if key not in inputs:
                        raise InvalidArgumentError(
                            f"Failed to process element: {index} key: {key} of 'instances' "
                            f"list. Error: JSON object: does not have named input: {key}"
                        )
                if len(instance) != len(inputs):
                    raise InvalidArgumentError(
                        f"Failed to process element: {index} of 'instances' list. JSON object "
                        f"keys must be equal to: {','.join(sorted(inputs))}"
                    )
                for key in inputs:
                    columns[key].append(instance[key])
        else:
            for index, instance in enumerate(instances):
                if _is_named_object(instance):
                    raise InvalidArgumentError(
                        f"Expecting value/list but got object at item {index} of input list"
                    )
            columns = {next(iter(inputs)): instances}
        return {key: self._tensor(columns[key], inputs[key], rows=True) for key in inputs}

    # Columnar format -------------------------------------------------------------------------

    def from_inputs(self, value: Any) -> dict[str, np.ndarray]:
        inputs = self.signature.inputs
        if not isinstance(value, dict) or _is_b64_object(value):
            if len(inputs) > 1:
                raise InvalidArgumentError(
                    "inputs is a plain value/list, but expecting an object as multiple input "
                    "tensors required as per tensorinfo_map"
                )
            columns = {next(iter(inputs)): value}
        else:
            # Like TF Serving, keys that are not inputs of the signature are ignored.
            for key in inputs:
                if key not in value:
                    raise InvalidArgumentError(f"Missing named input: {key} in 'inputs' object.")
            columns = {key: value[key] for key in inputs}
        for column in columns.values():
            if isinstance(column, list):
                self._check_batch(len(column))
        return {key: self._tensor(columns[key], inputs[key], rows=False) for key in inputs}

    # One tensor ------------------------------------------------------------------------------

    def _check_batch(self, size: int) -> None:
        if size > self.max_batch_size:
            # TF Serving's batching layer answers a too-big task with these words.
            raise InvalidArgumentError(
                f"Task size {size} is larger than maximum input batch size {self.max_batch_size}"
            )

    def _tensor(self, value: Any, info: TensorInfo, *, rows: bool) -> np.ndarray:
        where = f"{INSTANCES if rows else INPUTS} key: {info.key}"
        # Like TF Serving, take the shape from the first element at each level and compare it
        # with the signature before converting: a wrong rank gets a shape message, not NumPy's,
        # and a later element that differs fails the conversion as ragged.
        _check_shape(_first_path_shape(value), info, self.signature.name, rows=rows)
        if info.dtype == "DT_STRING":
            array = _string_tensor(value, info, where, rows=rows)
        elif info.dtype in NUMPY_DTYPES:
            array = numeric_tensor(value, info, where, rows=rows, check_bools=self.check_bools)
        else:
            raise UnimplementedError(f"Conversion of JSON values to type: {info.dtype}")
        return array


def numeric_tensor(
    value: Any, info: TensorInfo, where: str, *, rows: bool = False, check_bools: bool = True
) -> np.ndarray:
    """Nested JSON lists of numbers (or booleans) -> an array of ``info``'s dtype, TF's rules.

    ``where`` starts each message; ``rows`` words ragged and type errors per instance;
    ``check_bools=False`` (the raw body has no ``true``/``false``) skips the element walk that
    catches booleans NumPy would otherwise coerce to numbers.
    """
    target = NUMPY_DTYPES[info.dtype]
    accepts = _leaf_check(target)
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidArgumentError(_ragged_message(value, where, rows=rows)) from None
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "fiu"}[target.kind]
    if raw.dtype.kind not in allowed or (check_bools and target.kind != "b"):
        bad = _first_bad_leaf(value, accepts)
        if bad is not _NO_LEAF:
            raise InvalidArgumentError(_type_message(value, bad, info, where, rows=rows))
    if raw.dtype.kind not in allowed:
        # Every leaf has the right JSON type, yet NumPy made objects: integers beyond 64 bits.
        try:
            raw = np.asarray(value, dtype=np.float64 if target.kind == "f" else object)
        except OverflowError:  # an integer literal beyond double's range (rapidjson refuses it)
            raise InvalidArgumentError(
                f"{where}: a JSON number is too big to be stored in double"
            ) from None
        except (ValueError, TypeError):
            raise InvalidArgumentError(_ragged_message(value, where, rows=rows)) from None
        if raw.dtype == object:
            raise InvalidArgumentError(
                f"{where}: a value does not fit in {info.type_name} without loss of precision"
            )
    return _cast(raw, target, info, where)


def _cast(raw: np.ndarray, target: np.dtype[Any], info: TensorInfo, where: str) -> np.ndarray:
    if target.kind == "f":
        # TF Serving (since 2.5) stores any JSON number as the nearest float: rounded, and
        # +/-inf beyond the type's range; NaN and infinities pass through. NumPy's cast does
        # exactly that; only its overflow warning is silenced. No pass over the values here:
        # this is the hot path of every image request.
        with np.errstate(over="ignore"):
            return raw.astype(target, copy=False)
    if target.kind in "iu" and raw.size:
        bounds = np.iinfo(target)
        low, high = raw.min(), raw.max()
        if low < bounds.min or high > bounds.max:
            bad = low if low < bounds.min else high
            raise InvalidArgumentError(
                f"{where}: JSON Value: {int(bad)} Type: Number is not of expected type: "
                f"{info.type_name}"
            )
    return raw.astype(target, copy=False)


def _first_path_shape(value: Any) -> tuple[int, ...]:
    """The list lengths along the first element of each level (TF's GetDenseTensorShape)."""
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _string_tensor(value: Any, info: TensorInfo, where: str, *, rows: bool) -> np.ndarray:
    shape = _first_path_shape(value)
    strings: list[bytes] = []
    try:
        for leaf in _dense_leaves(value, shape):
            strings.append(_string_value(leaf, info, where))
    except _RaggedError:
        raise InvalidArgumentError(_ragged_message(value, where, rows=rows)) from None
    array = np.empty(len(strings), dtype=object)
    array[:] = strings
    return array.reshape(shape)


def _string_value(leaf: Any, info: TensorInfo, where: str) -> bytes:
    if isinstance(leaf, str):
        try:
            return leaf.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise InvalidArgumentError(f"{where}: a string is not valid Unicode") from None
    if isinstance(leaf, dict):
        if not _is_b64_object(leaf):
            raise InvalidArgumentError(
                f"JSON Value: {_preview(leaf)} not formatted correctly for base64 data"
            )
        return _b64decode(leaf[B64])
    raise InvalidArgumentError(
        f"{where}: JSON Value: {_preview(leaf)} Type: {_json_type(leaf)} is not of expected "
        f"type: {info.type_name}"
    )


def _b64decode(text: str) -> bytes:
    try:
        data = text.encode("ascii")
        # absl::Base64Unescape, which TF Serving uses, accepts unpadded input too.
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise InvalidArgumentError("Unable to base64 decode") from None


def _check_shape(shape: tuple[int, ...], info: TensorInfo, signature: str, *, rows: bool) -> None:
    if info.shape is None:
        return
    expected, actual = info.shape, shape
    if rows:
        expected, actual = expected[1:], actual[1:]
    fits = len(expected) == len(actual) and all(
        e is None or e == a for e, a in zip(expected, actual, strict=True)
    )
    if rows and len(info.shape) == 0:
        fits = False  # a scalar input has no batch dimension to put instances on
    if not fits:
        wanted = f" ({_shape_text(expected)} per instance)" if rows else ""
        given = "each instance has shape" if rows else "the tensor has shape"
        raise InvalidArgumentError(
            f"input '{info.key}' of signature {signature} expects shape {info.shape_text()}"
            f"{wanted}; {given} {_shape_text(actual)}"
        )


# --- response ----------------------------------------------------------------------------------


def encode_predict_response(outputs: Mapping[str, np.ndarray], *, row_format: bool) -> bytes:
    """Signature outputs -> TF Serving's ``predictions`` (row) or ``outputs`` (columnar) JSON."""
    if not outputs:
        raise InvalidArgumentError("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if row_format:
        batch = -1
        for name in names:
            array = outputs[name]
            if array.ndim == 0:
                raise InvalidArgumentError(f"Tensor name: {name} has no shape information ")
            if batch >= 0 and array.shape[0] != batch:
                raise InvalidArgumentError(
                    f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} "
                    f"expecting: {batch}"
                )
            batch = array.shape[0]
        values = {name: _json_values(name, outputs[name]) for name in names}
        if len(names) == 1:
            body: dict[str, Any] = {"predictions": values[names[0]]}
        else:
            body = {"predictions": [{n: values[n][i] for n in names} for i in range(batch)]}
    else:
        values = {name: _json_values(name, outputs[name]) for name in names}
        body = {"outputs": values[names[0]] if len(names) == 1 else values}
    # NaN/Infinity are written bare, as TF Serving does (allow_nan is json's default).
    return json.dumps(body, separators=(",", ":")).encode()


def _json_values(name: str, array: np.ndarray) -> Any:
    if array.dtype.kind == "f":
        if array.dtype.itemsize <= 4:
            return json_floats(array)
        return array.tolist()
    if array.dtype.kind in "OSU":
        as_bytes = name.endswith(BYTES_SUFFIX)

        def encode(item: Any) -> Any:
            data = item if isinstance(item, bytes) else str(item).encode()
            if as_bytes:
                return {B64: base64.b64encode(data).decode("ascii")}
            return data.decode("utf-8", errors="replace")

        flat = [encode(item) for item in array.ravel()]
        holder = np.empty(len(flat), dtype=object)
        holder[:] = flat
        return holder.reshape(array.shape).tolist()
    return array.tolist()


def json_floats(values: np.ndarray) -> Any:
    """float32 array -> nested lists of the shortest decimals that read back as the same float32.

    ``0.5019608`` instead of ``0.501960813999176``: half the bytes, and the value TF Serving
    parses is still exactly the float32 the model would see in-process (TF Serving writes its own
    float outputs the same way).
    """
    array = np.asarray(values, dtype=np.float32)
    # str() of a NumPy float32 is its shortest round-trip repr; float() of that is exact enough
    # for json to print the same digits back.
    shortest = [float(str(value)) for value in array.ravel()]
    return np.asarray(shortest, dtype=np.float64).reshape(array.shape).tolist()


# --- client side -------------------------------------------------------------------------------


def encode_instances(images: np.ndarray, signature_name: str) -> bytes:
    """A row-format ``:predict`` body for a float batch, as compact JSON bytes.

    float32 -> Python float is exact and JSON keeps every digit, so the server sees the very same
    float32 values. :func:`json_floats` writes shorter decimals but walks every value in Python:
    2x slower per image, on the request path, to save bytes on a hop that is usually loopback.
    """
    payload = {SIGNATURE_NAME: signature_name, INSTANCES: images.tolist()}
    return json.dumps(payload, separators=(",", ":")).encode()


def encode_b64_instances(signature_name: str, blobs: Sequence[bytes]) -> bytes:
    """A row-format body for a one-input string signature: ``[{"b64": ...}, ...]``."""
    instances = [{B64: base64.b64encode(blob).decode("ascii")} for blob in blobs]
    return json.dumps(
        {SIGNATURE_NAME: signature_name, INSTANCES: instances}, separators=(",", ":")
    ).encode()


class PredictionsFormatError(ValueError):
    """A ``:predict`` answer without a usable ``predictions`` tensor."""


def decode_predictions(body: Any) -> np.ndarray:
    """The float32 ``predictions`` tensor of a row-format ``:predict`` answer."""
    if not isinstance(body, dict) or "predictions" not in body:
        raise PredictionsFormatError("the predict response has no 'predictions'")
    try:
        return np.asarray(body["predictions"], dtype=np.float32)
    except (TypeError, ValueError):
        message = "the predict response's 'predictions' is not a tensor"
        raise PredictionsFormatError(message) from None


# --- helpers -----------------------------------------------------------------------------------


class _RaggedError(Exception):
    pass


_NO_LEAF: Final = object()


def _is_b64_object(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(B64), str)


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64_object(value)


def _leaf_check(target: np.dtype[Any]) -> Callable[[Any], bool]:
    if target.kind == "b":
        return lambda leaf: isinstance(leaf, bool)
    if target.kind in "iu":
        return lambda leaf: type(leaf) is int
    return lambda leaf: type(leaf) in (int, float)  # bool is an int subclass: excluded by type()


def _iter_leaves(value: Any) -> Iterator[Any]:
    # Iterative: a deeply nested body must not overflow the interpreter's stack.
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        else:
            yield node


def _dense_leaves(value: Any, shape: tuple[int, ...]) -> Iterator[Any]:
    """Leaves in order, checking that the nested lists form a dense array of ``shape``."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth < len(shape):
            if not isinstance(node, list) or len(node) != shape[depth]:
                raise _RaggedError
            stack.extend((child, depth + 1) for child in reversed(node))
        elif isinstance(node, list):
            raise _RaggedError
        else:
            yield node


def _first_bad_leaf(value: Any, accepts: Callable[[Any], bool]) -> Any:
    return next((leaf for leaf in _iter_leaves(value) if not accepts(leaf)), _NO_LEAF)


def _type_message(value: Any, bad: Any, info: TensorInfo, where: str, *, rows: bool) -> str:
    message = (
        f"JSON Value: {_preview(bad)} Type: {_json_type(bad)} is not of expected type: "
        f"{info.type_name}"
    )
    if rows and isinstance(value, list):
        accepts = _leaf_check(NUMPY_DTYPES[info.dtype])
        for index, instance in enumerate(value):
            if _first_bad_leaf(instance, accepts) is not _NO_LEAF:
                return (
                    f"Failed to process element: {index} of 'instances' list. Error: "
                    f"Invalid argument: {message}"
                )
    return f"{where}: {message}"


def _ragged_message(value: Any, where: str, *, rows: bool) -> str:
    if rows and isinstance(value, list) and value:
        first = _shape_or_none(value[0])
        for index, instance in enumerate(value):
            shape = _shape_or_none(instance)
            if shape is None:
                return (
                    f"Failed to process element: {index} of 'instances' list. Error: its nested "
                    "lists have different lengths at the same level"
                )
            if shape != first:
                return (
                    f"Failed to process element: {index} of 'instances' list. Error: Expecting "
                    f"shape {_shape_text(first)} but got: {_shape_text(shape)}"
                )
    return (
        f"{where}: the nested lists do not form a tensor (lists at the same level have "
        "different lengths, or values and lists are mixed)"
    )


def _shape_or_none(value: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(size) for size in np.shape(value))
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None


def _shape_text(shape: tuple[int | None, ...] | None, limit: int = 8) -> str:
    if shape is None:
        return "[?]"
    dims = ["-1" if d is None else str(d) for d in shape]
    if len(dims) > limit:  # a body nested 900 deep must not make a 2 KB message
        return "[" + ",".join(dims[:limit]) + f",...] (rank {len(dims)})"
    return "[" + ",".join(dims) + "]"


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, dict):
        return "Object"
    return "Array"


def _preview(value: Any, limit: int = 80) -> str:
    """A short JSON rendering for messages: never echo a 64 MiB body back."""
    if isinstance(value, list):
        return f"[...{len(value)} items...]" if value else "[]"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
