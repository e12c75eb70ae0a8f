"""Small learnable data in the real on-disk formats, so tests never need ../shared.

Each class gets its own colour and a stripe pattern, so a tiny model can tell classes apart
within a couple of epochs, and augmentation (crops, flips) keeps the label recognisable.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from image_classifier.constants import CIFAR10_CLASSES

PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [0, 0, 128],
    ],
    dtype=np.int64,
)


def synthetic_images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 (n, 32, 32, 3): class colour on a noisy background, stripes whose period encodes
    the class."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(0, 60, size=(n, 32, 32, 3))
    rows = np.arange(32)
    for i, label in enumerate(labels):
        stripes = (rows // (2 + label % 5)) % 2 == 0
        images[i, 6:26, 6:26] = PALETTE[label] // 2 + 60
        images[i, stripes, 6:26] = PALETTE[label][None, :]
    return np.clip(images, 0, 255).astype(np.uint8)


def write_cifar_batches(
    root: Path, per_batch: int = 60, *, with_test: bool = False, seed: int = 0
) -> Path:
    """A ``cifar-10-batches-py``-style directory with 5 training batches (and a test batch)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
    if with_test:
        names.append("test_batch")
    for index, name in enumerate(names):
        labels = rng.integers(0, 10, size=per_batch)
        images = synthetic_images(labels, seed=seed + index)
        planar = images.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # as CIFAR stores them
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": planar,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with (root / name).open("wb") as handle:
            pickle.dump(batch, handle)
    with (root / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, handle)
    return root


def encode(pixels: np.ndarray, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save_args)
    return buffer.getvalue()


def write_image_folder(root: Path, classes: tuple[str, ...], per_class: int = 6) -> Path:
    """``root/<class>/*.png|jpg``, pictures larger than 32x32 so preprocess has to resize."""
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        images = synthetic_images(np.full(per_class, label), seed=label)
        for i, image in enumerate(images):
            big = np.asarray(Image.fromarray(image).resize((96, 96), Image.Resampling.NEAREST))
            fmt, suffix = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
            (folder / f"{i}.{suffix}").write_bytes(encode(big, fmt))
    return root
