"""Write a trained model as exactly what TensorFlow Serving loads.

Layout: ``<base_path>/<integer version>/`` holding ``saved_model.pb``, ``variables/``,
``assets/class_names.txt``, ``assets.extra/tf_serving_warmup_requests`` (replayed by TF Serving
and the embedded server before the version is AVAILABLE) and ``metadata.json`` (the model
card), plus the training history, curves and confusion matrix when given. Signatures:

- ``serving_default``: ``images`` float32 ``[-1, 32, 32, 3]`` in [0, 1] -> ``probabilities``
  float32 ``[-1, num_classes]`` (softmax; optionally averaged with the mirrored image).
- ``serving_pixels``: ``pixels`` string ``[-1]``, each the 3,072 raw uint8 bytes of an already
  preprocessed 32x32 RGB image -> the same ``probabilities``; the gateway's compact wire.
- ``serving_bytes``: ``image_bytes`` string ``[-1]`` (encoded JPEG/PNG/GIF/BMP/WebP, i.e.
  ``{"b64": ...}`` over REST) -> the same ``probabilities``, decoded and resized in-graph by
  :func:`preprocess.tf_decode_and_resize`.

A version is built in a hidden temporary directory beside its final place and renamed into place
in one step, so a server polling the base path never sees half a version (TF Serving ignores
non-integer directory names), and a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from image_classifier.constants import (
    BYTES_INPUT_KEY,
    CHANNELS,
    CLASS_NAMES_ASSET,
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
from image_classifier.errors import ExportError
from image_classifier.model import ModelConfig, build_model
from image_classifier.servable import next_version
from image_classifier.tfserving.warmup import WarmupRequest, write_warmup_file

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

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


def serving_probabilities(model: keras.Model, images: Any, *, flip_tta: bool) -> tf.Tensor:
    """What the signatures compute from [0, 1] images: softmax, optionally mirror-averaged."""
    import tensorflow as tf

    probs = tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))
    if flip_tta:
        # Averaging with the mirror image: CIFAR classes are left-right symmetric.
        mirrored = model(tf.reverse(images, axis=[2]), training=False)
        probs = (probs + tf.nn.softmax(tf.cast(mirrored, tf.float32))) / 2.0
    return probs


def make_serving_module(
    model: keras.Model, class_names: tuple[str, ...], *, flip_tta: bool, assets_dir: Path
) -> tuple[tf.Module, dict[str, Any]]:
    """A ``tf.Module`` carrying the model, the class-names asset and both serving signatures."""
    import tensorflow as tf

    from image_classifier.preprocess import tf_decode_and_resize, tf_normalize

    assets_dir.mkdir(parents=True, exist_ok=True)
    names_file = assets_dir / CLASS_NAMES_ASSET
    names_file.write_text("\n".join(class_names) + "\n", encoding="utf-8")

    module = tf.Module()
    module.model = model
    module.class_names = tf.saved_model.Asset(str(names_file))

    def probabilities(images: tf.Tensor) -> tf.Tensor:
        return serving_probabilities(model, images, flip_tta=flip_tta)

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
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Export ``model`` as ``<base_path>/<version>/`` atomically; returns the version directory.

    ``version`` defaults to the next integer after the highest present. ``extra_files`` maps a
    file name inside the version directory to a source path to copy (history, plots).
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
        )
        tf.saved_model.save(module, str(staging), signatures=signatures)
        card = {
            **metadata,
            "version": version,
            "class_names": list(class_names),
            "test_time_augmentation": "horizontal_flip" if flip_tta else "none",
            "model_config": config.to_dict(),
        }
        (staging / METADATA_FILE).write_text(
            json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8"
        )
        for name, source in (extra_files or {}).items():
            shutil.copy2(source, staging / name)
        write_warmup_file(staging, warmup_requests(), model_name=MODEL_NAME)
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


def reexport(
    version_dir: str | os.PathLike[str],
    base_path: str | os.PathLike[str] | None = None,
    *,
    version: int | None = None,
) -> Path:
    """Export an existing version again, with this code's signatures and the same weights.

    For upgrading a shipped model to a newer serving contract (a new signature, warmup data)
    without retraining: the Keras model is rebuilt from the model card's config, its weights
    are read from the version's checkpoint, and the new export must reproduce the old one's
    ``serving_default`` answers exactly, or nothing is written. The card, history and plots
    are carried over; ``reexported_from`` records the source version.
    """
    import numpy as np
    import tensorflow as tf

    from image_classifier.servable import load_servable

    source = load_servable(version_dir)
    card = dict(source.metadata)
    try:
        config = ModelConfig.from_dict(card["model_config"])
    except (KeyError, TypeError) as exc:
        raise ExportError(f"{source.path} has no usable model_config in its card: {exc}") from None
    model = build_model(config)
    tf.train.Checkpoint(model=model).read(
        str(source.path / "variables" / "variables")
    ).assert_existing_objects_matched()
    flip_tta = card.get("test_time_augmentation") == "horizontal_flip"
    probe = np.random.default_rng(0).random((8, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), "f4")
    rebuilt = np.asarray(serving_probabilities(model, probe, flip_tta=flip_tta))
    difference = float(np.abs(rebuilt - source.predict(probe)).max())
    if difference > 1e-6:
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
        if key not in ("version", "class_names", "test_time_augmentation", "model_config")
    }
    metadata["reexported_from"] = source.version
    return export_model(
        model,
        config,
        base_path if base_path is not None else source.path.parent,
        class_names=source.class_names,
        metadata=metadata,
        version=version,
        flip_tta=flip_tta,
        extra_files=extras,
    )


def _fsync_tree(root: Path) -> None:
    """Flush every file so the rename never publishes data still in the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
