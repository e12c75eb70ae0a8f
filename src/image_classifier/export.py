"""Write a trained model as exactly what TensorFlow Serving loads.

Layout: ``<base_path>/<integer version>/`` holding ``saved_model.pb``, ``variables/``,
``assets/class_names.txt``, ``assets.extra/tf_serving_warmup_requests`` (replayed by TF Serving
and the embedded server before the version is AVAILABLE) and ``metadata.json`` (the model
card), plus the training history, curves and confusion matrix when given. Signatures:

- ``serving_default``: ``images`` float32 ``[-1, 32, 32, 3]`` in [0, 1] -> ``probabilities``
  float32 ``[-1, num_classes]`` (see :func:`serving_probabilities`: a calibrated export gives
  ``softmax(logits / T)``, the logits optionally averaged with the mirrored image's).
- ``serving_pixels``: ``pixels`` string ``[-1]``, each the 3,072 raw uint8 bytes of an already
  preprocessed 32x32 RGB image -> the same ``probabilities``; the gateway's compact wire.
- ``serving_bytes``: ``image_bytes`` string ``[-1]`` (encoded JPEG/PNG/GIF/BMP/WebP, i.e.
  ``{"b64": ...}`` over REST) -> the same ``probabilities``, decoded and resized in-graph by
  :func:`preprocess.tf_decode_and_resize`.

A version is built in a hidden temporary directory beside its final place and renamed into place
in one step, so a server polling the base path never sees half a version (TF Serving ignores
non-integer directory names), and a failed or interrupted export leaves nothing behind. A
``check`` given to :func:`export_model` runs on the finished SavedModel before the rename, so a
version that does not answer as it must is never published.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from image_classifier.constants import (
    BYTES_INPUT_KEY,
    CHANNELS,
    CLASS_NAMES_ASSET,
    FLIP_TTA,
    IMAGE_SIZE,
    INPUT_KEY,
    METADATA_FILE,
    MODEL_NAME,
    OUTPUT_KEY,
    PIXELS_BYTES,
    PIXELS_INPUT_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
    SERVING_PIXELS,
)
from image_classifier.errors import DatasetError, ExportError
from image_classifier.model import ModelConfig, build_model
from image_classifier.servable import next_version
from image_classifier.tfserving.warmup import WarmupRequest, write_warmup_file

if TYPE_CHECKING:
    import keras
    import numpy as np
    import tensorflow as tf

    from image_classifier.calibration import Calibration
    from image_classifier.data import Dataset

TMP_PREFIX = ".tmp-export-"


def float32_copy(model: keras.Model, config: ModelConfig) -> keras.Model:
    """The same weights in a float32 graph: serving CPUs without bfloat16 support stay fast."""
    import keras

    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model.layers):
        return model
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = build_model(config)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def serving_logits(model: keras.Model, images: Any, *, flip_tta: bool) -> tf.Tensor:
    """float32 logits of [0, 1] images; with ``flip_tta`` the mean of the image's and its mirror's
    (CIFAR classes are left-right symmetric, so the mirror is a second opinion)."""
    import tensorflow as tf

    logits = tf.cast(model(images, training=False), tf.float32)
    if flip_tta:
        mirrored = tf.cast(model(tf.reverse(images, axis=[2]), training=False), tf.float32)
        logits = (logits + mirrored) / 2.0
    return logits


def serving_probabilities(
    model: keras.Model, images: Any, *, flip_tta: bool, temperature: float | None = None
) -> tf.Tensor:
    """What the signatures compute from [0, 1] images.

    Calibrated (``temperature`` given): ``softmax(serving_logits / T)``. The views are averaged
    as logits, so one temperature acts on one set of logits and the top class never depends on
    ``T``. Uncalibrated (``None``): the mean of each view's softmax, the contract of versions 1
    and 2, kept so that they re-export with identical answers.
    """
    import tensorflow as tf

    if temperature is not None:
        if not temperature > 0:
            raise ExportError(f"temperature must be positive, got {temperature}")
        return tf.nn.softmax(serving_logits(model, images, flip_tta=flip_tta) / temperature)
    probs = tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))
    if flip_tta:
        mirrored = model(tf.reverse(images, axis=[2]), training=False)
        probs = (probs + tf.nn.softmax(tf.cast(mirrored, tf.float32))) / 2.0
    return probs


def dataset_logits(serving_model: keras.Model, dataset: Dataset, *, flip_tta: bool) -> np.ndarray:
    """:func:`serving_logits` for every image of ``dataset``: what a calibrated export's
    ``serving_default`` turns into probabilities."""
    import numpy as np

    from image_classifier.evaluate import predict_in_batches

    return predict_in_batches(
        lambda batch: np.asarray(serving_logits(serving_model, batch, flip_tta=flip_tta)),
        dataset.images,
    )


def fit_calibration(
    model: keras.Model, config: ModelConfig, validation: Dataset, *, flip_tta: bool
) -> tuple[Calibration, np.ndarray]:
    """Fit the temperature on ``validation`` through the float32 graph the export will hold.

    Returns the calibration and the validation logits it was fitted on.
    """
    from image_classifier.calibration import calibrate

    logits = dataset_logits(float32_copy(model, config), validation, flip_tta=flip_tta)
    return calibrate(logits, validation.labels), logits


def make_serving_module(
    model: keras.Model,
    class_names: tuple[str, ...],
    *,
    flip_tta: bool,
    assets_dir: Path,
    temperature: float | None = None,
) -> tuple[tf.Module, dict[str, Any]]:
    """A ``tf.Module`` carrying the model, the class-names asset and the serving signatures, all
    three computing :func:`serving_probabilities` (with the same ``temperature``)."""
    import tensorflow as tf

    from image_classifier.preprocess import tf_decode_and_resize, tf_normalize

    assets_dir.mkdir(parents=True, exist_ok=True)
    names_file = assets_dir / CLASS_NAMES_ASSET
    names_file.write_text("\n".join(class_names) + "\n", encoding="utf-8")

    module = tf.Module()
    module.model = model
    module.class_names = tf.saved_model.Asset(str(names_file))

    def probabilities(images: tf.Tensor) -> tf.Tensor:
        return serving_probabilities(model, images, flip_tta=flip_tta, temperature=temperature)

    @tf.function(  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
        input_signature=[
            tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32, name=INPUT_KEY)
        ]
    )
    def serve_floats(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_KEY: probabilities(images)}

    @tf.function(  # type: ignore[untyped-decorator]
        input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT_KEY)]
    )
    def serve_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            tf_decode_and_resize,
            image_bytes,
            fn_output_signature=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32),
        )
        return {OUTPUT_KEY: probabilities(images)}

    @tf.function(  # type: ignore[untyped-decorator]
        input_signature=[tf.TensorSpec([None], tf.string, name=PIXELS_INPUT_KEY)]
    )
    def serve_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        # Each string is one preprocessed image's raw uint8 bytes; a string of another length
        # fails the reshape (INVALID_ARGUMENT), so a malformed request is a 400, not garbage.
        raw = tf.io.decode_raw(pixels, tf.uint8)
        images = tf.reshape(raw, [-1, IMAGE_SIZE, IMAGE_SIZE, CHANNELS])
        return {OUTPUT_KEY: probabilities(tf_normalize(images))}

    module.serve_floats = serve_floats
    module.serve_bytes = serve_bytes
    module.serve_pixels = serve_pixels
    signatures = {
        SERVING_DEFAULT: serve_floats.get_concrete_function(),
        SERVING_BYTES: serve_bytes.get_concrete_function(),
        SERVING_PIXELS: serve_pixels.get_concrete_function(),
    }
    return module, signatures


def export_model(
    model: keras.Model,
    config: ModelConfig,
    base_path: str | os.PathLike[str],
    *,
    class_names: tuple[str, ...],
    metadata: Mapping[str, Any],
    version: int | None = None,
    flip_tta: bool = False,
    temperature: float | None = None,
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Export ``model`` as ``<base_path>/<version>/`` atomically; returns the version directory.

    ``version`` defaults to the next integer after the highest present. ``temperature`` makes a
    calibrated export (:func:`serving_probabilities`); the card records it as ``temperature``.
    ``extra_files`` maps a file name inside the version directory to a source path to copy
    (history, plots). ``check`` is called with the finished, not yet published, version
    directory and raises :class:`ExportError` to refuse it.
    """
    import tensorflow as tf

    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    version = next_version(base) if version is None else version
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    final = base / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; pick another --version or remove it")
    if len(class_names) != config.num_classes:
        raise ExportError(
            f"{len(class_names)} class names for a model with {config.num_classes} outputs"
        )

    staging = base / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
    try:
        serving_model = float32_copy(model, config)
        module, signatures = make_serving_module(
            serving_model,
            class_names,
            flip_tta=flip_tta,
            assets_dir=staging.with_name(staging.name + "-assets"),
            temperature=temperature,
        )
        tf.saved_model.save(module, str(staging), signatures=signatures)
        card = {
            **metadata,
            "version": version,
            "class_names": list(class_names),
            "test_time_augmentation": FLIP_TTA if flip_tta else "none",
            # What the signatures compute (serving_probabilities): null is the uncalibrated
            # contract (views averaged as probabilities), a number softmax(mean logits / T).
            "temperature": temperature,
            "model_config": config.to_dict(),
        }
        (staging / METADATA_FILE).write_text(
            json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8"
        )
        for name, source in (extra_files or {}).items():
            shutil.copy2(source, staging / name)
        write_warmup_file(staging, warmup_requests(), model_name=MODEL_NAME)
        if check is not None:
            check(staging)
        _fsync_tree(staging)
        staging.rename(final)  # atomic on one filesystem; fails if `final` appeared meanwhile
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, ExportError)):
            raise
        if isinstance(exc, OSError | TypeError | ValueError):
            raise ExportError(f"export to {final} failed: {exc}") from exc
        raise
    finally:
        shutil.rmtree(staging.with_name(staging.name + "-assets"), ignore_errors=True)
    return final


def warmup_requests() -> list[WarmupRequest]:
    """One small request per signature: what TF Serving replays before serving a version."""
    import io

    import numpy as np
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128)).save(png, "PNG")
    return [
        WarmupRequest(
            SERVING_DEFAULT, {INPUT_KEY: np.full((1, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), 0.5, "f4")}
        ),
        # object arrays: NumPy's fixed-width bytes would drop trailing zero bytes.
        WarmupRequest(
            SERVING_PIXELS, {PIXELS_INPUT_KEY: np.array([b"\x80" * PIXELS_BYTES], dtype=object)}
        ),
        WarmupRequest(SERVING_BYTES, {BYTES_INPUT_KEY: np.array([png.getvalue()], dtype=object)}),
    ]


# Files of a version directory that belong to the SavedModel itself (rewritten by an export).
_SAVED_MODEL_PARTS = frozenset(
    {"saved_model.pb", "saved_model.pbtxt", "variables", "assets", "assets.extra", "fingerprint.pb"}
)
# Files that describe how a version answered (written by ``evaluate``): carried over by a plain
# re-export, which answers identically, dropped by a calibrating one, which does not.
_EVALUATION_PREFIXES = ("evaluation_", "confusion_matrix", "reliability_diagram")
# Two float32 computations of the same probabilities (eager Keras vs the SavedModel's graph)
# agree to this; more means different weights or a different formula.
ANSWER_TOLERANCE = 1e-6
# Logits whose top two are closer than this are a tie: the graph's fused kernels may order them
# either way, so the check does not hold them to the same top class.
ARGMAX_TIE = 1e-4


def reexport(
    version_dir: str | os.PathLike[str],
    base_path: str | os.PathLike[str] | None = None,
    *,
    version: int | None = None,
    calibration_data: Dataset | None = None,
) -> Path:
    """Export an existing version again, with this code's signatures and the same weights.

    For upgrading a shipped model to a newer serving contract (a new signature, warmup data,
    calibration) without retraining: the Keras model is rebuilt from the model card's config,
    its weights are read from the version's checkpoint and must reproduce the old version's
    ``serving_default`` answers exactly, or nothing is written. The card, history and plots
    are carried over; ``reexported_from`` records the source version.

    Without ``calibration_data`` the new version must answer exactly as the old one. With it
    (the validation split the model was selected on), a temperature is fitted on it
    (:func:`fit_calibration`) and the new version serves ``softmax(flip-averaged logits / T)``:
    it must give the top class of those logits and exactly those probabilities. Its card's
    ``validation_accuracy`` is then the accuracy of its own ``serving_default`` on that data,
    and ``metrics.before_calibration`` what the source version served there.
    """
    import numpy as np

    from image_classifier.calibration import expected_calibration_error
    from image_classifier.evaluate import predict_in_batches
    from image_classifier.servable import load_servable

    source = load_servable(version_dir)
    card = dict(source.metadata)
    try:
        config = ModelConfig.from_dict(card["model_config"])
    except (KeyError, TypeError) as exc:
        raise ExportError(f"{source.path} has no usable model_config in its card: {exc}") from None
    model = build_model(config)
    read_weights(model, source.path)
    flip_tta = card.get("test_time_augmentation") == FLIP_TTA
    source_temperature = card.get("temperature")
    probe = np.random.default_rng(0).random((8, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), "f4")
    expected = source.predict(probe)
    rebuilt = serving_probabilities(model, probe, flip_tta=flip_tta, temperature=source_temperature)
    difference = float(np.abs(np.asarray(rebuilt) - expected).max())
    if difference > ANSWER_TOLERANCE:
        raise ExportError(
            f"the model rebuilt from {source.path} differs from it by {difference:g}; "
            "not re-exported"
        )
    extras = {
        path.name: path
        for path in sorted(source.path.iterdir())
        if path.is_file() and path.name not in _SAVED_MODEL_PARTS | {METADATA_FILE}
    }
    metadata = {
        key: value
        for key, value in card.items()
        if key
        not in ("version", "class_names", "test_time_augmentation", "temperature", "model_config")
    }
    metadata["reexported_from"] = source.version
    temperature = source_temperature
    check: Callable[[Path], None] = _same_answers_check(probe, expected)

    if calibration_data is not None:
        if tuple(calibration_data.class_names) != tuple(source.class_names):
            raise DatasetError(
                f"the data's classes {calibration_data.class_names} differ from the model's "
                f"{source.class_names}"
            )
        calibration, logits = fit_calibration(model, config, calibration_data, flip_tta=flip_tta)
        temperature = calibration.temperature
        served_before = predict_in_batches(source.predict, calibration_data.images)
        labels = calibration_data.labels
        metadata["calibration"] = calibration.to_card()
        metadata["metrics"] = {
            **calibrated_metrics(calibration, card.get("metrics", {})),
            "before_calibration": {
                "version": source.version,
                "temperature": source_temperature,
                "validation_accuracy": round(
                    float(np.mean(served_before.argmax(axis=1) == labels)), 4
                ),
                "validation_ece": round(expected_calibration_error(served_before, labels), 4),
                "top_class_changed": int(np.sum(served_before.argmax(axis=1) != logits.argmax(1))),
            },
        }
        extras = {
            name: path for name, path in extras.items() if not name.startswith(_EVALUATION_PREFIXES)
        }
        check = calibrated_answers_check(calibration_data.images, logits, temperature)

    return export_model(
        model,
        config,
        base_path if base_path is not None else source.path.parent,
        class_names=source.class_names,
        metadata=metadata,
        version=version,
        flip_tta=flip_tta,
        temperature=temperature,
        extra_files=extras,
        check=check,
    )


def calibrated_metrics(calibration: Calibration, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The card's ``metrics`` of a calibrated export: ``validation_accuracy`` is what the export
    serves (flip-averaged, float32); Keras' figure for the best epoch keeps its own name."""
    keras_best = previous.get(
        "validation_accuracy_keras_best_epoch",
        # Cards before calibration named Keras' best-epoch figure "validation_accuracy".
        previous.get("validation_accuracy"),
    )
    metrics = {
        "validation_accuracy": round(calibration.accuracy, 4),
        "validation_ece": round(calibration.ece_after, 4),
    }
    if keras_best is not None:
        metrics["validation_accuracy_keras_best_epoch"] = keras_best
    return metrics


def read_weights(model: keras.Model, version_dir: Path) -> None:
    """Read an export's variables into a freshly built model; every weight must be matched."""
    import tensorflow as tf

    tf.train.Checkpoint(model=model).read(
        str(version_dir / "variables" / "variables")
    ).assert_existing_objects_matched()


def _serve(version_dir: Path, images: np.ndarray) -> np.ndarray:
    """``serving_default`` of a SavedModel directory (published or not) over float images."""
    import numpy as np
    import tensorflow as tf

    from image_classifier.evaluate import predict_in_batches

    signature = tf.saved_model.load(str(version_dir)).signatures[SERVING_DEFAULT]
    if images.dtype == np.uint8:
        return predict_in_batches(
            lambda batch: np.asarray(signature(**{INPUT_KEY: tf.constant(batch)})[OUTPUT_KEY]),
            images,
        )
    return np.asarray(signature(**{INPUT_KEY: tf.constant(images)})[OUTPUT_KEY])


def _same_answers_check(images: np.ndarray, expected: np.ndarray) -> Callable[[Path], None]:
    """An export check: the new version answers ``expected`` on ``images``."""
    import numpy as np

    def check(staging: Path) -> None:
        difference = float(np.abs(_serve(staging, images) - expected).max())
        if difference > ANSWER_TOLERANCE:
            raise ExportError(f"the new version answers differently (by {difference:g})")

    return check


def calibrated_answers_check(
    images: np.ndarray, logits: np.ndarray, temperature: float
) -> Callable[[Path], None]:
    """An export check: on ``images`` (uint8) the new version gives ``softmax(logits / T)`` and
    the top class of ``logits`` (ties, :data:`ARGMAX_TIE`, excepted)."""
    import numpy as np

    from image_classifier.calibration import softmax

    def check(staging: Path) -> None:
        served = _serve(staging, images)
        difference = float(np.abs(served - softmax(logits, temperature)).max())
        top2 = np.sort(logits, axis=1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] > ARGMAX_TIE
        changed = int(np.sum((served.argmax(axis=1) != logits.argmax(axis=1)) & decided))
        if difference > ANSWER_TOLERANCE or changed:
            raise ExportError(
                f"the calibrated version differs from softmax(logits / {temperature}) by "
                f"{difference:g} and changes {changed} top classes; not exported"
            )

    return check


def _fsync_tree(root: Path) -> None:
    """Flush every file so the rename never publishes data still in the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
