"""Model warmup in TF Serving's format: ``assets.extra/tf_serving_warmup_requests``.

The first call of each signature of a freshly loaded SavedModel builds kernels and allocates
buffers, so it is many times slower than the rest. TF Serving (``--enable_model_warmup``, on by
default) replays the requests stored in this file, a TFRecord of ``PredictionLog`` protos, before
it marks a version AVAILABLE; a version whose warmup fails does not load. The export writes the
file (:func:`write_warmup_file`), and the embedded model server replays it the same way
(:func:`read_warmup_requests`), with TF Serving's limits: at most :data:`MAX_RECORDS` records,
each an unparsable record or a failed request an error.

TensorFlow and TF Serving's message types (``tensorflow-serving-api``) are imported when called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from image_classifier.constants import WARMUP_FILE
from image_classifier.errors import ModelNotFoundError

# TF Serving's WarmupConsts::kMaxNumRecords.
MAX_RECORDS: Final = 1000


class WarmupError(ModelNotFoundError):
    """The warmup file of a version is malformed or one of its requests failed: no load."""

    code = "warmup_failed"


@dataclass(frozen=True)
class WarmupRequest:
    """One predict request of the warmup file."""

    signature_name: str
    inputs: Mapping[str, np.ndarray]


def warmup_path(version_dir: Path) -> Path:
    return version_dir / WARMUP_FILE


def write_warmup_file(
    version_dir: Path, requests: Sequence[WarmupRequest], *, model_name: str
) -> Path:
    """Write ``requests`` as TF Serving's warmup TFRecord inside ``version_dir``."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    if len(requests) > MAX_RECORDS:
        raise ValueError(f"{len(requests)} warmup requests; TF Serving reads at most {MAX_RECORDS}")
    target = warmup_path(version_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for request in requests:
            proto = predict_pb2.PredictRequest()
            proto.model_spec.name = model_name
            proto.model_spec.signature_name = request.signature_name
            for key, value in request.inputs.items():
                proto.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=proto)
            )
            writer.write(log.SerializeToString())
    return target


def read_warmup_requests(version_dir: Path) -> list[WarmupRequest]:
    """The predict requests of a version's warmup file; none when it has no file.

    Raises :class:`WarmupError` for what TF Serving refuses: more than :data:`MAX_RECORDS`
    records, a record that is not a ``PredictionLog``, a file that is not a TFRecord, or a
    log of a kind this server does not replay (classify, regress, multi-inference).
    """
    path = warmup_path(version_dir)
    if not path.is_file():
        return []
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    requests: list[WarmupRequest] = []
    try:
        for record in tf.data.TFRecordDataset(str(path)):
            if len(requests) >= MAX_RECORDS:
                raise WarmupError(
                    f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}"
                )
            log = prediction_log_pb2.PredictionLog()
            try:
                log.ParseFromString(record.numpy())
            except Exception:  # protobuf's DecodeError, by any of its import paths
                raise WarmupError(f"Failed to parse warmup record from {path}") from None
            if log.WhichOneof("log_type") != "predict_log":
                raise WarmupError(
                    f"{path}: only predict_log warmup records are supported by this server, "
                    f"not {log.WhichOneof('log_type')}"
                )
            request = log.predict_log.request
            requests.append(
                WarmupRequest(
                    request.model_spec.signature_name or "serving_default",
                    {key: _ndarray(value) for key, value in request.inputs.items()},
                )
            )
    except tf.errors.DataLossError as exc:
        raise WarmupError(
            f"{path}: {exc.message}. Please verify your warmup data is in TFRecord format."
        ) from None
    return requests


def _ndarray(proto: Any) -> np.ndarray:
    import tensorflow as tf

    return np.asarray(tf.make_ndarray(proto))
