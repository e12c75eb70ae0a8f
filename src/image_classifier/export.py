"""Write a trained model as exactly what TensorFlow Serving loads.

Layout: ``<base_path>/<integer version>/`` holding ``saved_model.pb``, ``variables/``,
``assets/class_names.txt`` and ``metadata.json`` (the model card), plus the training history,
curves and confusion matrix when given. Signatures:

- ``serving_default``: ``images`` float32 ``[-1, 32, 32, 3]`` in [0, 1] -> ``probabilities``
  float32 ``[-1, num_classes]`` (softmax; optionally averaged with the mirrored image).
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
    CLASS_NAMES_ASSET,
    IMAGE_SIZE,
    INPUT_KEY,
    METADATA_FILE,
    OUTPUT_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
)
from image_classifier.errors import ExportError
from image_classifier.model import ModelConfig, build_model
from image_classifier.servable import next_version

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

    from image_classifier.preprocess import tf_decode_and_resize

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

    module.serve_floats = serve_floats
    module.serve_bytes = serve_bytes
    signatures = {
        SERVING_DEFAULT: serve_floats.get_concrete_function(),
        SERVING_BYTES: serve_bytes.get_concrete_function(),
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


def _fsync_tree(root: Path) -> None:
    """Flush every file so the rename never publishes data still in the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
