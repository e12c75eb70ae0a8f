"""Datasets: CIFAR-10 batches, image-folder trees, the validation split and the tf.data pipeline.

Every dataset is held as uint8 RGB arrays ``(n, 32, 32, 3)`` plus integer labels and class names;
the float conversion happens in the input pipeline with :func:`preprocess.tf_normalize`, the same
definition the rest of the system uses. Image folders go through :func:`preprocess_image`, so a
user's own pictures are decoded, oriented, cropped and resized exactly as the gateway will.
"""

from __future__ import annotations

import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from image_classifier.constants import CIFAR10_CLASSES, IMAGE_SIZE
from image_classifier.errors import ConfigError, DatasetError, InvalidImageError
from image_classifier.preprocess import preprocess_image, tf_normalize

if TYPE_CHECKING:
    import tensorflow as tf

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_VALIDATION_SIZE = 5000
AUGMENT_PADDING = 4


@dataclass
class Dataset:
    """Images as uint8 ``(n, 32, 32, 3)``, labels as int64 ``(n,)``."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise DatasetError(f"images must be (n, 32, 32, 3), got {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise DatasetError(f"images must be uint8, got {self.images.dtype}")
        if len(self.images) != len(self.labels):
            raise DatasetError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.images[indices], self.labels[indices], self.class_names)


@dataclass
class DataSplits:
    train: Dataset
    validation: Dataset
    test: Dataset | None
    source: str


# --- CIFAR-10 python batches ------------------------------------------------------------------


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise DatasetError(f"{path}: expected rows of 3072 bytes, got shape {data.shape}")
    # Rows are planar (1024 R, 1024 G, 1024 B); the model wants NHWC.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_class_names(directory: Path) -> tuple[str, ...]:
    meta = directory / "batches.meta"
    if not meta.exists():
        return CIFAR10_CLASSES
    try:
        with meta.open("rb") as handle:
            names = pickle.load(handle, encoding="bytes")[b"label_names"]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError) as exc:
        raise DatasetError(f"{meta} is unreadable: {exc}") from None
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar10(directory: str | os.PathLike[str]) -> tuple[Dataset, Dataset | None]:
    """Read a ``cifar-10-batches-py`` directory: training set and, if present, ``test_batch``."""
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 directory not found: {root}")
    missing = [name for name in CIFAR_TRAIN_BATCHES if not (root / name).exists()]
    if missing:
        raise DatasetError(f"{root} lacks CIFAR-10 batches: {', '.join(missing)}")
    class_names = _read_class_names(root)
    parts = [_read_batch(root / name) for name in CIFAR_TRAIN_BATCHES]
    train = Dataset(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), class_names
    )
    test = None
    if (root / CIFAR_TEST_BATCH).exists():
        test = Dataset(*_read_batch(root / CIFAR_TEST_BATCH), class_names)
    for dataset in (train, test):
        if dataset is not None and dataset.labels.size and dataset.labels.max() >= len(class_names):
            raise DatasetError(f"{root}: a label is outside the {len(class_names)} class names")
    return train, test


def load_keras_cifar10() -> tuple[Dataset, Dataset]:
    """Download CIFAR-10 through ``keras.datasets`` (needs internet access)."""
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # urllib/HTTP/OS errors vary by platform; all mean the same here
        raise DatasetError(
            "could not download CIFAR-10 with keras.datasets (no internet access?); "
            f"pass --data-dir pointing at a cifar-10-batches-py directory instead ({exc})"
        ) from None
    return (
        Dataset(x_train, y_train.reshape(-1).astype(np.int64), CIFAR10_CLASSES),
        Dataset(x_test, y_test.reshape(-1).astype(np.int64), CIFAR10_CLASSES),
    )


# --- Image folders ------------------------------------------------------------------------------


def load_image_folder(root: str | os.PathLike[str], *, workers: int = 4) -> Dataset:
    """Read ``root/<class_name>/*.jpg|png|...``; class names are the sorted folder names.

    Files that are not decodable images are skipped with a warning line on stderr (a folder of
    user pictures often holds a stray thumbnail database or a broken download).
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"image folder not found: {base}")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DatasetError(f"{base} needs at least two class sub-folders, found {len(class_dirs)}")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, label))
    if not files:
        raise DatasetError(f"{base} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def load(item: tuple[Path, int]) -> tuple[np.ndarray | None, int]:
        path, label = item
        try:
            pixels = preprocess_image(path.read_bytes())
        except (InvalidImageError, OSError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            return None, label
        return np.round(pixels * 255.0).astype(np.uint8), label

    with ThreadPoolExecutor(max_workers=workers) as pool:
        loaded = [(img, label) for img, label in pool.map(load, files) if img is not None]
    if not loaded:
        raise DatasetError(f"no readable images under {base}")
    images = np.stack([img for img, _ in loaded])
    labels = np.asarray([label for _, label in loaded], dtype=np.int64)
    return Dataset(images, labels, tuple(p.name for p in class_dirs))


# --- Splitting ----------------------------------------------------------------------------------


def stratified_split(
    dataset: Dataset, validation_size: int = DEFAULT_VALIDATION_SIZE, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Deterministic stratified split: the same (data, size, seed) always gives the same split.

    Each class contributes to the validation set in proportion to its frequency (largest
    remainders get the leftover slots), so the split's class balance matches the data's.
    """
    n = len(dataset)
    if not 0 < validation_size < n:
        raise DatasetError(f"validation size must be between 1 and {n - 1}, got {validation_size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(dataset.labels, return_counts=True)
    exact = counts * validation_size / n
    quota = np.floor(exact).astype(int)
    leftover = validation_size - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    val_indices = []
    for cls, take in zip(classes, quota, strict=True):
        members = np.flatnonzero(dataset.labels == cls)
        val_indices.append(rng.permutation(members)[:take])
    val = np.sort(np.concatenate(val_indices))
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    return dataset.subset(np.flatnonzero(mask)), dataset.subset(val)


def load_splits(
    data_dir: str | os.PathLike[str] | None,
    *,
    validation_size: int = DEFAULT_VALIDATION_SIZE,
    seed: int = 0,
) -> DataSplits:
    """The training/validation/test data for a ``--data-dir`` (CIFAR batches or image folder).

    Without ``data_dir`` CIFAR-10 is downloaded through ``keras.datasets``.
    """
    test: Dataset | None
    if data_dir is None:
        full, test = load_keras_cifar10()
        source = "CIFAR-10 (keras.datasets download)"
    elif (Path(data_dir) / CIFAR_TRAIN_BATCHES[0]).exists():
        full, test = load_cifar10(data_dir)
        source = f"CIFAR-10 python batches ({Path(data_dir).name})"
    else:
        full, test = load_image_folder(data_dir), None
        source = f"image folder ({Path(data_dir).name})"
    train, validation = stratified_split(full, validation_size, seed)
    return DataSplits(train, validation, test, source)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(pixels.mean(axis=0).tolist()), tuple(pixels.std(axis=0).tolist())


# --- tf.data input pipeline ---------------------------------------------------------------------


@dataclass(frozen=True)
class JpegAugment:
    """Re-encode a training image as JPEG with probability ``probability``, at a quality drawn
    uniformly from ``[min_quality, max_quality]`` (4:2:0 chroma, as Pillow's and phones' default).

    Uploads are often JPEGs; at 32x32 a JPEG's 8x8 blocks and halved chroma resolution are a
    large change the clean CIFAR pixels never show the model.
    """

    probability: float = 0.5
    min_quality: int = 50
    max_quality: int = 95

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"JPEG augmentation probability must be in [0, 1]: {self}")
        if not 1 <= self.min_quality <= self.max_quality <= 100:
            raise ConfigError(f"JPEG qualities must satisfy 1 <= min <= max <= 100: {self}")


def augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    jpeg: JpegAugment | None = None,
    padding: int = AUGMENT_PADDING,
) -> tf.Tensor:
    """CIFAR augmentation: random 32x32 crop of the ``padding``-pixel reflect-padded image
    (a shift of up to ``padding`` pixels), random flip, then (with ``jpeg``) a random JPEG
    re-encoding of some images."""
    import tensorflow as tf

    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
    flipped = tf.image.stateless_random_flip_left_right(cropped, seed=flip_seed)
    if jpeg is None or jpeg.probability == 0.0:
        return flipped
    apply_seed, quality_seed = _jpeg_seeds(seed)
    apply = tf.random.stateless_uniform([], seed=apply_seed) < jpeg.probability
    # Encoded and decoded only when applied: the other images skip the codec's cost.
    return tf.cond(apply, lambda: _reencode(flipped, quality_seed, jpeg), lambda: flipped)


def augment_pair(
    image: tf.Tensor, seed: tf.Tensor, jpeg: JpegAugment, padding: int = AUGMENT_PADDING
) -> tf.Tensor:
    """(2, H, W, C): one random crop and flip of ``image`` (as :func:`augment`), then the same
    pixels re-encoded as JPEG at a random quality (``jpeg.probability`` does not apply)."""
    import tensorflow as tf

    clean = augment(image, seed, None, padding)
    _, quality_seed = _jpeg_seeds(seed)
    return tf.stack([clean, _reencode(clean, quality_seed, jpeg)])


def _jpeg_seeds(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Seeds for whether and at which quality an image is re-encoded: seeds of their own,
    folded from the image's seed, so crops and flips stay what they are without JPEG
    augmentation (the same run is reproducible with probability 0)."""
    import tensorflow as tf

    jpeg_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    apply_seed, quality_seed = tf.unstack(tf.random.experimental.stateless_split(jpeg_seed, 2))
    return apply_seed, quality_seed


def _reencode(image: tf.Tensor, quality_seed: tf.Tensor, jpeg: JpegAugment) -> tf.Tensor:
    import tensorflow as tf

    quality = tf.random.stateless_uniform(
        [], seed=quality_seed, minval=jpeg.min_quality, maxval=jpeg.max_quality + 1, dtype=tf.int32
    )
    coded = tf.image.adjust_jpeg_quality(image, quality)
    return tf.ensure_shape(coded, image.shape)  # the decoder's output shape is not static


@dataclass(frozen=True)
class Shard:
    """One worker's part of data-parallel training over ``count`` workers.

    Every worker shuffles the whole training set with the same seed, so all of them see the same
    order each epoch, and worker ``index`` keeps positions ``index, index + count, ...`` of it.
    The workers' k-th batches together are then exactly the k-th global batch of the
    single-machine pipeline (same images, same augmentation seeds): the global batch stays what
    was configured, only the work is split. ``replicas`` is how many model replicas the worker
    feeds (its local devices); each gets ``batch_size / (count * replicas)`` images per step.
    """

    index: int
    count: int
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or self.replicas < 1 or not 0 <= self.index < self.count:
            raise ConfigError(
                f"invalid shard {self.index} of {self.count} ({self.replicas} replicas each)"
            )

    @property
    def total_replicas(self) -> int:
        return self.count * self.replicas


def replica_batch_size(batch_size: int, shard: Shard) -> int:
    """Images per replica per step; the global batch must split evenly across replicas."""
    if batch_size % shard.total_replicas:
        raise ConfigError(
            f"batch size {batch_size} does not split evenly across {shard.total_replicas} "
            f"replicas ({shard.count} workers x {shard.replicas}); pick a multiple of "
            f"{shard.total_replicas}"
        )
    return batch_size // shard.total_replicas


def sharded_steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Steps per epoch of a sharded training pipeline: whole global batches only."""
    steps = num_images // batch_size
    if steps < 1:
        raise ConfigError(
            f"{num_images} training images are fewer than one global batch of {batch_size}"
        )
    return steps


def make_tf_dataset(
    dataset: Dataset,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    shard: Shard | None = None,
    jpeg: JpegAugment | None = None,
    crop_padding: int = AUGMENT_PADDING,
    jpeg_pairs: bool = False,
    repeat: bool = False,
) -> tf.data.Dataset:
    """Batched (float32 [0, 1] images, int labels); shuffled and augmented only when training.

    Augmentation runs on uint8 (4x less memory traffic than floats) in parallel map calls, and
    the pipeline prefetches so the two CPU cores never wait on input between steps.

    With ``shard`` (data-parallel training, see :class:`Shard`), ``batch_size`` is still the
    global batch and the pipeline yields this worker's per-replica pieces of it. Training then
    keeps whole global batches only: each epoch's last partial batch (a different one every
    epoch, as the order is reshuffled) is dropped, because a replica given an empty share would
    make BatchNorm's batch statistics NaN and the workers must step in lockstep. Evaluation
    keeps every image of the worker's share.

    ``jpeg`` adds random JPEG re-encoding to the training augmentation (:class:`JpegAugment`);
    ``crop_padding`` is how far its random crops shift the image.

    ``jpeg_pairs`` (training only) makes every batch ``batch_size / 2`` images twice: its first
    half the augmented crops, its second half the same crops re-encoded as JPEG, in the same
    order (:func:`augment_pair`), for a loss that compares an image's two predictions
    (:func:`train.jpeg_consistency_loss`).

    ``repeat`` makes the pipeline endless: epoch after epoch, each reshuffled and with the same
    batches an epoch would have had (the partial last batch included), for one iterator that
    serves a whole run. A training loop that instead opens an iterator per epoch pays for
    tf.data's iterator start each time (graph rewrites over the in-memory training set, the
    autotuner starting over, the shuffle buffer and parallel map refilling); on two busy cores
    that start has cost up to 50 s in an epoch of a full run.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((dataset.images, dataset.labels))
    per_replica = batch_size if shard is None else replica_batch_size(batch_size, shard)
    if training:
        ds = ds.shuffle(len(dataset), seed=seed, reshuffle_each_iteration=True)
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        # Seeds are paired with images before sharding, so an image gets the same crop and flip
        # whichever worker trains on it.
        ds = tf.data.Dataset.zip((ds, seeds))
        if shard is not None:
            whole = sharded_steps_per_epoch(len(dataset), batch_size) * batch_size
            ds = ds.take(whole).shard(shard.count, shard.index)
        if not jpeg_pairs:
            ds = ds.map(
                lambda pair, s: (augment(pair[0], s, jpeg, crop_padding), pair[1]),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            ds = ds.batch(per_replica, drop_remainder=shard is not None)
        elif jpeg is None or per_replica % 2:
            raise ConfigError(
                "JPEG pairs need JPEG settings and an even number of images per replica, "
                f"got {jpeg} and {per_replica}"
            )
        else:
            codec = jpeg
            ds = ds.map(
                lambda pair, s: (augment_pair(pair[0], s, codec, crop_padding), pair[1]),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            ds = ds.batch(per_replica // 2, drop_remainder=shard is not None)
            ds = ds.map(_pairs_to_halves, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        if shard is not None:
            ds = ds.shard(shard.count, shard.index)
        ds = ds.batch(per_replica, drop_remainder=False)
    if repeat:
        # Inside the final map and prefetch, so those keep running across epoch boundaries.
        ds = ds.repeat()
    ds = ds.map(lambda x, y: (tf_normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _pairs_to_halves(pairs: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, 2, H, W, C) pairs -> (2B, H, W, C): all first members, then all second members."""
    import tensorflow as tf

    images = tf.reshape(tf.transpose(pairs, [1, 0, 2, 3, 4]), [-1, *pairs.shape[2:]])
    return images, tf.concat([labels, labels], 0)
