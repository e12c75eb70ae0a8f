"""End to end: a tiny training run exports a servable version that matches the Keras model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synthetic import encode, synthetic_images, write_cifar_batches

tf = pytest.importorskip("tensorflow", reason="training needs TensorFlow")
keras = pytest.importorskip("keras")

from image_classifier.constants import (  # noqa: E402
    CIFAR10_CLASSES,
    CLASS_NAMES_ASSET,
    CURVES_FILE,
    HISTORY_FILE,
    METADATA_FILE,
    SERVING_BYTES,
    SERVING_DEFAULT,
)
from image_classifier.data import load_splits  # noqa: E402
from image_classifier.errors import ExportError  # noqa: E402
from image_classifier.evaluate import evaluate  # noqa: E402
from image_classifier.export import TMP_PREFIX, export_model  # noqa: E402
from image_classifier.model import ModelConfig, build_model  # noqa: E402
from image_classifier.preprocess import preprocess_image  # noqa: E402
from image_classifier.servable import list_versions, load_servable  # noqa: E402
from image_classifier.train import TrainConfig, TrainResult, train  # noqa: E402

pytestmark = pytest.mark.slow

TINY_MODEL = ModelConfig(stem_filters=(8, 16), tcn_filters=16, dropout=0.0)
TINY_TRAIN = TrainConfig(epochs=4, batch_size=32, learning_rate=0.2, validation_size=60, verbose=0)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar_batches(tmp_path_factory.mktemp("cifar"), per_batch=60)


@pytest.fixture(scope="module")
def trained(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    base = tmp_path_factory.mktemp("models")
    splits = load_splits(cifar_dir, validation_size=TINY_TRAIN.validation_size)
    return train(
        splits,
        model_config=TINY_MODEL,
        train_config=TINY_TRAIN,
        model_base_path=base,
        run_dir=tmp_path_factory.mktemp("run"),
    )


def test_export_layout_is_what_tf_serving_loads(trained: TrainResult) -> None:
    version_dir = trained.export_dir
    assert version_dir.name == "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    names = (version_dir / "assets" / CLASS_NAMES_ASSET).read_text().split()
    assert tuple(names) == CIFAR10_CLASSES
    card = json.loads((version_dir / METADATA_FILE).read_text())
    assert card["architecture"]["parameters"] > 0
    assert card["architecture"]["receptive_field"] >= card["architecture"]["sequence_length"]
    assert 0.0 <= card["metrics"]["validation_accuracy"] <= 1.0

    assert card["training"]["training_seconds"] > 0
    assert card["training"]["hardware"]["cores"] >= 1
    assert card["data"]["validation_images"] == 60
    assert card["model_config"]["tcn_filters"] == 16
    history = json.loads((version_dir / HISTORY_FILE).read_text())
    assert len(history["loss"]) == 4 and len(history["val_accuracy"]) == 4
    assert (version_dir / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in version_dir.parent.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_signatures_have_the_serving_contract(trained: TrainResult) -> None:
    loaded = tf.saved_model.load(str(trained.export_dir))
    floats = loaded.signatures[SERVING_DEFAULT]
    (_, inputs) = floats.structured_input_signature
    assert list(inputs) == ["images"]
    assert inputs["images"].dtype == tf.float32
    assert inputs["images"].shape.as_list() == [None, 32, 32, 3]
    outputs = floats.structured_outputs
    assert list(outputs) == ["probabilities"]
    assert outputs["probabilities"].shape.as_list() == [None, 10]
    (_, byte_inputs) = loaded.signatures[SERVING_BYTES].structured_input_signature
    assert byte_inputs["image_bytes"].dtype == tf.string


def test_reloaded_export_matches_in_memory_model(tmp_path: Path) -> None:
    """serving_default from disk == the Keras model's softmax (with and without flip TTA)."""
    keras.utils.set_random_seed(7)
    model = build_model(TINY_MODEL)
    images = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    logits = model(images, training=False)
    mirrored = model(images[:, :, ::-1], training=False)
    plain = tf.nn.softmax(logits).numpy()
    averaged = (plain + tf.nn.softmax(mirrored).numpy()) / 2
    for version, tta, expected in ((1, False, plain), (2, True, averaged)):
        export_model(
            model,
            TINY_MODEL,
            tmp_path,
            class_names=CIFAR10_CLASSES,
            metadata={},
            version=version,
            flip_tta=tta,
        )
        served = load_servable(tmp_path, version).predict(images)
        np.testing.assert_allclose(served, expected, atol=1e-5)
        np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)


def test_bytes_signature_agrees_with_float_path(trained: TrainResult) -> None:
    servable = load_servable(trained.export_dir)
    labels = np.arange(10)
    pictures = synthetic_images(labels, seed=3)
    encoded = [encode(np.kron(p, np.ones((3, 3, 1), np.uint8)), "PNG") for p in pictures]
    floats = np.stack([preprocess_image(data) for data in encoded])
    from_floats = servable.predict(floats)
    from_bytes = servable.predict_bytes(encoded)
    np.testing.assert_array_equal(from_bytes.argmax(axis=1), from_floats.argmax(axis=1))
    np.testing.assert_allclose(from_bytes, from_floats, atol=0.02)


def test_next_run_writes_next_version(trained: TrainResult) -> None:
    base = trained.export_dir.parent
    model = build_model(TINY_MODEL)
    second = export_model(model, TINY_MODEL, base, class_names=CIFAR10_CLASSES, metadata={})
    assert second.name == "2"
    assert list_versions(base) == [1, 2]
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, TINY_MODEL, base, class_names=CIFAR10_CLASSES, metadata={}, version=2)


def test_interrupted_export_leaves_no_version_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = tf.saved_model.save

    def save_then_die(obj: object, export_dir: str, **kwargs: object) -> None:
        real_save(obj, export_dir, **kwargs)  # half-way: the SavedModel is on disk...
        raise KeyboardInterrupt  # ...and the process is interrupted before publishing it

    monkeypatch.setattr(tf.saved_model, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_model(
            build_model(TINY_MODEL), TINY_MODEL, tmp_path, class_names=CIFAR10_CLASSES, metadata={}
        )
    assert list(tmp_path.iterdir()) == []
    assert list_versions(tmp_path) == []


def test_failed_export_is_an_export_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ExportError):
        export_model(
            build_model(TINY_MODEL),
            TINY_MODEL,
            tmp_path,
            class_names=CIFAR10_CLASSES,
            metadata={},
            extra_files={"history.json": tmp_path / "missing.json"},
        )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_training_exports_best_epoch_so_far(cifar_dir: Path, tmp_path: Path) -> None:
    class CtrlCAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            if epoch == 1:
                raise KeyboardInterrupt

    splits = load_splits(cifar_dir, validation_size=60)
    result = train(
        splits,
        model_config=TINY_MODEL,
        train_config=TrainConfig(epochs=5, batch_size=64, validation_size=60, verbose=0),
        model_base_path=tmp_path / "models",
        run_dir=tmp_path / "run",
        callbacks=[CtrlCAfterFirstEpoch()],
    )
    assert result.interrupted
    assert result.epochs_run == 1
    assert (result.export_dir / "saved_model.pb").exists()
    card = json.loads((result.export_dir / METADATA_FILE).read_text())
    assert card["training"]["interrupted"] is True


def test_training_learns_the_synthetic_classes(trained: TrainResult) -> None:
    # Ten colour/stripe classes are easy; four epochs of a tiny TCN beat chance (0.1) clearly.
    assert trained.best_val_accuracy > 0.3


def test_evaluate_uses_the_serving_signature(
    trained: TrainResult, cifar_dir: Path, tmp_path: Path
) -> None:
    png = tmp_path / "cm.png"
    report = evaluate(trained.export_dir, cifar_dir, confusion_png=png)
    assert report.split == "validation" and report.num_images == 60
    assert report.confusion_matrix.sum() == 60
    assert set(report.per_class_accuracy) == set(CIFAR10_CLASSES)
    servable = load_servable(trained.export_dir)
    splits = load_splits(cifar_dir, validation_size=60)
    predicted = servable.predict(splits.validation.images / np.float32(255)).argmax(axis=1)
    assert report.accuracy == pytest.approx(float((predicted == splits.validation.labels).mean()))
    # The trainer's "served" figure is this same measurement, taken before the export existed.
    card = json.loads((trained.export_dir / METADATA_FILE).read_text())
    assert card["metrics"]["validation_accuracy_served"] == pytest.approx(report.accuracy, abs=1e-4)
    assert png.read_bytes()[:4] == b"\x89PNG"
