"""End to end: a tiny training run exports a calibrated servable version that matches the Keras
model; re-exports, calibration and evaluation through the SavedModel's signatures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from synthetic import encode, synthetic_images, write_cifar_batches

tf = pytest.importorskip("tensorflow", reason="training needs TensorFlow")
keras = pytest.importorskip("keras")

from image_classifier.calibration import softmax  # noqa: E402
from image_classifier.constants import (  # noqa: E402
    CIFAR10_CLASSES,
    CLASS_NAMES_ASSET,
    CONFUSION_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    METADATA_FILE,
    OUTPUT_KEY,
    PIXELS_INPUT_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
    SERVING_PIXELS,
    WEIGHT_STORAGES,
)
from image_classifier.data import load_splits  # noqa: E402
from image_classifier.errors import ExportError  # noqa: E402
from image_classifier.evaluate import (  # noqa: E402
    RELIABILITY_FILE,
    SUBSAMPLING_420,
    SUBSAMPLING_444,
    evaluate,
    jpeg_roundtrip,
)
from image_classifier.export import (  # noqa: E402
    TMP_PREFIX,
    calibrated_answers_check,
    export_model,
    read_weights,
    reexport,
    serving_logits,
    serving_probabilities,
    storage_copy,
)
from image_classifier.model import (  # noqa: E402
    ModelConfig,
    build_model,
    init_whitening,
)
from image_classifier.preprocess import normalize, preprocess_image  # noqa: E402
from image_classifier.servable import list_versions, load_servable  # noqa: E402
from image_classifier.train import (  # noqa: E402
    LOOKAHEAD_DECAY,
    LOOKAHEAD_EVERY,
    TrainConfig,
    TrainResult,
    lookahead_decay,
    train,
)

pytestmark = pytest.mark.slow

TINY_MODEL = ModelConfig(stem_filters=(8, 16), tcn_filters=16, dropout=0.0)
TINY_TRAIN = TrainConfig(epochs=4, batch_size=32, learning_rate=0.2, validation_size=60, verbose=0)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar_batches(tmp_path_factory.mktemp("cifar"), per_batch=60)


def _train_tiny(cifar_dir: Path, tmp_path: Path, config: TrainConfig) -> TrainResult:
    """The tiny model trained on the tiny data, its version and run under ``tmp_path``."""
    return train(
        load_splits(cifar_dir, validation_size=TINY_TRAIN.validation_size),
        model_config=TINY_MODEL,
        train_config=config,
        model_base_path=tmp_path / "models",
        run_dir=tmp_path / "run",
    )


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
    # Calibrated at the end of training: the graph's temperature is the card's.
    assert card["temperature"] > 0
    assert card["calibration"]["temperature"] == card["temperature"]
    assert 0.0 <= card["calibration"]["low_confidence_threshold"] <= 1.0

    assert card["training"]["training_seconds"] > 0
    assert card["training"]["hardware"]["cores"] >= 1
    assert card["data"]["validation_images"] == 60
    assert card["model_config"]["tcn_filters"] == 16
    history = json.loads((version_dir / HISTORY_FILE).read_text())
    assert len(history["loss"]) == 4 and len(history["val_accuracy"]) == 4
    assert (version_dir / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in version_dir.parent.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_whitened_stem_is_set_from_the_training_images_and_exported(
    cifar_dir: Path, tmp_path: Path
) -> None:
    config = ModelConfig(
        stem_filters=(8, 16), whiten_patch=2, token_pool=2, tcn_filters=16, dilations=(1, 2)
    )
    splits = load_splits(cifar_dir, validation_size=TINY_TRAIN.validation_size)
    result = train(
        splits,
        model_config=config,
        train_config=dataclasses.replace(TINY_TRAIN, epochs=1),
        model_base_path=tmp_path / "models",
        run_dir=tmp_path / "run",
    )
    assert result.export_dir is not None
    card = json.loads((result.export_dir / METADATA_FILE).read_text())
    assert card["architecture"]["sequence_length"] == 9  # 31 -> 15 -> 7 -> 3x3 tokens
    # The export carries the kernel train() computed from the training split's own statistics.
    exported = build_model(ModelConfig.from_dict(card["model_config"]))
    read_weights(exported, result.export_dir)
    expected = build_model(ModelConfig.from_dict(card["model_config"]))
    init_whitening(expected, splits.train.images, ModelConfig.from_dict(card["model_config"]))
    kernel = exported.get_layer("stem_whiten").get_weights()[0]
    # Stored as float16: rounded by at most 2^-11 of its value (a whole float16 step where the
    # two computations straddle a rounding boundary).
    np.testing.assert_allclose(
        kernel, expected.get_layer("stem_whiten").get_weights()[0], rtol=1e-3, atol=1e-5
    )
    assert np.abs(kernel).max() > 0.1  # not the zeros a forgotten initialization would leave


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


AIRBENCH_HEAD = {"activation": "gelu", "logit_scale": 1 / 9, "tcn": False, "readout": "max"}


@pytest.mark.parametrize(
    "changes",
    [{"pooling": "max"}, {"pooling": "blur"}, {"pooling": "blur5"}, AIRBENCH_HEAD],
    ids=["max", "blur", "blur5", "gelu-scaled-logits-no-tcn"],
)
def test_reloaded_export_matches_in_memory_model(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    """serving_default from disk == the Keras model's softmax (with and without flip TTA)."""
    keras.utils.set_random_seed(7)
    config = dataclasses.replace(TINY_MODEL, **changes)  # type: ignore[arg-type]
    model = build_model(config)
    images = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    logits = model(images, training=False)
    mirrored = model(images[:, :, ::-1], training=False)
    plain = tf.nn.softmax(logits).numpy()
    averaged = (plain + tf.nn.softmax(mirrored).numpy()) / 2
    for version, tta, expected in ((1, False, plain), (2, True, averaged)):
        export_model(
            model,
            config,
            tmp_path,
            class_names=CIFAR10_CLASSES,
            metadata={},
            version=version,
            flip_tta=tta,
        )
        served = load_servable(tmp_path, version).predict(images)
        np.testing.assert_allclose(served, expected, atol=1e-5)
        np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)


def test_every_signature_serves_softmax_of_the_averaged_logits_over_t(tmp_path: Path) -> None:
    keras.utils.set_random_seed(7)
    model = build_model(TINY_MODEL)
    pixels = synthetic_images(np.arange(10), seed=4)
    images = normalize(pixels)
    temperature = 0.05  # far from 1, so a signature that ignored it would fail
    # The export serves the weights rounded to float16 (the default storage), exactly.
    served_model = storage_copy(model, TINY_MODEL, "float16")
    logits = serving_logits(served_model, images, flip_tta=True).numpy()
    expected = softmax(logits, temperature)
    assert np.abs(expected - softmax(logits)).max() > 0.01
    export_model(
        model,
        TINY_MODEL,
        tmp_path,
        class_names=CIFAR10_CLASSES,
        metadata={},
        flip_tta=True,
        temperature=temperature,
    )
    servable = load_servable(tmp_path)
    assert servable.metadata["temperature"] == temperature
    np.testing.assert_allclose(servable.predict(images), expected, atol=1e-5)
    raw = tf.constant([image.tobytes() for image in pixels])
    from_pixels = servable.signatures[SERVING_PIXELS](**{PIXELS_INPUT_KEY: raw})[OUTPUT_KEY]
    np.testing.assert_allclose(from_pixels.numpy(), expected, atol=1e-5)
    from_bytes = servable.predict_bytes([encode(image, "PNG") for image in pixels])
    np.testing.assert_allclose(from_bytes, expected, atol=1e-5)


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


def test_an_export_that_fails_its_check_is_never_published(tmp_path: Path) -> None:
    def refuse(staging: Path) -> None:
        assert (staging / "saved_model.pb").is_file()  # checked complete, before the rename
        raise ExportError("answers differ")

    with pytest.raises(ExportError, match="answers differ"):
        export_model(
            build_model(TINY_MODEL),
            TINY_MODEL,
            tmp_path,
            class_names=CIFAR10_CLASSES,
            metadata={},
            check=refuse,
        )
    assert list(tmp_path.iterdir()) == []


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
    report = evaluate(trained.export_dir, cifar_dir, confusion_png=png, jpeg_qualities=(90, 50))
    assert report.split == "validation" and report.num_images == 60
    assert report.confusion_matrix.sum() == 60
    assert set(report.per_class_accuracy) == set(CIFAR10_CLASSES)
    servable = load_servable(trained.export_dir)
    splits = load_splits(cifar_dir, validation_size=60)
    predicted = servable.predict(splits.validation.images / np.float32(255)).argmax(axis=1)
    assert report.accuracy == pytest.approx(float((predicted == splits.validation.labels).mean()))
    # The card's one accuracy figure is this same measurement, taken before the export existed.
    card = json.loads((trained.export_dir / METADATA_FILE).read_text())
    assert card["metrics"]["validation_accuracy"] == pytest.approx(report.accuracy, abs=1e-4)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / RELIABILITY_FILE).read_bytes()[:4] == b"\x89PNG"
    written = json.loads((tmp_path / "evaluation_validation.json").read_text())
    calibration = written["calibration"]
    assert calibration["temperature"] == card["temperature"]
    assert calibration["ece"] == pytest.approx(card["calibration"]["ece_after"], abs=1e-3)
    assert calibration["ece_uncalibrated"] == pytest.approx(
        card["calibration"]["ece_before"], abs=1e-3
    )
    assert sum(calibration["bins"]["count"]) == 60
    assert set(written["jpeg_accuracy"]) == {"q90", "q50"}
    assert all(0.0 <= value <= 1.0 for value in written["jpeg_accuracy"].values())
    assert written["low_confidence"]["threshold"] == card["calibration"]["low_confidence_threshold"]


def test_jpeg_roundtrip_defaults_to_half_resolution_chroma_as_uploads_have() -> None:
    # Red and blue alternating every pixel: detail only full-resolution chroma can keep.
    columns = np.arange(32) % 2 == 0
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, :, columns, 0] = 255
    image[0, :, ~columns, 2] = 255
    default = jpeg_roundtrip(image, 100)
    np.testing.assert_array_equal(default, jpeg_roundtrip(image, 100, subsampling=SUBSAMPLING_420))
    full = jpeg_roundtrip(image, 100, subsampling=SUBSAMPLING_444)
    error = {
        name: np.abs(out.astype(int) - image).mean()
        for name, out in [("420", default), ("444", full)]
    }
    assert error["444"] < 5 < error["420"]


def test_calibrating_reexport_of_an_uncalibrated_version(
    trained: TrainResult, cifar_dir: Path, tmp_path: Path
) -> None:
    """Version 1 and 2's contract (views averaged as probabilities) -> a calibrated version."""
    model = build_model(TINY_MODEL)
    read_weights(model, trained.export_dir)
    uncalibrated = export_model(
        model,
        TINY_MODEL,
        tmp_path,
        class_names=CIFAR10_CLASSES,
        metadata={"metrics": {"validation_accuracy": 0.5}},
        flip_tta=True,
        temperature=None,
        extra_files={CONFUSION_FILE: trained.export_dir / CURVES_FILE},
    )
    validation = load_splits(cifar_dir, validation_size=60).validation
    calibrated = reexport(uncalibrated, calibration_data=validation)
    assert calibrated.name == "2"
    card = json.loads((calibrated / METADATA_FILE).read_text())
    temperature = card["temperature"]
    assert temperature == card["calibration"]["temperature"] > 0
    assert card["reexported_from"] == 1
    metrics = card["metrics"]
    assert metrics["validation_accuracy_keras_best_epoch"] == 0.5  # the old name's figure
    assert metrics["before_calibration"]["version"] == 1
    # The temperature minimizes the validation NLL, and T = 1 is one of the candidates, so the NLL
    # can only fall. The ECE of a barely trained model on 60 images can move either way (it
    # rose on some CPUs), so it is only checked to be a proportion.
    calibration = card["calibration"]
    assert calibration["nll_after"] <= calibration["nll_before"]
    assert 0.0 <= calibration["ece_after"] <= 1.0
    assert not (calibrated / CONFUSION_FILE).exists()  # it described the old answers

    images = normalize(validation.images)
    logits = serving_logits(model, images, flip_tta=True).numpy()
    served = load_servable(calibrated).predict(images)
    np.testing.assert_array_equal(served.argmax(axis=1), logits.argmax(axis=1))
    np.testing.assert_allclose(served, softmax(logits, temperature), atol=1e-6)
    accuracy = float(np.mean(served.argmax(axis=1) == validation.labels))
    assert metrics["validation_accuracy"] == pytest.approx(accuracy, abs=1e-4)

    # The check the re-export passed fails for any other temperature.
    wrong = calibrated_answers_check(validation.images, logits, temperature * 1.5)
    with pytest.raises(ExportError, match="differs from softmax"):
        wrong(calibrated)

    # A plain re-export of a calibrated version keeps its temperature, its float16 weights and
    # its answers.
    again = reexport(calibrated)
    card = json.loads((again / METADATA_FILE).read_text())
    assert (card["temperature"], card["weight_storage"]) == (temperature, "float16")
    np.testing.assert_allclose(load_servable(again).predict(images), served, atol=1e-6)


def _variables_bytes(version_dir: Path) -> int:
    return sum(p.stat().st_size for p in (version_dir / "variables").rglob("*") if p.is_file())


def test_float16_storage_halves_the_variables_and_serves_the_rounded_weights(
    tmp_path: Path,
) -> None:
    config = dataclasses.replace(TINY_MODEL, dropout=0.1)  # seed states: variables, not weights
    keras.utils.set_random_seed(7)
    model = build_model(config)
    images = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    # Flip averaging with float16 weights is what train() exports (the fixture's version).
    contract = {"flip_tta": False, "temperature": 0.5}
    exports = {
        storage: export_model(
            model,
            config,
            tmp_path / storage,
            class_names=CIFAR10_CLASSES,
            metadata={},
            weight_storage=storage,
            **contract,
        )
        for storage in WEIGHT_STORAGES
    }
    assert _variables_bytes(exports["float16"]) < 0.6 * _variables_bytes(exports["float32"])
    served = {}
    for storage, version_dir in exports.items():
        assert json.loads((version_dir / METADATA_FILE).read_text())["weight_storage"] == storage
        signature = tf.saved_model.load(str(version_dir)).signatures[SERVING_DEFAULT]
        probabilities = signature(images=tf.constant(images))[OUTPUT_KEY]
        assert probabilities.dtype == tf.float32
        served[storage] = probabilities.numpy()

    rounded = build_model(config)
    rounded.set_weights([w.astype(np.float16).astype(np.float32) for w in model.get_weights()])
    expected = serving_probabilities(rounded, images, **contract).numpy()
    np.testing.assert_allclose(served["float16"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(served["float16"], served["float32"], rtol=0, atol=2e-3)
    assert np.abs(served["float16"] - served["float32"]).max() > 0  # it did round

    # One float16 variable per weight and nothing else but the checkpoint's own object graph
    # (a serialized proto, not a weight); the Keras model's float32 variables are not saved.
    stored = tf.train.load_checkpoint(
        str(exports["float16"] / "variables" / "variables")
    ).get_variable_to_dtype_map()
    assert stored.pop("_CHECKPOINTABLE_OBJECT_GRAPH") == tf.string
    assert len(stored) == len(model.weights)
    assert set(stored.values()) == {tf.float16}

    # read_weights reads either layout into a fresh model that answers as the version does.
    for storage, version_dir in exports.items():
        fresh = build_model(config)
        read_weights(fresh, version_dir)
        answers = serving_probabilities(fresh, images, **contract).numpy()
        np.testing.assert_allclose(answers, served[storage], rtol=0, atol=1e-6)
    # A model of another config is refused, weight by weight.
    with pytest.raises(ExportError, match=r"missing \['tcn0_d1_skip/bias'"):
        read_weights(build_model(dataclasses.replace(config, tcn_filters=8)), exports["float16"])
    with pytest.raises(ExportError, match=r"logits/kernel .* has shape \(16, 10\)"):
        read_weights(build_model(dataclasses.replace(config, num_classes=5)), exports["float16"])


def test_reexport_keeps_the_weight_storage_and_the_cli_converts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from image_classifier.cli import main

    keras.utils.set_random_seed(7)
    model = build_model(TINY_MODEL)
    evaluation = tmp_path / "evaluation_validation.json"
    evaluation.write_text("{}")
    source = export_model(
        model,
        TINY_MODEL,
        tmp_path / "models",
        class_names=CIFAR10_CLASSES,
        metadata={},
        temperature=0.5,
        weight_storage="float32",
        extra_files={evaluation.name: evaluation},
    )
    images = np.random.default_rng(1).random((8, 32, 32, 3), dtype=np.float32)
    source_answers = load_servable(source).predict(images)

    again = reexport(source)
    card = json.loads((again / METADATA_FILE).read_text())
    assert card["weight_storage"] == "float32" and "weight_storage_conversion" not in card
    np.testing.assert_array_equal(load_servable(again).predict(images), source_answers)

    assert main(["export", "--from", str(source), "--weight-storage", "float16"]) == 0
    converted = Path(json.loads(capsys.readouterr().out)["export_dir"])
    card = json.loads((converted / METADATA_FILE).read_text())
    assert card["weight_storage"] == "float16"
    conversion = card["weight_storage_conversion"]
    assert conversion["from"] == "float32" and conversion["source_version"] == 1
    assert 0 < conversion["max_probability_difference"] < 2e-3
    assert not (converted / evaluation.name).exists()  # it described the float32 answers
    rounded = storage_copy(model, TINY_MODEL, "float16")
    np.testing.assert_allclose(
        load_servable(converted).predict(images),
        serving_probabilities(rounded, images, flip_tta=False, temperature=0.5).numpy(),
        rtol=0,
        atol=1e-6,
    )
    # A storage argparse does not know is a usage error (exit status 2), not a traceback.
    with pytest.raises(SystemExit) as exited:
        main(["export", "--from", str(source), "--weight-storage", "bfloat16"])
    assert exited.value.code == 2
    with pytest.raises(ExportError, match="weight storage"):
        reexport(source, weight_storage="bfloat16")  # type: ignore[arg-type]


def test_a_weight_beyond_float16_range_is_refused_and_nothing_published(tmp_path: Path) -> None:
    model = build_model(TINY_MODEL)
    kernel = model.get_layer("logits").kernel
    too_large = kernel.numpy()
    too_large[0, 0] = 1e5  # float16 ends at 65504
    kernel.assign(too_large)
    base = tmp_path / "models"
    with pytest.raises(ExportError, match=r"logits/kernel holds 100000, beyond float16"):
        export_model(model, TINY_MODEL, base, class_names=CIFAR10_CLASSES, metadata={})
    assert list(base.iterdir()) == []  # no version, no staging or assets directory
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TMP_PREFIX)]
    with pytest.raises(ExportError, match="weight storage must be one of"):
        export_model(
            model,
            TINY_MODEL,
            base,
            class_names=CIFAR10_CLASSES,
            metadata={},
            weight_storage="bfloat16",  # type: ignore[arg-type]
        )
    assert list(base.iterdir()) == []


def test_lookahead_decay_follows_airbenchs_schedule() -> None:
    total = 1000
    assert lookahead_decay(500, total) == pytest.approx(LOOKAHEAD_DECAY / 8)
    assert lookahead_decay(5, total) < 1e-6  # no pull while the weights move fast
    decays = [lookahead_decay(step, total) for step in range(1, total)]
    assert decays == sorted(decays) and decays[-1] < LOOKAHEAD_DECAY
    assert lookahead_decay(total, total) == 1.0  # the run ends on the slow copy


def _lookahead_model() -> keras.Model:
    from image_classifier.layers import FusedBatchNormalization

    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    frozen = keras.layers.Dense(6, name="frozen", trainable=False)
    x = frozen(inputs)
    x = keras.layers.Dense(8)(x)
    x = FusedBatchNormalization(momentum=0.5)(x)
    outputs = keras.layers.Dense(2)(keras.layers.ReLU()(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model


def test_lookahead_pulls_the_weights_into_a_slow_copy_and_ends_on_it() -> None:
    """``fit`` with the callback ends exactly where the same steps end when the pulls are done
    by hand (moving statistics included); frozen weights are untouched."""
    from image_classifier.train import lookahead_callback

    rng = np.random.default_rng(0)
    steps, batch = 12, 8  # pulls after steps 5 and 10, and the last one (decay 1) after 12
    x = rng.normal(size=(steps * batch, 4)).astype(np.float32)
    y = rng.normal(size=(steps * batch, 2)).astype(np.float32)

    fitted = _lookahead_model()
    frozen_before = [w.numpy().copy() for w in fitted.get_layer("frozen").weights]
    fitted.fit(
        x,
        y,
        batch_size=batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[lookahead_callback(steps)],
    )

    by_hand = _lookahead_model()
    pulled = list(by_hand.trainable_weights) + [
        w
        for layer in by_hand.layers
        if "Normalization" in type(layer).__name__
        for w in layer.non_trainable_weights
    ]
    assert len(pulled) == len(by_hand.trainable_weights) + 2  # the moving mean and variance
    slow = [w.numpy().copy() for w in pulled]
    for step in range(1, steps + 1):
        by_hand.train_on_batch(
            x[(step - 1) * batch : step * batch], y[(step - 1) * batch : step * batch]
        )
        if step % LOOKAHEAD_EVERY == 0 or step == steps:
            decay = lookahead_decay(step, steps)
            for i, weight in enumerate(pulled):
                slow[i] = decay * slow[i] + (1 - decay) * weight.numpy()
                weight.assign(slow[i])

    plain = _lookahead_model()
    plain.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    for ours, expected in zip(fitted.get_weights(), by_hand.get_weights(), strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # The pulls changed the outcome, and never touched a frozen layer.
    assert any(
        not np.allclose(ours, without)
        for ours, without in zip(fitted.get_weights(), plain.get_weights(), strict=True)
    )
    for before, after in zip(frozen_before, fitted.get_layer("frozen").weights, strict=True):
        np.testing.assert_array_equal(after.numpy(), before)


def test_lookahead_is_refused_for_distributed_training(cifar_dir: Path, tmp_path: Path) -> None:
    from image_classifier.errors import ConfigError

    splits = load_splits(cifar_dir, validation_size=TINY_TRAIN.validation_size)
    with pytest.raises(ConfigError, match="lookahead"):
        train(
            splits,
            model_config=TINY_MODEL,
            train_config=dataclasses.replace(TINY_TRAIN, lookahead=True),
            model_base_path=tmp_path,
            distribute="mirrored",
        )
    assert not any(tmp_path.iterdir())


def test_a_spent_time_budget_ends_the_run_after_an_epoch_and_still_exports(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """A budget smaller than one epoch (and the export's reserve): the run plans one epoch,
    ends its learning-rate schedule there, stops, and exports what it trained."""
    config = dataclasses.replace(TINY_TRAIN, epochs=3, time_budget_minutes=0.01)
    result = _train_tiny(cifar_dir, tmp_path, config)

    assert result.epochs_run == 1 and result.stopped_by_time_budget and not result.interrupted
    assert result.export_dir is not None and (result.export_dir / "saved_model.pb").exists()
    card = json.loads((result.export_dir / METADATA_FILE).read_text())
    assert card["training"]["epochs"] == 3 and card["training"]["epochs_run"] == 1
    assert card["training"]["time_budget_minutes"] == 0.01
    assert card["training"]["time_budget"] == {
        "minutes": 0.01,
        "epochs_planned": 1,
        "stopped_early": True,
    }
    assert len(json.loads((result.export_dir / HISTORY_FILE).read_text())["loss"]) == 1


def test_a_time_budget_is_refused_for_multi_worker_training(
    cifar_dir: Path, tmp_path: Path
) -> None:
    from image_classifier.errors import ConfigError

    splits = load_splits(cifar_dir, validation_size=TINY_TRAIN.validation_size)
    with pytest.raises(ConfigError, match="time_budget_minutes trains in one process"):
        train(
            splits,
            model_config=TINY_MODEL,
            train_config=dataclasses.replace(TINY_TRAIN, time_budget_minutes=30),
            model_base_path=tmp_path,
            distribute="multi-worker",
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("minutes", [0, -5, float("nan")])
def test_a_time_budget_must_be_positive(minutes: float) -> None:
    from image_classifier.errors import ConfigError

    with pytest.raises(ConfigError, match="time_budget_minutes must be positive"):
        TrainConfig(time_budget_minutes=minutes)


def test_norm_biases_take_scaled_steps_and_everything_else_the_same() -> None:
    """``norm_bias_lr_scale`` multiplies the normalization biases' steps, weight decay included
    as it was, and leaves every other variable's step exactly as without it."""
    from image_classifier.train import compile_model, norm_bias_paths

    config = dataclasses.replace(TINY_MODEL, norm_scale=False)
    rng = np.random.default_rng(1)
    images = rng.random((16, 32, 32, 3), dtype=np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]

    def one_step(scale: float) -> tuple[keras.Model, dict[str, np.ndarray]]:
        keras.utils.set_random_seed(5)
        model = build_model(config)
        compile_model(model, dataclasses.replace(TINY_TRAIN, norm_bias_lr_scale=scale), 10)
        before = {v.path: v.numpy().copy() for v in model.trainable_variables}
        model.train_on_batch(images, labels)
        return model, {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}

    model, plain = one_step(1.0)
    _, boosted = one_step(64.0)
    biases = norm_bias_paths(model)
    # Every BatchNorm of the stem and the TCN, and no scale: --no-norm-scale freezes it at 1.
    assert len(biases) == sum("norm" in layer.name or "_bn" in layer.name for layer in model.layers)
    assert not any(v.path.endswith("/gamma") for v in model.variables)
    for path, step in plain.items():
        if path in biases:
            # The first step from zero biases: no decay term, so exactly 64x.
            assert np.abs(step).max() > 0
            np.testing.assert_allclose(boosted[path], 64 * step, rtol=1e-4, atol=1e-9)
        else:
            np.testing.assert_allclose(boosted[path], step, rtol=1e-5, atol=1e-9)


def test_norm_bias_lr_scale_must_be_positive() -> None:
    from image_classifier.errors import ConfigError

    with pytest.raises(ConfigError, match="norm_bias_lr_scale"):
        dataclasses.replace(TINY_TRAIN, norm_bias_lr_scale=0.0)


def test_jpeg_consistency_loss_is_cross_entropy_plus_weighted_divergence_from_clean() -> None:
    from image_classifier.train import training_loss

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, 10)).astype(np.float32)  # 4 clean views, then their JPEGs
    labels = np.eye(10, dtype=np.float32)[np.tile(rng.integers(0, 10, 4), 2)]
    config = dataclasses.replace(TINY_TRAIN, jpeg_consistency=3.0, label_smoothing=0.1)
    loss = training_loss(config)

    smoothed = labels * 0.9 + 0.1 / 10
    log_p = np.log(softmax(logits))
    cross_entropy = -np.sum(smoothed * log_p, axis=1).mean()
    clean, coded = log_p[:4], log_p[4:]
    divergence = np.sum(np.exp(clean) * (clean - coded), axis=1).mean()
    assert divergence > 0.1
    assert float(loss(labels, logits)) == pytest.approx(cross_entropy + 3.0 * divergence, rel=1e-5)

    # The clean view is the target: the divergence sends gradient into the JPEG views only.
    def gradient(weight: float) -> np.ndarray:
        variable = tf.Variable(logits)
        with tf.GradientTape() as tape:
            value = training_loss(dataclasses.replace(config, jpeg_consistency=weight))(
                labels, variable
            )
        return tape.gradient(value, variable).numpy()

    with_term, without = gradient(3.0), gradient(0.0)
    np.testing.assert_allclose(with_term[:4], without[:4], atol=1e-7)
    assert np.abs(with_term[4:] - without[4:]).max() > 1e-3


def test_jpeg_consistency_trains_on_pairs_and_records_the_weight(
    cifar_dir: Path, tmp_path: Path
) -> None:
    from image_classifier.errors import ConfigError

    config = dataclasses.replace(TINY_TRAIN, epochs=2, jpeg_consistency=2.0)
    result = _train_tiny(cifar_dir, tmp_path, config)
    card = json.loads((result.export_dir / METADATA_FILE).read_text())
    assert card["training"]["jpeg_consistency"] == 2.0
    assert np.isfinite(result.history["loss"]).all()

    with pytest.raises(ConfigError, match="jpeg_consistency"):
        train(
            load_splits(cifar_dir, validation_size=TINY_TRAIN.validation_size),
            model_config=TINY_MODEL,
            train_config=config,
            model_base_path=tmp_path / "elsewhere",
            distribute="mirrored",
        )
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(ConfigError, match="even"):
        dataclasses.replace(config, batch_size=31)
