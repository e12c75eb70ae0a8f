"""Center-crop vs squash: which resize policy classifies non-square pictures better?

There are no real photos here, so two framings of the validation images are simulated, each
upscaled 4x and made 4:3 (landscape) or 3:4 (portrait):

- ``margins``: the object stays centered at its true shape and the frame extends past it (the
  border continues by reflection), as when a photo shows an object with background around it;
- ``stretched``: the object itself fills the wider frame (a 4:3 resize of the picture).

Each picture is encoded as PNG and classified through the export's ``serving_default`` after
:func:`preprocess.decode_image` and either the project's center crop or a plain squash.
Usage::

    .venv/bin/python benchmarks/resize_policy.py [--model-dir saved_models/image_classifier]
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image

from image_classifier.constants import DEFAULT_MODEL_BASE_PATH, IMAGE_SIZE
from image_classifier.data import load_splits
from image_classifier.preprocess import decode_image, normalize, resize_to_input
from image_classifier.servable import load_servable

UPSCALE = 4


def frame(image: np.ndarray, framing: str, orientation: str) -> bytes:
    side = IMAGE_SIZE * UPSCALE
    long_side = side * 4 // 3
    big = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    if framing == "stretched":
        size = (long_side, side) if orientation == "landscape" else (side, long_side)
        framed = big.resize(size, Image.Resampling.BICUBIC)
    else:
        pad = (long_side - side) // 2
        widths = (
            ((0, 0), (pad, pad), (0, 0))
            if orientation == "landscape"
            else ((pad, pad), (0, 0), (0, 0))
        )
        framed = Image.fromarray(np.pad(np.asarray(big), widths, mode="reflect"))
    buffer = io.BytesIO()
    framed.save(buffer, "PNG")
    return buffer.getvalue()


def squash(data: bytes) -> np.ndarray:
    image = decode_image(data).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return normalize(np.asarray(image, dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_BASE_PATH)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar-10-batches-py")
    parser.add_argument("--images", type=int, default=2000, help="validation images to use")
    args = parser.parse_args()

    servable = load_servable(args.model_dir)
    card = servable.metadata.get("data", {})
    splits = load_splits(
        args.data_dir,
        validation_size=card.get("validation_images", 5000),
        seed=card.get("validation_seed", 0),
    )
    images = splits.validation.images[: args.images]
    labels = splits.validation.labels[: args.images]
    results: dict[str, dict[str, float]] = {}
    for framing in ("margins", "stretched"):
        for orientation in ("landscape", "portrait"):
            encoded = [frame(image, framing, orientation) for image in images]
            row = {}
            for policy, fn in (
                ("center_crop", lambda d: resize_to_input(decode_image(d))),
                ("squash", squash),
            ):
                batch = np.stack([fn(data) for data in encoded])
                predicted = np.concatenate(
                    [servable.predict(batch[i : i + 500]) for i in range(0, len(batch), 500)]
                ).argmax(axis=1)
                row[policy] = round(float((predicted == labels).mean()), 4)
            results[f"{framing}/{orientation}"] = row
    print(json.dumps({"images": len(images), "accuracy": results}, indent=2))


if __name__ == "__main__":
    main()
