"""data: CIFAR python batches, image folders, the stratified split and the tf.data pipeline."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from image_classifier.constants import CIFAR10_CLASSES
from image_classifier.data import (
    Dataset,
    JpegAugment,
    channel_stats,
    load_cifar10,
    load_image_folder,
    load_splits,
    stratified_split,
)
from image_classifier.errors import ConfigError, DatasetError
from image_classifier.preprocess import preprocess_image
from synthetic import synthetic_images, write_cifar_batches, write_image_folder


def test_cifar_batches_are_read_as_nhwc(tmp_path: Path) -> None:
    root = write_cifar_batches(tmp_path / "cifar", per_batch=20)
    train, test = load_cifar10(root)
    assert test is None
    assert train.images.shape == (100, 32, 32, 3)
    assert train.images.dtype == np.uint8
    assert train.class_names == CIFAR10_CLASSES
    # The planar rows were transposed back to exactly the images that were written.
    with (root / "data_batch_1").open("rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    expected = synthetic_images(np.asarray(batch[b"labels"]), seed=0)
    np.testing.assert_array_equal(train.images[:20], expected)
    np.testing.assert_array_equal(train.labels[:20], batch[b"labels"])


def test_test_batch_is_optional_and_read_when_present(tmp_path: Path) -> None:
    _, test = load_cifar10(write_cifar_batches(tmp_path / "c", per_batch=10, with_test=True))
    assert test is not None and len(test) == 10


def test_missing_batches_are_reported(tmp_path: Path) -> None:
    root = write_cifar_batches(tmp_path / "c", per_batch=5)
    (root / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar10(root)


def test_corrupt_batch_is_a_dataset_error(tmp_path: Path) -> None:
    root = write_cifar_batches(tmp_path / "c", per_batch=5)
    (root / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_2"):
        load_cifar10(root)


def test_image_folder_goes_through_preprocess(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pics", ("cats", "dogs", "owls"), per_class=3)
    (root / "dogs" / "notes.txt").write_text("ignored: not an image suffix")
    (root / "owls" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    dataset = load_image_folder(root)
    assert dataset.class_names == ("cats", "dogs", "owls")
    assert len(dataset) == 9  # the broken file is skipped, the text file ignored
    assert np.bincount(dataset.labels).tolist() == [3, 3, 3]
    first = sorted((root / "cats").iterdir())[0]
    expected = np.round(preprocess_image(first.read_bytes()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(dataset.images[0], expected)


def test_image_folder_needs_two_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "one", ("only",), per_class=2)
    with pytest.raises(DatasetError, match="two class"):
        load_image_folder(tmp_path / "one")


def _dataset(n_per_class: tuple[int, ...]) -> Dataset:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    images = np.zeros((len(labels), 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels)) % 256
    images[:, 0, 0, 1] = np.arange(len(labels)) // 256
    names = tuple(f"c{i}" for i in range(len(n_per_class)))
    return Dataset(images, labels, names)


def _ids(dataset: Dataset) -> set[int]:
    pixels = dataset.images[:, 0, 0, :2].astype(np.int64)
    return set((pixels[:, 0] + 256 * pixels[:, 1]).tolist())


def test_split_is_stratified_disjoint_and_complete() -> None:
    data = _dataset((500, 300, 200))
    train, val = stratified_split(data, validation_size=100, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert np.bincount(val.labels).tolist() == [50, 30, 20]
    assert _ids(train).isdisjoint(_ids(val))
    assert _ids(train) | _ids(val) == set(range(1000))


def test_split_is_deterministic_per_seed() -> None:
    data = _dataset((100, 100))
    a = stratified_split(data, 20, seed=1)[1]
    b = stratified_split(data, 20, seed=1)[1]
    c = stratified_split(data, 20, seed=2)[1]
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)


def test_split_rejects_impossible_sizes() -> None:
    with pytest.raises(DatasetError):
        stratified_split(_dataset((5, 5)), validation_size=10)


def test_load_splits_uses_test_batch_and_records_source(tmp_path: Path) -> None:
    root = write_cifar_batches(tmp_path / "c", per_batch=20, with_test=True)
    splits = load_splits(root, validation_size=10)
    assert len(splits.train) == 90 and len(splits.validation) == 10
    assert splits.test is not None and "CIFAR-10" in splits.source


def test_channel_stats_on_the_unit_scale() -> None:
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[..., 0] = 255
    mean, std = channel_stats(images)
    assert mean == pytest.approx((1.0, 0.0, 0.0))
    assert std == pytest.approx((0.0, 0.0, 0.0))


def test_tf_pipeline_augments_only_in_training() -> None:
    tf = pytest.importorskip("tensorflow", reason="the input pipeline is TensorFlow")
    from image_classifier.data import make_tf_dataset

    data = _dataset((40, 40))
    data.images[:] = synthetic_images(data.labels)
    evaluation = next(iter(make_tf_dataset(data, batch_size=80, training=False)))
    images, labels = evaluation[0].numpy(), evaluation[1].numpy()
    assert images.dtype == np.float32 and images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_allclose(images, data.images / 255.0, atol=1e-6)  # untouched, in order
    np.testing.assert_array_equal(labels, data.labels)

    def epoch(seed: int) -> np.ndarray:
        batches = make_tf_dataset(data, batch_size=80, training=True, seed=seed)
        return next(iter(batches))[0].numpy()

    first, again = epoch(0), epoch(0)
    np.testing.assert_array_equal(first, again)  # the seed makes augmentation reproducible
    assert not np.allclose(first, images)  # shuffled and augmented
    assert tf.reduce_all(tf.shape(first) == (80, 32, 32, 3))


def _first_training_batch(data: Dataset, jpeg: JpegAugment | None) -> np.ndarray:
    """The first augmented batch as uint8 (the pipeline's floats are exactly k / 255)."""
    from image_classifier.data import make_tf_dataset

    batches = make_tf_dataset(data, batch_size=80, training=True, seed=5, jpeg=jpeg)
    return np.round(next(iter(batches))[0].numpy() * 255).astype(np.uint8)


def test_jpeg_augmentation_re_encodes_in_the_parallel_pipeline() -> None:
    tf = pytest.importorskip("tensorflow", reason="the input pipeline is TensorFlow")
    data = _dataset((40, 40))
    data.images[:] = synthetic_images(data.labels)
    plain = _first_training_batch(data, None)
    # Probability 0 is the pipeline without JPEG: crops and flips keep their own seeds.
    np.testing.assert_array_equal(_first_training_batch(data, JpegAugment(0.0)), plain)

    # Always, at quality 30: each image is the plain one through TensorFlow's JPEG codec.
    coded = _first_training_batch(data, JpegAugment(1.0, 30, 30))
    expected = np.stack([tf.image.adjust_jpeg_quality(image, 30).numpy() for image in plain])
    np.testing.assert_array_equal(coded, expected)
    assert not np.array_equal(coded, plain)

    # Half the time, at random qualities: some images change, some do not, reproducibly.
    sometimes = _first_training_batch(data, JpegAugment(0.5, 50, 95))
    changed = np.mean([not np.array_equal(a, b) for a, b in zip(sometimes, plain, strict=True)])
    assert 0.25 < changed < 0.75
    np.testing.assert_array_equal(_first_training_batch(data, JpegAugment(0.5, 50, 95)), sometimes)


def test_jpeg_pairs_hold_each_crop_clean_then_as_jpeg() -> None:
    tf = pytest.importorskip("tensorflow", reason="the input pipeline is TensorFlow")
    from image_classifier.data import make_tf_dataset

    data = _dataset((40, 40))
    data.images[:] = synthetic_images(data.labels)
    batches = make_tf_dataset(
        data, batch_size=40, training=True, seed=5, jpeg=JpegAugment(0.1, 30, 30), jpeg_pairs=True
    )
    images, labels = next(iter(batches))
    assert images.shape == (40, 32, 32, 3) and labels.shape == (40,)
    pixels = np.round(images.numpy() * 255).astype(np.uint8)
    clean, coded = pixels[:20], pixels[20:]
    np.testing.assert_array_equal(labels.numpy()[:20], labels.numpy()[20:])
    # Every second view is its first through the codec, whatever the probability says.
    expected = np.stack([tf.image.adjust_jpeg_quality(image, 30).numpy() for image in clean])
    np.testing.assert_array_equal(coded, expected)
    assert not np.array_equal(coded, clean)
    # The clean halves are augmented crops of the training images, as without pairs.
    assert len({labels.numpy()[i] for i in range(20)}) > 1

    with pytest.raises(ConfigError, match="even number"):
        make_tf_dataset(data, batch_size=7, training=True, jpeg=JpegAugment(), jpeg_pairs=True)
    with pytest.raises(ConfigError, match="JPEG settings"):
        make_tf_dataset(data, batch_size=8, training=True, jpeg_pairs=True)


@pytest.mark.parametrize("padding", [0, 2])
def test_crop_padding_bounds_the_shift(padding: int) -> None:
    tf = pytest.importorskip("tensorflow", reason="the augmentation is TensorFlow")
    from image_classifier.data import augment

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
    # Every crop of the padded image, and its mirror: the only outputs allowed.
    crops = [
        padded[dy : dy + 32, dx : dx + 32]
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ]
    allowed = crops + [crop[:, ::-1] for crop in crops]
    outputs = [
        augment(tf.constant(image), tf.constant([seed, 7], tf.int64), padding=padding).numpy()
        for seed in range(40)
    ]
    for output in outputs:
        assert any(np.array_equal(output, crop) for crop in allowed)
    distinct = {output.tobytes() for output in outputs}
    assert len(distinct) > (1 if padding == 0 else 8)  # it does move and mirror


@pytest.mark.parametrize(
    ("probability", "low", "high"), [(-0.1, 50, 95), (1.5, 50, 95), (0.5, 0, 95), (0.5, 90, 80)]
)
def test_jpeg_augmentation_settings_are_checked(probability: float, low: int, high: int) -> None:
    with pytest.raises(ConfigError, match="JPEG"):
        JpegAugment(probability, low, high)


def test_download_fallback_says_what_to_do_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    keras = pytest.importorskip("keras", reason="the fallback downloads through keras.datasets")
    from image_classifier.data import load_keras_cifar10

    def offline() -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DatasetError, match=r"no internet access.*--data-dir"):
        load_keras_cifar10()
