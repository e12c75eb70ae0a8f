"""The model the repository ships: present, small, loadable, calibrated, and as accurate as its
card says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from image_classifier.constants import (
    CIFAR10_CLASSES,
    CONFUSION_FILE,
    CURVES_FILE,
    FLIP_TTA,
    HISTORY_FILE,
    METADATA_FILE,
    PIXELS_INPUT_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
    SERVING_PIXELS,
    WARMUP_FILE,
)
from image_classifier.evaluate import RELIABILITY_FILE

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "saved_models" / "image_classifier"
# The version servers pick: the highest.
SHIPPED = BASE / str(max(int(p.name) for p in BASE.iterdir() if p.name.isdigit()))
CIFAR_DIR = ROOT.parent / "shared" / "datasets" / "cifar-10-batches-py"


def test_shipped_version_is_complete_and_small() -> None:
    assert (SHIPPED / "saved_model.pb").is_file()
    for name in (METADATA_FILE, HISTORY_FILE, CURVES_FILE, CONFUSION_FILE, RELIABILITY_FILE):
        assert (SHIPPED / name).is_file(), name
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    # Version 9 is 4.6 MB: 2.0M parameters stored as float16 (4.0 MB), most of them in the TCN,
    # which the architecture keeps at over half the model; the graph and plots are the rest.
    # (Version 6, the same parameters as float32, is 9.4 MB.)
    card = json.loads((SHIPPED / METADATA_FILE).read_text())
    assert card["weight_storage"] == "float16"
    assert total < 6 * 1024 * 1024, f"shipped model is {total / 1e6:.1f} MB"


def test_model_card_records_what_the_readme_reports() -> None:
    card = json.loads((SHIPPED / METADATA_FILE).read_text())
    assert tuple(card["class_names"]) == CIFAR10_CLASSES
    architecture = card["architecture"]
    assert architecture["receptive_field"] >= architecture["sequence_length"]
    assert card["training"]["training_seconds"] <= 3600  # the 60-minute CPU budget
    assert card["training"]["hardware"]["gpus"] == 0
    assert card["data"]["validation_images"] == 5000
    assert card["metrics"]["validation_accuracy"] >= 0.85


def test_the_shipped_version_is_calibrated_and_says_how() -> None:
    card = json.loads((SHIPPED / METADATA_FILE).read_text())
    calibration = card["calibration"]
    assert card["temperature"] == calibration["temperature"] > 0
    assert calibration["ece_bins"] == 15
    # The temperature is the validation NLL's minimum, so it can only lower the NLL; the ECE it
    # leaves is the target for the shipped version.
    assert calibration["nll_after"] <= calibration["nll_before"]
    assert calibration["ece_after"] <= 0.015
    assert 0.0 < calibration["low_confidence_threshold"] < 1.0
    assert "less than half" in calibration["low_confidence_rule"]
    # One accuracy figure: the evaluation of the served version is the card's.
    evaluation = json.loads((SHIPPED / "evaluation_validation.json").read_text())
    assert evaluation["model_version"] == int(SHIPPED.name)
    assert evaluation["accuracy"] == card["metrics"]["validation_accuracy"]
    assert evaluation["calibration"]["ece"] == pytest.approx(calibration["ece_after"], abs=1e-4)
    jpeg = evaluation["jpeg_accuracy"]
    assert evaluation["accuracy"] >= jpeg["q90"] >= jpeg["q75"] >= jpeg["q50"] > 0.5
    # The issue asks for a JPEG-q75 gap of at most 1.5 points, which no version reaches yet.
    # Version 9's anti-aliased pooling narrowed version 8's 2.44 points to 1.74 (90.64% at q75
    # against 90.08%; README, Model: JPEG). These guard JPEG uploads against getting worse while
    # the target stays open.
    assert jpeg["q75"] >= 0.905
    assert evaluation["accuracy"] - jpeg["q75"] <= 0.02


@pytest.mark.slow
@pytest.mark.real_data
def test_validation_accuracy_through_the_serving_signature() -> None:
    """Re-measure on the held-out split; needs ../shared (the real CIFAR-10 training set)."""
    if not (CIFAR_DIR / "data_batch_1").exists():
        pytest.skip(f"needs the real CIFAR-10 batches at {CIFAR_DIR}")
    pytest.importorskip("tensorflow", reason="the export is a TensorFlow SavedModel")
    from image_classifier.data import load_splits
    from image_classifier.evaluate import evaluate_servable
    from image_classifier.servable import load_servable

    servable = load_servable(SHIPPED)
    splits = load_splits(CIFAR_DIR, validation_size=5000, seed=0)
    assert np.bincount(splits.validation.labels).tolist() == [500] * 10
    report = evaluate_servable(servable, splits.validation, split="validation")
    recorded = json.loads((SHIPPED / "evaluation_validation.json").read_text())
    assert report.accuracy == pytest.approx(recorded["accuracy"], abs=1e-3)
    assert report.accuracy == pytest.approx(servable.metadata["metrics"]["validation_accuracy"])
    assert report.accuracy >= 0.85
    assert report.reliability is not None
    assert report.reliability.ece == pytest.approx(
        servable.metadata["calibration"]["ece_after"], abs=1e-3
    )


def test_the_shipped_version_speaks_the_compact_wire_and_has_warmup_data() -> None:
    from image_classifier.tfserving.signatures import read_signature_table
    from image_classifier.tfserving.warmup import read_warmup_requests

    table = read_signature_table(SHIPPED)
    assert set(table.signatures) >= {SERVING_DEFAULT, SERVING_BYTES, SERVING_PIXELS}
    pixels = table.signatures[SERVING_PIXELS].inputs[PIXELS_INPUT_KEY]
    assert (pixels.dtype, pixels.shape) == ("DT_STRING", (None,))
    assert (SHIPPED / WARMUP_FILE).is_file()
    replayed = {request.signature_name for request in read_warmup_requests(SHIPPED)}
    assert replayed == {SERVING_DEFAULT, SERVING_BYTES, SERVING_PIXELS}


@pytest.mark.slow
def test_every_reexported_version_serves_its_sources_weights() -> None:
    # A re-export (new signatures, calibration) keeps the weights of the trained version it came
    # from: an uncalibrated one answers exactly as that version, a calibrated one
    # softmax(logits / T) of its weights.
    from image_classifier.calibration import softmax
    from image_classifier.export import (
        read_weights,
        serving_logits,
        serving_probabilities,
        storage_copy,
    )
    from image_classifier.model import ModelConfig, build_model
    from image_classifier.servable import list_versions, load_servable

    images = np.random.default_rng(3).random((16, 32, 32, 3), dtype=np.float32)
    servables = {version: load_servable(BASE, version) for version in list_versions(BASE)}

    def trained_root(version: int) -> int:
        source = servables[version].metadata.get("reexported_from")
        return version if source is None else trained_root(int(source))

    reexports = [v for v in servables if servables[v].metadata.get("reexported_from") is not None]
    assert reexports, "no re-exported version to check"
    calibrated = 0
    for version in reexports:
        root = servables[trained_root(version)]
        config = ModelConfig.from_dict(root.metadata["model_config"])
        model = build_model(config)
        read_weights(model, root.path)
        temperature = servables[version].metadata.get("temperature")
        storage = servables[version].metadata.get("weight_storage", "float32")
        if storage != root.metadata.get("weight_storage", "float32"):
            # A storage conversion serves the source's weights rounded to the new storage.
            expected = serving_probabilities(
                storage_copy(model, config, storage),
                images,
                flip_tta=servables[version].metadata["test_time_augmentation"] == FLIP_TTA,
                temperature=temperature,
            ).numpy()
        elif temperature is None:
            expected = root.predict(images)
        else:
            logits = np.asarray(serving_logits(model, images, flip_tta=True))
            expected = softmax(logits, temperature)
        np.testing.assert_allclose(servables[version].predict(images), expected, rtol=0, atol=1e-6)
        calibrated += temperature is not None
    assert calibrated >= 1


def test_the_readme_recipe_file_is_the_shipped_versions_recipe() -> None:
    # README's one training command uses configs/cifar10_tcn.json: it must reproduce what ships.
    from image_classifier.model import ModelConfig
    from image_classifier.train import TrainConfig, load_configs

    card = json.loads((SHIPPED / METADATA_FILE).read_text())
    model_config, train_config = load_configs(ROOT / "configs" / "cifar10_tcn.json")
    train_defaults = vars(TrainConfig())
    for key, value in vars(train_config).items():
        if key == "time_budget_minutes" and "time_budget" not in card["training"]:
            # A limit, not a setting: a run that finished well inside it trained the same model.
            from image_classifier.schedule import FINISH_RESERVE_SECONDS

            fit_seconds = card["training"]["training_seconds"]
            assert fit_seconds + FINISH_RESERVE_SECONDS < value * 60, "the budget cuts the run"
        elif key != "verbose":
            # An option added after the card was written was not used: its default.
            assert card["training"].get(key, train_defaults[key]) == value, key
    defaults = ModelConfig().to_dict()
    for key, value in model_config.to_dict().items():
        if key not in ("mean", "std"):  # measured on the training images at train time
            expected = list(value) if isinstance(value, tuple) else value
            # A field added after the card was written is read back as its default.
            default = defaults[key]
            shipped = card["model_config"].get(
                key, list(default) if isinstance(default, tuple) else default
            )
            assert shipped == expected, key
