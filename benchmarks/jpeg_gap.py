"""Where does the JPEG gap come from? Accuracy on the validation split, one codec step at a time.

``image-classifier evaluate`` reports accuracy on validation images saved as JPEG by Pillow with
its defaults (4:2:0 chroma). A JPEG changes a 32x32 picture in three ways, measured here one at
a time through the export's ``serving_default`` and the gateway's own decoding
(:func:`evaluate.jpeg_roundtrip`):

- ``q100 4:4:4``: the codec's colour conversion and rounding alone (no subsampling, the finest
  quantization);
- ``q100 4:2:0``: plus chroma at half resolution, what every default JPEG does;
- ``q<N> 4:4:4``: quantization at quality N with full-resolution chroma;
- ``q<N> 4:2:0``: both, the figure ``evaluate`` reports.

The last row re-encodes with ``tf.image.adjust_jpeg_quality``, the codec of the training
augmentation (:class:`data.JpegAugment`), to show whether training and uploads see the same
JPEG. Usage::

    .venv/bin/python benchmarks/jpeg_gap.py [--model-dir DIR] [--version N] [--quality 75]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from image_classifier.constants import DEFAULT_MODEL_BASE_PATH
from image_classifier.evaluate import (
    SUBSAMPLING_420,
    SUBSAMPLING_444,
    jpeg_roundtrip,
    predict_in_batches,
    validation_splits,
)
from image_classifier.servable import load_servable


def tensorflow_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    import tensorflow as tf

    return np.stack([tf.image.adjust_jpeg_quality(pixels, quality).numpy() for pixels in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_BASE_PATH)
    parser.add_argument("--version", type=int, default=None, help="default: the newest")
    parser.add_argument("--data-dir", default="../shared/datasets/cifar-10-batches-py")
    parser.add_argument("--quality", type=int, default=75)
    args = parser.parse_args()

    servable = load_servable(args.model_dir, args.version)
    validation = validation_splits(servable.metadata, args.data_dir).validation
    images, labels = validation.images, validation.labels

    def accuracy(pixels: np.ndarray) -> float:
        return float(np.mean(predict_in_batches(servable.predict, pixels).argmax(1) == labels))

    quality = args.quality
    decoded = {
        "lossless": images,
        "q100 4:4:4": jpeg_roundtrip(images, 100, subsampling=SUBSAMPLING_444),
        "q100 4:2:0": jpeg_roundtrip(images, 100, subsampling=SUBSAMPLING_420),
        f"q{quality} 4:4:4": jpeg_roundtrip(images, quality, subsampling=SUBSAMPLING_444),
        f"q{quality} 4:2:0": jpeg_roundtrip(images, quality, subsampling=SUBSAMPLING_420),
        f"q{quality} training codec": tensorflow_jpeg(images, quality),
    }
    results = {name: accuracy(pixels) for name, pixels in decoded.items()}

    lossless = results["lossless"]
    print(f"version {servable.version}, {len(labels)} validation images")
    print(f"{'pixels':<22}{'accuracy':>10}{'gap (points)':>14}")
    for name, value in results.items():
        print(f"{name:<22}{value:>10.2%}{100 * (lossless - value):>14.2f}")
    pillow = decoded[f"q{quality} 4:2:0"].astype(np.int16)
    training = decoded[f"q{quality} training codec"].astype(np.int16)
    difference = np.sqrt(np.mean((pillow - training) ** 2))
    print(f"training codec vs Pillow at q{quality}: {difference:.2f} grey levels rms")
    print(json.dumps({name: round(value, 4) for name, value in results.items()}))


if __name__ == "__main__":
    main()
