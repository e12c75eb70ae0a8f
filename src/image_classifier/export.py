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

Weights are stored as float16 by default (``weight_storage``, :data:`WEIGHT_STORAGES`): the
SavedModel's variables are float16 and the signatures cast them to float32 where they read them,
so a version takes half the space and still computes in float32. The served model's weights are
rounded through float16 before anything is measured or checked (:func:`storage_copy`), so what
an export's check verifies is bit for bit what it serves. ``weight_storage="float32"`` is the
layout of the versions before it (the Keras model's own float32 variables).

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
from typing import TYPE_CHECKING, Any, cast

from image_classifier.constants import (
    BYTES_INPUT_KEY,
    CHANNELS,
    CLASS_NAMES_ASSET,
    DEFAULT_WEIGHT_STORAGE,
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
    WEIGHT_STORAGES,
    WeightStorage,
)
from image_classifier.errors import DatasetError, ExportError
from image_classifier.model import ModelConfig, build_model
from image_classifier.servable import next_version, read_metadata
from image_classifier.tfserving.warmup import WarmupRequest, write_warmup_file

if TYPE_CHECKING:
    import keras
    import numpy as np
    import tensorflow as tf

    from image_classifier.calibration import Calibration
    from image_classifier.data import Dataset

TMP_PREFIX = ".tmp-export-"
# The attribute of a float16 export's tf.Module holding its weights: a dict from each Keras
# variable's ``path`` to a float16 tf.Variable (what :func:`read_weights` reads back).
STORED_WEIGHTS_ATTR = "stored_weights"

# A Keras model, or anything called like one (``forward(images, training=False)``): what the
# serving functions run.
Forward = Callable[..., Any]


def check_weight_storage(value: str) -> WeightStorage:
    """``value`` as a :data:`WeightStorage`; anything else is an :class:`ExportError`."""
    if value not in WEIGHT_STORAGES:
        raise ExportError(
            f"weight storage must be one of {', '.join(WEIGHT_STORAGES)}, got {value!r}"
        )
    return value  # narrowed to the Literal by the membership test


def _float32_model(config: ModelConfig) -> keras.Model:
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return build_model(config)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_copy(model: keras.Model, config: ModelConfig) -> keras.Model:
    """The same weights in a float32 graph: serving CPUs without bfloat16 support stay fast."""
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model.layers):
        return model
    copy = _float32_model(config)
    copy.set_weights(model.get_weights())
    return copy


def through_float16(name: str, value: np.ndarray) -> np.ndarray:
    """A floating-point ``value`` rounded to float16 and back (others unchanged); a value beyond
    float16's range is an :class:`ExportError` naming the variable ``name``, since it would be
    stored as infinity."""
    import numpy as np

    if not np.issubdtype(value.dtype, np.floating):
        return value
    limit = float(np.finfo(np.float16).max)
    largest = float(np.abs(value).max()) if value.size else 0.0
    if largest > limit:
        raise ExportError(
            f"weight {name} holds {largest:g}, beyond float16's range (+-{limit:g}); "
            "export it with weight storage float32"
        )
    rounded: np.ndarray = value.astype(np.float16).astype(value.dtype)
    return rounded


def storage_copy(
    model: keras.Model, config: ModelConfig, weight_storage: WeightStorage
) -> keras.Model:
    """The float32 model an export with ``weight_storage`` serves, exactly.

    float32: :func:`float32_copy`. float16: a new float32 model whose floating-point weights are
    ``model``'s rounded through float16 (``model`` itself is left alone), so fitting, measuring
    and checking on it see the weights the export holds. Rounding is idempotent: a copy of a
    copy has the same weights.
    """
    if check_weight_storage(weight_storage) == "float32":
        return float32_copy(model, config)
    rounded = [
        through_float16(variable.path, value)
        for variable, value in zip(model.weights, model.get_weights(), strict=True)
    ]
    copy = _float32_model(config)
    copy.set_weights(rounded)
    return copy


def serving_logits(model: Forward, images: Any, *, flip_tta: bool) -> tf.Tensor:
    """float32 logits of [0, 1] images; with ``flip_tta`` the mean of the image's and its mirror's
    (CIFAR classes are left-right symmetric, so the mirror is a second opinion)."""
    import tensorflow as tf

    logits = tf.cast(model(images, training=False), tf.float32)
    if flip_tta:
        mirrored = tf.cast(model(tf.reverse(images, axis=[2]), training=False), tf.float32)
        logits = (logits + mirrored) / 2.0
    return logits


def serving_probabilities(
    model: Forward, images: Any, *, flip_tta: bool, temperature: float | None = None
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
    model: keras.Model,
    config: ModelConfig,
    validation: Dataset,
    *,
    flip_tta: bool,
    weight_storage: WeightStorage = DEFAULT_WEIGHT_STORAGE,
) -> tuple[Calibration, np.ndarray]:
    """Fit the temperature on ``validation`` through the float32 graph, and the weights
    (:func:`storage_copy`), that an export with ``weight_storage`` will hold.

    Returns the calibration and the validation logits it was fitted on.
    """
    from image_classifier.calibration import calibrate

    served = storage_copy(model, config, weight_storage)
    logits = dataset_logits(served, validation, flip_tta=flip_tta)
    return calibrate(logits, validation.labels), logits


def make_serving_module(
    model: keras.Model,
    class_names: tuple[str, ...],
    *,
    flip_tta: bool,
    assets_dir: Path,
    temperature: float | None = None,
    weight_storage: WeightStorage = DEFAULT_WEIGHT_STORAGE,
) -> tuple[tf.Module, dict[str, Any]]:
    """A ``tf.Module`` carrying the weights, the class-names asset and the serving signatures,
    all three computing :func:`serving_probabilities` (with the same ``temperature``).

    ``weight_storage`` float32: the module holds the Keras model (its float32 variables), the
    layout of every version before float16 storage. float16: it holds only
    :func:`float16_variables` (``model``'s weights rounded, :func:`through_float16`) and the
    signatures run the model through ``stateless_call`` on those cast to float32, so the Keras
    model's own variables are neither read nor saved (``tf.saved_model.save`` refuses a graph
    that captures a variable the module does not track, so none can slip in).
    """
    import tensorflow as tf

    from image_classifier.preprocess import tf_decode_and_resize, tf_normalize

    storage = check_weight_storage(weight_storage)
    assets_dir.mkdir(parents=True, exist_ok=True)
    names_file = assets_dir / CLASS_NAMES_ASSET
    names_file.write_text("\n".join(class_names) + "\n", encoding="utf-8")

    module = tf.Module()
    module.class_names = tf.saved_model.Asset(str(names_file))
    if storage == "float32":
        module.model = model

        def probabilities(images: tf.Tensor) -> tf.Tensor:
            return serving_probabilities(model, images, flip_tta=flip_tta, temperature=temperature)

    else:
        stored = float16_variables(model)
        setattr(module, STORED_WEIGHTS_ATTR, stored)
        # Variables that are not weights (a dropout layer's seed state) are never read at
        # inference; stateless_call still wants a value for each, so they become constants.
        bookkeeping = {
            variable.path: variable.numpy()
            for variable in model.non_trainable_variables
            if variable.path not in stored
        }

        def probabilities(images: tf.Tensor) -> tf.Tensor:
            # Cast once per call: with flip averaging both views share the float32 weights.
            values = {
                variable.path: tf.cast(stored[variable.path], variable.dtype)
                for variable in model.weights
            }
            forward = stateless_forward(model, values, bookkeeping)
            return serving_probabilities(
                forward, images, flip_tta=flip_tta, temperature=temperature
            )

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

    # The functions are not attributes of the module: the signatures carry them, and
    # tf.saved_model.save would trace every attached function (the whole model) once more.
    signatures = {
        SERVING_DEFAULT: serve_floats.get_concrete_function(),
        SERVING_BYTES: serve_bytes.get_concrete_function(),
        SERVING_PIXELS: serve_pixels.get_concrete_function(),
    }
    return module, signatures


def float16_variables(model: keras.Model) -> dict[str, tf.Variable]:
    """One tf.Variable per weight of ``model``, keyed by its ``path``: the floating-point ones
    float16 (:func:`through_float16`), any other in its own dtype."""
    import numpy as np
    import tensorflow as tf

    from image_classifier.tfnotices import float16_notice_said_quietly

    float16_notice_said_quietly()  # often a process's first float16 op: TensorFlow's notice
    stored: dict[str, tf.Variable] = {}
    for variable in model.weights:
        if variable.path in stored:
            raise ExportError(f"two weights of the model share the path {variable.path}")
        value = through_float16(variable.path, np.asarray(variable.numpy()))
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float16)
        stored[variable.path] = tf.Variable(value, trainable=False)
    return stored


def stateless_forward(
    model: keras.Model, values: Mapping[str, Any], bookkeeping: Mapping[str, Any]
) -> Forward:
    """``model`` called on ``values`` (a tensor per weight path) instead of its own variables,
    through Keras' ``stateless_call``; ``bookkeeping`` gives the non-weight variables' values."""
    trainable = [values[variable.path] for variable in model.trainable_variables]
    non_trainable = [
        values[variable.path] if variable.path in values else bookkeeping[variable.path]
        for variable in model.non_trainable_variables
    ]

    def forward(images: Any, training: bool = False) -> Any:
        outputs, _ = model.stateless_call(trainable, non_trainable, images, training=training)
        return outputs

    return forward


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
    weight_storage: WeightStorage = DEFAULT_WEIGHT_STORAGE,
) -> Path:
    """Export ``model`` as ``<base_path>/<version>/`` atomically; returns the version directory.

    ``version`` defaults to the next integer after the highest present. ``temperature`` makes a
    calibrated export (:func:`serving_probabilities`); the card records it as ``temperature``.
    ``extra_files`` maps a file name inside the version directory to a source path to copy
    (history, plots). ``check`` is called with the finished, not yet published, version
    directory and raises :class:`ExportError` to refuse it. ``weight_storage`` (recorded in the
    card) is how the variables are stored: the export serves :func:`storage_copy` of ``model``,
    so a check must expect that model's answers (:func:`fit_calibration` takes the same
    argument).
    """
    import tensorflow as tf

    storage = check_weight_storage(weight_storage)
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
        serving_model = storage_copy(model, config, storage)
        module, signatures = make_serving_module(
            serving_model,
            class_names,
            flip_tta=flip_tta,
            assets_dir=staging.with_name(staging.name + "-assets"),
            temperature=temperature,
            weight_storage=storage,
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
            "weight_storage": storage,
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
# re-export, which answers identically, dropped by a calibrating or storage-converting one,
# which does not.
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
    weight_storage: WeightStorage | None = None,
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

    ``weight_storage`` defaults to the source's (its card's ``weight_storage``; none means
    float32). Another converts: the new version must answer exactly as the source's weights
    rounded to that storage (:func:`storage_copy`), and its card's
    ``weight_storage_conversion`` records the largest difference of probability from the source
    on the probe images (under the source's contract). The source's evaluation files are then
    dropped, as they describe answers the new version no longer gives exactly.
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
    source_storage = card_weight_storage(card, source.path)
    storage = source_storage if weight_storage is None else check_weight_storage(weight_storage)
    model = build_model(config)
    read_weights(model, source.path)
    flip_tta = card.get("test_time_augmentation") == FLIP_TTA
    source_temperature = card.get("temperature")
    probe = np.random.default_rng(0).random((8, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), "f4")
    source_answers = source.predict(probe)
    rebuilt = serving_probabilities(model, probe, flip_tta=flip_tta, temperature=source_temperature)
    difference = float(np.abs(np.asarray(rebuilt) - source_answers).max())
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
    # export_model writes the first six itself; a conversion record describes one re-export.
    rewritten = (
        "version",
        "class_names",
        "test_time_augmentation",
        "temperature",
        "weight_storage",
        "model_config",
        "weight_storage_conversion",
    )
    metadata = {key: value for key, value in card.items() if key not in rewritten}
    metadata["reexported_from"] = source.version
    temperature = source_temperature
    check: Callable[[Path], None] = _same_answers_check(probe, source_answers)

    if storage != source_storage:
        converted = np.asarray(
            serving_probabilities(
                storage_copy(model, config, storage),
                probe,
                flip_tta=flip_tta,
                temperature=source_temperature,
            )
        )
        metadata["weight_storage_conversion"] = {
            "from": source_storage,
            "to": storage,
            "source_version": source.version,
            "max_probability_difference": float(np.abs(converted - source_answers).max()),
        }
        extras = {
            name: path for name, path in extras.items() if not name.startswith(_EVALUATION_PREFIXES)
        }
        check = _same_answers_check(probe, converted)

    if calibration_data is not None:
        if tuple(calibration_data.class_names) != tuple(source.class_names):
            raise DatasetError(
                f"the data's classes {calibration_data.class_names} differ from the model's "
                f"{source.class_names}"
            )
        calibration, logits = fit_calibration(
            model, config, calibration_data, flip_tta=flip_tta, weight_storage=storage
        )
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
        weight_storage=storage,
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


def card_weight_storage(card: Mapping[str, Any], version_dir: Path) -> WeightStorage:
    """How the version in ``version_dir`` stores its weights, from its ``card``: versions written
    before float16 storage have no ``weight_storage`` and hold float32."""
    value = card.get("weight_storage", "float32")
    if value not in WEIGHT_STORAGES:
        raise ExportError(
            f"{version_dir}'s card has weight_storage {value!r}; this release reads "
            f"{', '.join(WEIGHT_STORAGES)}"
        )
    return cast(WeightStorage, value)


def read_weights(model: keras.Model, version_dir: Path) -> None:
    """Read an export's weights into a freshly built model; every weight must be matched.

    A float32 version (its card's ``weight_storage``) holds the Keras model's own variables; a
    float16 one the :data:`STORED_WEIGHTS_ATTR` dict, whose values are cast into the model's
    variables (float16 values are exact in float32, so the model answers as the version does).
    """
    import tensorflow as tf

    version_dir = Path(version_dir)
    storage = card_weight_storage(read_metadata(version_dir), version_dir)
    if storage == "float32":
        try:
            tf.train.Checkpoint(model=model).read(
                str(version_dir / "variables" / "variables")
            ).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            raise ExportError(
                f"the weights in {version_dir} do not match the model its card describes: {exc}"
            ) from None
        return

    try:
        loaded = tf.saved_model.load(str(version_dir))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise ExportError(f"{version_dir} is not a loadable SavedModel: {exc}") from None
    stored = getattr(loaded, STORED_WEIGHTS_ATTR, None)
    if stored is None:
        raise ExportError(
            f"{version_dir}'s card says float16 weights, but its SavedModel has no "
            f"{STORED_WEIGHTS_ATTR}"
        )
    wanted = {variable.path: variable for variable in model.weights}
    missing, extra = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
    if missing or extra:
        raise ExportError(
            f"the weights in {version_dir} do not match the model its card describes: "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for path, variable in wanted.items():
        value = stored[path]
        if tuple(value.shape) != tuple(variable.shape):
            raise ExportError(
                f"weight {path} in {version_dir} has shape {tuple(value.shape)}, the model "
                f"{tuple(variable.shape)}"
            )
        variable.assign(tf.cast(value, variable.dtype))


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
